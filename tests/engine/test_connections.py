"""Redis URLs, an unreachable server, scripts forgotten by a restart or a flush."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from ratelimiter import (
    Concurrency,
    Engine,
    RateLimiterError,
    RedisServer,
    RedisSettings,
    RedisUnavailable,
    SlidingWindow,
    connect,
)
from ratelimiter.engine.embedded import free_port
from ratelimiter.engine.scripts import load_scripts
from ratelimiter.gateway.health import redis_health_warnings

from ..conftest import serving


def test_urls() -> None:
    plain = RedisSettings.from_url("redis://:s3cret@cache.internal:6380/2?timeout=0.5")
    assert (plain.cluster, plain.command_timeout, plain.address) == (
        None,
        0.5,
        "cache.internal:6380",
    )
    assert "timeout" not in plain.url

    tls = RedisSettings.from_url("rediss+cluster://node-1:7000?connect_timeout=3")
    assert (tls.cluster, tls.connect_timeout) == (True, 3.0)
    assert tls.url.startswith("rediss://node-1:7000")

    assert RedisSettings.from_url("redis://h?cluster=no").cluster is False
    assert RedisSettings.from_url("unix:///run/redis.sock").address == "/run/redis.sock"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost", "unsupported Redis URL scheme 'http'"),
        ("redis://h?cluster=maybe", "cluster='maybe' .* must be true or false"),
        ("redis://:pw@h?timeout=-1", "timeout='-1' in redis://:\\*\\*\\*@h.* positive number"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(RateLimiterError, match=message):
        RedisSettings.from_url(url)


async def test_unreachable_redis_names_its_address() -> None:
    port = free_port()
    settings = RedisSettings.from_url(f"redis://127.0.0.1:{port}", connect_timeout=0.3, retries=0)
    with pytest.raises(RedisUnavailable, match=f"Redis at 127.0.0.1:{port} is unreachable"):
        await connect(settings)


async def test_a_url_that_is_not_redis_is_one_clear_error() -> None:
    async with serving(web.Application()) as http:  # an HTTP server, not Redis
        url = http.replace("http://", "redis://")
        with pytest.raises(RateLimiterError, match="does not answer as Redis does"):
            await connect(RedisSettings.from_url(url, retries=0))


async def test_a_database_the_server_lacks_is_one_clear_error(redis_url: str) -> None:
    with pytest.raises(RateLimiterError, match="the server has no database 99; use a number"):
        await connect(redis_url.rsplit("/", 1)[0] + "/99")


async def test_unix_socket(tmp_path: object) -> None:
    with RedisServer(tmp_path, port=None, appendonly=False) as server:  # type: ignore[arg-type]
        assert server.url.startswith("unix://")
        async with await Engine.connect(server.url) as engine:
            assert not engine.cluster
            assert (await engine.acquire(None, [Concurrency("c", 1)])).allowed


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls(tmp_path: Path) -> None:
    """The engine's pipelined connection is the socket redis-py opened (here a TLS one), taken
    over after the handshake: admissions and settlements run over it as over plain TCP."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = _self_signed(tmp_path)
    port = free_port()
    tls = ("--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    tls += ("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    server = RedisServer(tmp_path, port=free_port(), appendonly=False, extra_args=tls)
    try:
        server.start()
    except RateLimiterError as exc:  # a build without TLS refuses the options
        if "tls" not in str(exc).lower():
            raise
        pytest.skip(f"this redis-server does not serve TLS: {exc}")
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        async with await Engine.connect(url) as engine:
            limits = [SlidingWindow("{tls}:rpm", 2, "1m"), Concurrency("{tls}:parallel", 5)]
            first = await engine.acquire(None, limits)
            assert first.allowed and (await engine.acquire(None, limits)).allowed
            assert not (await engine.acquire(None, limits)).allowed
            assert (await engine.settle(first.reservation, {})).first
            assert [s.remaining for s in await engine.peek(limits)] == [0, 4]
    finally:
        server.stop()


async def test_scripts_flushed_are_reloaded(engine: Engine, ns: str) -> None:
    limit = SlidingWindow(f"{ns}:w", 3, "1m")
    assert (await engine.acquire(None, [limit])).allowed
    await engine.redis.script_flush()
    assert (await engine.acquire(None, [limit])).allowed
    assert (await engine.peek([limit]))[0].remaining == 1


async def test_one_noscript_loads_every_script(engine: Engine, ns: str) -> None:
    """A call retried after NOSCRIPT goes behind what was pipelined meanwhile: a settlement
    meeting it would reach Redis after a later acquire, which would find its lease still held.
    After one NOSCRIPT no other script may meet one."""
    shas = [script.sha for script in load_scripts().values()]
    await engine.redis.script_flush()
    assert (await engine.acquire(None, [SlidingWindow(f"{ns}:w", 3, "1m")])).allowed
    assert await engine.redis.script_exists(*shas) == [True] * len(shas)


async def test_preload_loads_every_script(engine: Engine) -> None:
    shas = [script.sha for script in load_scripts().values()]
    await engine.redis.script_flush()
    await engine.preload()
    assert await engine.redis.script_exists(*shas) == [True] * len(shas)


async def test_engine_carries_on_across_a_redis_restart(tmp_path: object, ns: str) -> None:
    server = RedisServer(tmp_path, port=free_port(), appendonly=True).start()  # type: ignore[arg-type]
    try:
        async with await Engine.connect(server.url) as engine:
            limit = SlidingWindow(f"{ns}:w", 5, "1h")
            assert (await engine.acquire(None, [limit])).allowed
            server.stop()
            with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{server.port}"):
                await engine.acquire(None, [limit])
            server.start()  # same port, same AOF: the count survives, the scripts do not
            assert (await engine.acquire(None, [limit])).allowed
            assert (await engine.peek([limit]))[0].remaining == 3
    finally:
        server.stop()


async def test_health_warnings_for_risky_redis_settings(tmp_path: object) -> None:
    risky = RedisServer(
        tmp_path,
        port=free_port(),
        appendonly=False,  # type: ignore[arg-type]
        extra_args=("--maxmemory-policy", "allkeys-lru"),
    ).start()
    try:
        async with await Engine.connect(risky.url) as engine:
            warnings = await redis_health_warnings(engine)
            assert len(warnings) == 2
            assert "persistence is off" in warnings[0] and "allkeys-lru" in warnings[1]
            await engine.redis.config_set("appendonly", "yes")
            await engine.redis.config_set("maxmemory-policy", "noeviction")
            assert await redis_health_warnings(engine) == []
    finally:
        risky.stop()
