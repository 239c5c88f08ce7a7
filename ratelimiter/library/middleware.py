"""The engine inside any aiohttp application: limits on your own routes, keyed by anything in
the request, answered with the sidecar's headers and 429s.

    ENGINE = web.AppKey("engine", Engine)

    def per_api_key(request: web.Request) -> list[Limit]:
        key = request.headers.get("X-Api-Key", "anonymous")
        return [SlidingWindow(f"app:{{key:{key}}}:rpm", 60, "1m", name=f"key:{key}")]

    app = web.Application(middlewares=[limit_middleware(per_api_key, ENGINE)])
    app.cleanup_ctx.append(engine_context(ENGINE, "redis://localhost:6379"))

``limits`` may be a coroutine function, and may return no limits to let a request through
unchecked. A request that reaches the handler is settled when the handler returns or raises
(``actuals`` may name the real amounts, e.g. tokens used, from the response); an admitted
request holds its ``Concurrency`` leases until then. ``limited(...)`` does the same for one
handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal

from aiohttp import web

from ..engine import Decision, Engine
from ..engine.limits import Limit
from ..errors import RedisUnavailable
from ..ledger import collect_expired_holds
from ..responses import error_response, rate_headers, refusal

__all__ = ["engine_context", "limit_middleware", "limited"]

log = logging.getLogger("ratelimiter.middleware")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LimitsFor = Callable[[web.Request], Iterable[Limit] | Awaitable[Iterable[Limit] | None] | None]
Actuals = Callable[[web.Request, web.StreamResponse | None], Mapping[str, int]]
EngineRef = Engine | web.AppKey[Engine]


class _Guard:
    def __init__(
        self,
        limits: LimitsFor,
        engine: EngineRef,
        on_redis_error: Literal["deny", "allow"],
        actuals: Actuals | None,
    ) -> None:
        if on_redis_error not in ("deny", "allow"):
            raise ValueError(f"on_redis_error must be 'deny' or 'allow', got {on_redis_error!r}")
        self.limits, self.engine_ref = limits, engine
        self.on_redis_error, self.actuals = on_redis_error, actuals

    def engine(self, request: web.Request) -> Engine:
        ref = self.engine_ref
        return ref if isinstance(ref, Engine) else request.app[ref]

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        limits = self.limits(request)
        if inspect.isawaitable(limits):
            limits = await limits
        limits = tuple(limits or ())
        if not limits:
            return await handler(request)
        engine = self.engine(request)
        request_id = f"req-{uuid.uuid4().hex}"  # never the client's: a reused id is re-admitted
        try:
            decision = await engine.acquire(request_id, limits)
        except RedisUnavailable as exc:
            if self.on_redis_error == "allow":
                log.warning("admitting %s unchecked: %s", request_id, exc)
                return await handler(request)
            return error_response(
                503,
                f"{exc}; the rate limiter cannot decide, so it refuses. {exc.hint}",
                "service_unavailable",
            )
        if not decision.allowed:
            return refusal(decision, request_id)
        return await self._run(request, handler, engine, decision, request_id)

    async def _run(
        self,
        request: web.Request,
        handler: Handler,
        engine: Engine,
        decision: Decision,
        request_id: str,
    ) -> web.StreamResponse:
        headers = rate_headers(decision, request_id)
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(headers)
            raise
        finally:
            await self._settle(engine, decision, request, response)
        if not response.prepared:  # a stream already sent its headers
            response.headers.update(headers)
        return response

    async def _settle(
        self,
        engine: Engine,
        decision: Decision,
        request: web.Request,
        response: web.StreamResponse | None,
    ) -> None:
        assert decision.reservation is not None
        amounts = dict(self.actuals(request, response)) if self.actuals else {}
        try:
            await engine.settle(decision.reservation, amounts)
        except RedisUnavailable as exc:
            # The hold is charged at its estimate when it expires (engine_context collects).
            log.warning("could not settle %s: %s", decision.reservation.request_id, exc)


def limit_middleware(
    limits: LimitsFor,
    engine: EngineRef,
    *,
    on_redis_error: Literal["deny", "allow"] = "deny",
    actuals: Actuals | None = None,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """A middleware admitting every request against ``limits(request)``."""
    guard = _Guard(limits, engine, on_redis_error, actuals)

    @web.middleware
    async def rate_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await guard(request, handler)

    return rate_limits


def limited(
    limits: LimitsFor,
    engine: EngineRef,
    *,
    on_redis_error: Literal["deny", "allow"] = "deny",
    actuals: Actuals | None = None,
) -> Callable[[Handler], Handler]:
    """The middleware's check for one handler: ``@limited(per_user, ENGINE)``."""
    guard = _Guard(limits, engine, on_redis_error, actuals)

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await guard(request, handler)

        return wrapped

    return decorate


def engine_context(
    key: web.AppKey[Engine], url: str | None, *, collect_interval_s: float = 5.0, **options: Any
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry: connects an engine into ``app[key]`` (``url=None`` starts an
    embedded Redis), finalises the holds of processes that died mid-request, closes it."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        engine = await Engine.connect(url, **options)
        app[key] = engine
        collector = asyncio.create_task(collect_expired_holds(engine, collect_interval_s))
        try:
            yield
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            await engine.close()

    return context
