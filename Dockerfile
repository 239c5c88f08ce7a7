# The sidecar. Build: docker build -t ratelimiter .
# Run: docker run -e REDIS_URL=redis://redis:6379/0 -e RATELIMITER_MASTER_KEY=sk-... \
#        -v $PWD/deploy/config.yaml:/etc/ratelimiter/config.yaml:ro -p 4000:4000 ratelimiter
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ratelimiter ratelimiter
COPY lua lua
# with the postgres extra: the same image ships the ledger to PostgreSQL when a sink is set
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[postgres]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home ratelimiter
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'ratelimiter[postgres]' && rm -rf /wheels
COPY deploy/config.yaml /etc/ratelimiter/config.yaml
USER ratelimiter
EXPOSE 4000
# Liveness only: readiness (Redis reachable) is the load balancer's and Kubernetes' business.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:4000/health/liveliness', timeout=2).status != 200)"]
ENTRYPOINT ["ratelimiter"]
CMD ["serve", "--config", "/etc/ratelimiter/config.yaml", "--host", "0.0.0.0", "--port", "4000"]
