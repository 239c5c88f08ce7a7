"""The aiohttp application: one factory, shared state in ``web.AppKey``s, lifecycle in
``cleanup_ctx``. Errors leave in OpenAI's envelope, never as a traceback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .config import Settings
from .connections import as_unavailable, refusing_errors, unavailable_errors
from .engine import Engine
from .errors import EntityError, RedisUnavailable
from .metrics import METRICS, add_metrics
from .store import Store

__all__ = [
    "CLIENT_REQUEST_ID",
    "ENGINE",
    "REQUEST_ID",
    "SETTINGS",
    "STORE",
    "create_app",
    "error_response",
    "hash_key",
    "new_key",
]

log = logging.getLogger("ratelimiter.server")

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", Engine)
STORE = web.AppKey("store", Store)

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_REQUEST_ID = web.RequestKey("client_request_id", str | None)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CLIENT_REQUEST_ID = 200


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def hash_key(key: str) -> str:
    """Virtual keys are stored as sha256: a leaked database leaks no usable key."""
    return hashlib.sha256(key.encode()).hexdigest()


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status,
        headers,
    )


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found_error",
    409: "conflict_error",
}


def _client_request_id(request: web.Request) -> str | None:
    value = request.headers.get("x-request-id")
    if value is None:
        return None
    if not 0 < len(value) <= MAX_CLIENT_REQUEST_ID or not value.isprintable():
        raise EntityError(
            400,
            f"x-request-id must be 1 to {MAX_CLIENT_REQUEST_ID} printable characters; it is "
            "only echoed and logged (the limiter gives every request its own id)",
            "x-request-id",
        )
    return value


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer gets an id of ours, leaves in OpenAI's envelope instead of a traceback,
    and is counted by route and status."""
    request[REQUEST_ID] = f"req-{uuid.uuid4().hex}"
    try:
        request[CLIENT_REQUEST_ID] = _client_request_id(request)
        response = await handler(request)
    except asyncio.CancelledError:
        _count(request, 499)  # the client went away
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason, _ERROR_TYPES.get(exc.status, "error"))
    except Exception as exc:
        response = _error_answer(request, exc)
    _count(request, response.status)
    return response


def _error_answer(request: web.Request, exc: Exception) -> web.Response:
    if isinstance(exc, EntityError):
        return error_response(
            exc.status, str(exc), _ERROR_TYPES.get(exc.status, "error"), exc.param
        )
    if isinstance(exc, RedisUnavailable):
        return redis_unavailable(request, exc)
    if isinstance(exc, (*unavailable_errors, *refusing_errors)):  # a call outside the engine
        address = request.app[ENGINE].address if ENGINE in request.app else "?"
        return redis_unavailable(request, as_unavailable(address, exc))
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal error in the rate limiter; see its log", "internal_error")


def _count(request: web.Request, status: int) -> None:
    if METRICS in request.app:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].requests.labels(route, str(status)).inc()


async def _tag_response(request: web.Request, response: web.StreamResponse) -> None:
    """Before any answer's headers leave, streams included: our id, and the client's echoed."""
    if REQUEST_ID in request:
        response.headers.setdefault("x-request-id", request[REQUEST_ID])
    if request.get(CLIENT_REQUEST_ID):
        response.headers.setdefault("x-client-request-id", request[CLIENT_REQUEST_ID])


def redis_unavailable(request: web.Request, exc: RedisUnavailable) -> web.Response:
    """A 503 that tells the client what happened; the address and the driver's words go to
    the log only."""
    log.error("redis unavailable: %s", exc)
    if METRICS in request.app:
        request.app[METRICS].redis_errors.inc()
    return error_response(
        503,
        f"{exc.public}; the limiter cannot decide, so it refuses. {exc.hint}",
        "service_unavailable",
    )


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def require_master(request: web.Request) -> None:
    if bearer(request) is None:
        raise EntityError(401, "missing API key: send 'Authorization: Bearer <master key>'")
    if not is_master(request):
        raise EntityError(401, "admin routes need the master key; this key is not it")


async def read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise EntityError(400, f"send the body as application/json, not {request.content_type!r}")
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise EntityError(400, f"the body is not valid JSON: {exc}") from None


async def health_liveliness(request: web.Request) -> web.Response:
    return json_response("I'm alive!")


def is_master(request: web.Request) -> bool:
    token = bearer(request)
    return token is not None and hmac.compare_digest(
        token.encode(), request.app[SETTINGS].master_key.encode()
    )


async def health_readiness(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        await asyncio.wait_for(engine.redis.ping(), 2)
    except Exception as exc:
        log.error("readiness: Redis at %s: %s", engine.address, exc or "timeout")
        body = {"status": "unhealthy", "redis": "unreachable"}
        if is_master(request):  # operators may see where and why
            body["detail"] = f"Redis at {engine.address}: {exc or 'timeout'}"
        return json_response(body, 503)
    return json_response({"status": "healthy", "redis": "connected"})


def create_app(settings: Settings, engine: Engine) -> web.Application:
    """The sidecar: ``engine`` is connected by the caller and closed with the app."""
    from .admin import add_admin_routes  # they build on this module
    from .alerts import add_alerts
    from .hosted_budgets import add_hosted_budget_routes
    from .proxy import add_proxy_routes
    from .ui import add_ui_routes

    app = web.Application(middlewares=[edge_middleware], client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(_tag_response)
    app[SETTINGS] = settings
    app[ENGINE] = engine
    app[STORE] = Store(engine.redis, prefix=settings.key_prefix, address=engine.address)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/health/liveliness", health_liveliness)
    app.router.add_get("/health/readiness", health_readiness)
    add_metrics(app)
    add_admin_routes(app)
    add_hosted_budget_routes(app)
    add_proxy_routes(app)
    add_ui_routes(app)
    add_alerts(app)
    return app


async def redis_health_warnings(engine: Engine) -> list[str]:
    """What in Redis's configuration puts counters or the ledger at risk."""
    warnings = []
    try:
        persistence = await engine.redis.info("persistence")
        save = (await engine.redis.config_get("save")).get("save", "")
        policy = (await engine.redis.config_get("maxmemory-policy")).get("maxmemory-policy", "")
    except Exception as exc:
        return [
            f"could not read Redis's persistence settings ({exc}); check that AOF is on "
            "and maxmemory-policy is noeviction"
        ]
    if not int(persistence.get("aof_enabled", 0)) and not save:
        warnings.append(
            "Redis persistence is off (no AOF, no RDB snapshots): a restart "
            "loses every counter and the spend ledger; enable appendonly yes"
        )
    if policy and policy != "noeviction":
        warnings.append(
            f"Redis maxmemory-policy is {policy}: under memory pressure it may "
            "evict counters (admitting too much) or ledger entries; use noeviction"
        )
    return warnings


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    from .ledger import collect_expired_holds

    for warning in await redis_health_warnings(app[ENGINE]):
        log.warning(warning)

    tasks = [
        asyncio.create_task(app[STORE].listen()),
        asyncio.create_task(collect_expired_holds(app[ENGINE], app[SETTINGS].collect_interval_s)),
    ]
    yield
    for task in tasks:
        task.cancel()
    # bounded: a connection torn down mid-read must not hold the shutdown
    await asyncio.wait(tasks, timeout=2)
    await asyncio.wait_for(app[ENGINE].close(), 5)
