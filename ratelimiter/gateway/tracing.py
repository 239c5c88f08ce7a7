"""OpenTelemetry traces: one span per proxied request, with the GenAI semantic conventions'
attributes (operation, provider, model, token usage, response id) and the rate limiter's own
(scopes checked, the decision and the limit that refused, estimate against what was charged,
time spent in Redis before admission).

Optional twice over: with ``opentelemetry-api``/``-sdk`` absent (``pip install
'ratelimiter[otel]'`` brings them and the OTLP exporter), nothing here costs anything; with them
installed, spans are made only when configured the standard way: ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) for an exporter of our own, or a tracer provider the
embedding process set globally (``opentelemetry-instrument``, or a test's in-memory exporter).
``OTEL_SDK_DISABLED=true`` turns it off. An incoming ``traceparent`` makes the span a child of
the caller's trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from aiohttp import web

from ..pricing import dollars

__all__ = ["TRACER", "TRACER_PROVIDER", "add_tracing", "end_span", "start_span", "trace_call"]

log = logging.getLogger("ratelimiter.tracing")

# what GenAI's semantic conventions call each surface's operation
OPERATIONS = {
    "chat": "chat",
    "completion": "text_completion",
    "embedding": "embeddings",
    "responses": "chat",
    "messages": "chat",
    "count_tokens": "count_tokens",
}
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class Traced(Protocol):
    """What a span is made from: the request's ``Call`` (proxy.py), read, never changed."""

    def trace_attributes(self) -> dict[str, Any]: ...


TRACER = web.AppKey("tracer", object)  # an opentelemetry Tracer, or None: tracing is off
# a TracerProvider given by whoever builds the app (before it starts), over the environment's
TRACER_PROVIDER = web.AppKey("tracer_provider", object)
SPAN = web.RequestKey("span", object)
CALL = web.RequestKey("traced_call", object)


def _provider(env: Mapping[str, str]) -> tuple[Any, bool] | None:
    """The tracer provider to use and whether it is ours to shut down; None: tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    if not any(env.get(name) for name in ENDPOINT_VARIABLES):
        provider = trace.get_tracer_provider()
        configured = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        return (provider, False) if configured else None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK or its OTLP exporter "
            "is not installed (pip install 'ratelimiter[otel]'): no traces"
        )
        return None
    service = env.get("OTEL_SERVICE_NAME") or "ratelimiter"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider, True


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    given = app.get(TRACER_PROVIDER)
    found = (given, False) if given is not None else _provider(os.environ)
    app[TRACER] = found[0].get_tracer("ratelimiter") if found else None
    yield
    if found and found[1]:
        found[0].shutdown()  # flushes the spans still batched


def add_tracing(app: web.Application) -> None:
    app.cleanup_ctx.append(_tracing)


def start_span(request: web.Request, route: str) -> Any:
    """A span for this request, started now (None when tracing is off); ``end_span`` ends it."""
    tracer = request.app.get(TRACER)
    if tracer is None:
        return None
    from opentelemetry import propagate, trace

    span = tracer.start_span(  # type: ignore[attr-defined]
        OPERATIONS.get(route, route),
        context=propagate.extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes={"ratelimiter.route": route},
    )
    request[SPAN] = span
    return span


def trace_call(request: web.Request, call: Traced) -> None:
    """Names the request's ``Call``, whose fields the span gets when it ends."""
    if request.get(SPAN) is not None:
        request[CALL] = call


def end_span(request: web.Request, status: int) -> None:
    span = request.get(SPAN)
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    call = request.get(CALL)
    attributes = call.trace_attributes() if call is not None else {}  # type: ignore[attr-defined]
    attributes["http.response.status_code"] = status
    model = attributes.get("gen_ai.request.model")
    if model:
        span.update_name(f"{OPERATIONS.get(attributes.get('ratelimiter.route', ''), '')} {model}")
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    if status >= 400:
        span.set_attribute("error.type", str(status))
    span.end()


def spend_usd(nano_dollars: int | None) -> float | None:
    return None if nano_dollars is None else dollars(nano_dollars)
