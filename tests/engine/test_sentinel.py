"""redis+sentinel:// URLs: the sidecar finds the master through Sentinel, and after the master
dies and Sentinel promotes its replica, carries on against the new master without a restart."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from ratelimiter import Engine, RedisServer, SlidingWindow
from ratelimiter.engine.connections import RedisSettings, connect
from ratelimiter.engine.embedded import find_server_binary, free_port
from ratelimiter.errors import RateLimiterError

from ..conftest import Admin, one_model, running_sidecar, running_upstream

SERVICE = "ratelimiter-test"


class SentinelSetup:
    """A master, its replica and one Sentinel watching them, all on free ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.master = RedisServer(root / "master", port=free_port(), appendonly=False)
        self.replica = RedisServer(root / "replica", port=free_port(), appendonly=False)
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelSetup:
        self.master.start()
        self.replica.start()
        replica = redis.Redis(port=self.replica.port)
        replica.replicaof("127.0.0.1", self.master.port)
        config = self.root / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.root}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        self.sentinel = subprocess.Popen(
            [str(find_server_binary()), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        client = redis.Redis(port=self.sentinel_port)
        while True:
            try:
                replicas = client.sentinel_slaves(SERVICE)
                linked = replica.info("replication").get("master_link_status") == "up"
                if replicas and linked:
                    break
            except (redis.ConnectionError, redis.ResponseError):
                pass
            assert time.monotonic() < deadline, "Sentinel did not see the replica"
            time.sleep(0.1)
        client.close()
        replica.close()
        return self

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.kill()
            self.sentinel.wait()
        self.master.stop()
        self.replica.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path).start()
    yield setup
    setup.stop()


def test_sentinel_urls_parse_and_name_no_password() -> None:
    settings = RedisSettings.from_url("redis+sentinel://:s3cret@h1:26379,h2/mymaster/2?timeout=1")
    assert settings.sentinel and settings.cluster is False and settings.command_timeout == 1
    assert settings.address == "mymaster via Sentinel h1:26379,h2"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379", "names no service"),
        ("redis+sentinel://h1:port/mymaster", "ports and the db number are integers"),
        ("redis+sentinel://h1/mymaster/zero", "ports and the db number are integers"),
    ],
)
async def test_bad_sentinel_urls_say_what_to_write(url: str, says: str) -> None:
    with pytest.raises(RateLimiterError, match=says):
        await connect(url)


async def test_the_sidecar_follows_a_sentinel_failover(sentinel: SentinelSetup, ns: str) -> None:
    async with running_upstream() as upstream:
        settings = one_model(ns, upstream)
        url = f"{sentinel.url}?timeout=0.5"
        async with running_sidecar(settings, url) as base, aiohttp.ClientSession() as session:
            admin = Admin(session, base)
            created = await admin.post("/key/generate", {"rpm_limit": 100})
            headers = {"Authorization": f"Bearer {created['key']}"}
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

            async def chat() -> int:
                async with session.post(
                    f"{base}/v1/chat/completions", json=body, headers=headers
                ) as response:
                    return response.status

            assert await chat() == 200
            await asyncio.sleep(0.2)  # the replica has the first request's writes
            sentinel.master.stop()
            deadline = time.monotonic() + 30
            while (status := await chat()) != 200:
                assert status == 503, status
                assert time.monotonic() < deadline, "no failover within 30 s"
                await asyncio.sleep(0.2)
        rpm = SlidingWindow(f"t:{ns}:{{key:{created['token']}}}:rpm", 100, "1m")
        async with await Engine.connect(url) as engine:  # the promoted replica has it all
            assert (await engine.peek([rpm]))[0].remaining == 98
