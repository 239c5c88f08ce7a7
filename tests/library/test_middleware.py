"""The aiohttp middleware and decorator on a real application over real HTTP, on a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ratelimiter import Concurrency, Engine, Limit, RedisServer, SlidingWindow
from ratelimiter.engine.embedded import free_port
from ratelimiter.library.middleware import engine_context, limit_middleware, limited

from ..conftest import serving

ENGINE = web.AppKey("engine", Engine)


def application(ns: str, redis_url: str, **options: object) -> web.Application:
    def per_key(request: web.Request) -> list[Limit]:
        if request.path == "/open":
            return []
        key = request.headers.get("X-Api-Key", "anonymous")
        return [
            SlidingWindow(f"{ns}:{{key:{key}}}:rpm", 3, "1m", name=f"key:{key}"),
            Concurrency(f"{ns}:{{key:{key}}}:parallel", 1, name=f"key:{key}"),
        ]

    async def hello(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("sleep", 0)))
        return web.json_response({"hello": "world"})

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text="no such thing")

    app = web.Application(middlewares=[limit_middleware(per_key, ENGINE, **options)])  # type: ignore[arg-type]
    app.cleanup_ctx.append(engine_context(ENGINE, redis_url))
    app.router.add_get("/hello", hello)
    app.router.add_get("/open", hello)
    app.router.add_get("/missing", missing)
    return app


async def test_requests_past_the_limit_get_the_sidecars_429(redis_url: str, ns: str) -> None:
    async with (
        serving(application(ns, redis_url)) as base,
        aiohttp.ClientSession(headers={"X-Api-Key": "k1"}) as session,
    ):
        for remaining in (2, 1, 0):
            async with session.get(f"{base}/hello") as r:
                assert r.status == 200 and await r.json() == {"hello": "world"}
                assert r.headers["x-ratelimit-remaining-requests"] == str(remaining)
                assert r.headers["x-ratelimit-limit-requests"] == "3"
        async with session.get(f"{base}/hello") as r:
            body = await r.json()
            assert r.status == 429
            assert body["error"]["type"] == "requests"
            assert body["error"]["message"].startswith(
                "Rate limit exceeded for api_key: k1. Limit type: requests. "
                "Current limit: 3, Remaining: 0. Limit resets at: "
            )
            assert 0 < int(r.headers["retry-after-ms"]) <= 61_000  # a window and a bucket
        async with session.get(f"{base}/open") as r:  # no limits: always through
            assert r.status == 200 and "x-ratelimit-remaining-requests" not in r.headers
        async with session.get(f"{base}/hello", headers={"X-Api-Key": "k2"}) as r:
            assert r.status == 200  # another key, its own limit


async def test_a_lease_is_held_while_the_handler_runs_then_freed(redis_url: str, ns: str) -> None:
    async with (
        serving(application(ns, redis_url)) as base,
        aiohttp.ClientSession(headers={"X-Api-Key": "slow"}) as session,
    ):

        async def get(path: str) -> tuple[int, dict]:
            async with session.get(f"{base}{path}") as r:
                return r.status, await r.json()

        slow = asyncio.ensure_future(get("/hello?sleep=0.5"))
        await asyncio.sleep(0.2)
        status, body = await get("/hello")
        assert status == 429 and "Limit type: max_parallel_requests." in body["error"]["message"]
        assert (await slow)[0] == 200
        # A handler that raises is settled too: its lease comes back, the error keeps headers.
        async with session.get(f"{base}/missing") as r:
            assert r.status == 404 and r.headers["x-ratelimit-remaining-requests"] == "1"
        assert (await get("/hello"))[0] == 200


async def test_the_decorator_actuals_and_an_async_limits_function(redis_url: str, ns: str) -> None:
    async def by_user(request: web.Request) -> list[Limit]:
        user = request.match_info["user"]
        tokens = int(request.query.get("max_tokens", 100))
        return [SlidingWindow(f"{ns}:{{user:{user}}}:tpm", 250, "1m", tokens, measure="tokens")]

    def used(request: web.Request, response: web.StreamResponse | None) -> dict[str, int]:
        return {"tokens": int(response.headers["X-Tokens-Used"])} if response else {}

    @limited(by_user, ENGINE, actuals=used)
    async def generate(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"X-Tokens-Used": "10"})

    async def unlimited(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.cleanup_ctx.append(engine_context(ENGINE, redis_url))
    app.router.add_post("/generate/{user}", generate)
    app.router.add_post("/other/{user}", unlimited)
    async with serving(app) as base, aiohttp.ClientSession() as session:
        for _ in range(5):  # each holds 100 while it runs, then is charged the 10 it used
            async with session.post(f"{base}/generate/ann?max_tokens=100") as r:
                assert r.status == 200
        async with session.post(f"{base}/generate/ann?max_tokens=200") as r:
            assert r.status == 200, await r.text()  # 50 used: 200 more still fit
            assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        async with session.post(f"{base}/generate/ann?max_tokens=200") as r:
            assert r.status == 429 and r.headers["rate_limit_type"] == "tokens"
        async with session.post(f"{base}/other/ann") as r:
            assert r.status == 200 and "x-ratelimit-remaining-tokens" not in r.headers


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_redis_down_follows_the_policy(tmp_path: Path, ns: str, policy: str) -> None:
    server = RedisServer(tmp_path, port=free_port(), appendonly=False).start()
    try:
        app = application(ns, f"{server.url}?timeout=0.5", on_redis_error=policy)
        async with (
            serving(app) as base,
            aiohttp.ClientSession(headers={"X-Api-Key": "k"}) as session,
        ):
            async with session.get(f"{base}/hello") as r:
                assert r.status == 200
            server.stop()
            async with session.get(f"{base}/hello") as r:
                body = await r.json()
                if policy == "deny":
                    assert r.status == 503 and "unreachable" in body["error"]["message"]
                else:
                    assert r.status == 200 and body == {"hello": "world"}
    finally:
        server.stop()


def test_a_bad_policy_is_refused_when_the_app_is_built() -> None:
    with pytest.raises(ValueError, match="on_redis_error must be 'deny' or 'allow'"):
        limit_middleware(lambda request: [], ENGINE, on_redis_error="maybe")  # type: ignore[arg-type]
