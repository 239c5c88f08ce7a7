"""What every route of the sidecar shares: the app's state keys, the request's ids, who is
calling (bearer, master key), reading a JSON body, and the edge middleware that turns every
exception into OpenAI's error envelope and counts every answer."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..engine import Engine
from ..engine.connections import as_unavailable, refusing_errors, unavailable_errors
from ..errors import EntityError, RedisUnavailable
from ..ledger.sink import PostgresSink
from ..responses import anthropic_error, error_response
from .config import Settings
from .metrics import METRICS
from .store import Store

__all__ = [
    "CLIENT_REQUEST_ID",
    "ENGINE",
    "HTTP",
    "MAX_BODY_BYTES",
    "REQUEST_ID",
    "SETTINGS",
    "SETTLING",
    "STORE",
    "Settling",
    "bearer",
    "edge_middleware",
    "error_answer",
    "is_master",
    "read_json",
    "settled_first",
    "tag_response",
]

log = logging.getLogger("ratelimiter.http")

SETTINGS = web.AppKey("settings", Settings)
HTTP = web.AppKey("http", aiohttp.ClientSession)  # the upstreams' client session
ENGINE = web.AppKey("engine", Engine)
STORE = web.AppKey("store", Store)
# the ledger sink, when one is configured (ratelimiter_settings.ledger_sink)
SINK = web.AppKey("ledger_sink", PostgresSink)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Settling:
    """Settlements and releases made after their responses were sent, each a task of its own
    (the multiplexer pipelines their scripts).

    A task's script is queued on the loop's next turn, before any request that arrives
    after the response can reach Redis: on one Redis a client's next request meets the
    settled state. Reads of spend on this sidecar wait for the tasks started before them
    (``settled``), and shutdown waits for all (``drain``)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, update: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(update)
        self.tasks.add(task)  # a running task must be referenced, or it may be collected
        task.add_done_callback(self.tasks.discard)

    async def settled(self) -> None:
        """Until every update started so far has been made (or deferred, Redis being gone)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks))

    async def drain(self) -> None:
        while self.tasks:
            await self.settled()


SETTLING = web.AppKey("settling", Settling)


def settled_first(handler: Handler) -> Handler:
    """A read of spend on this sidecar sees every request it has answered: it waits for the
    settlements those started after their responses."""

    async def read(request: web.Request) -> web.StreamResponse:
        await request.app[SETTLING].settled()
        return await handler(request)

    return read


REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_REQUEST_ID = web.RequestKey("client_request_id", str | None)

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CLIENT_REQUEST_ID = 200


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


# Anthropic's Messages routes, whose clients read errors in Anthropic's envelope
_ANTHROPIC_ROUTES = ("/messages", "/messages/count_tokens")


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer gets an id of ours, leaves in OpenAI's envelope instead of a traceback,
    and is counted by route and status."""
    # 96 random bits: unique across sidecars and unguessable, at a quarter of uuid4's cost
    request[REQUEST_ID] = "req-" + os.urandom(12).hex()
    try:
        try:
            request[CLIENT_REQUEST_ID] = _client_request_id(request)
        except EntityError as exc:  # before any route: in the envelope its clients read
            if request.path.endswith(_ANTHROPIC_ROUTES):
                response = anthropic_error(exc.status, str(exc))
                _count(request, response.status)
                return response
            raise
        response = await handler(request)
    except asyncio.CancelledError:
        _count(request, 499)  # the client went away
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason, _ERROR_TYPES.get(exc.status, "error"))
    except Exception as exc:
        response = error_answer(request, exc)
    _count(request, response.status)
    return response


def error_answer(request: web.Request, exc: Exception) -> web.Response:
    if isinstance(exc, EntityError):
        return error_response(
            exc.status, str(exc), exc.kind or _ERROR_TYPES.get(exc.status, "error"), exc.param
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
        metrics = request.app[METRICS]
        metrics.labelled(metrics.requests, route, str(status)).inc()


async def tag_response(request: web.Request, response: web.StreamResponse) -> None:
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


def is_master(request: web.Request) -> bool:
    token = bearer(request)
    return token is not None and hmac.compare_digest(
        token.encode(), request.app[SETTINGS].master_key.encode()
    )


async def read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise EntityError(400, f"send the body as application/json, not {request.content_type!r}")
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise EntityError(400, f"the body is not valid JSON: {exc}") from None
