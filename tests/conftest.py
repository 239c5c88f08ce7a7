"""Real Redis servers for the suite: each started on a free port, never the standard one."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis
from aiohttp import web

from ratelimiter import Engine, RedisServer
from ratelimiter.engine.embedded import free_port
from ratelimiter.gateway.app import create_app
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.testing.fake_upstream import FakeUpstream, create_fake_upstream


class ManualClock:
    """A clock the test moves by hand, in milliseconds (passed to Engine as ``clock``)."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def start_server(path: Path, **options: object) -> RedisServer:
    return RedisServer(path, port=free_port(), appendonly=False, **options).start()  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="module")
def _older_objects_frozen() -> None:
    """Sidecars under test share this process's garbage collector. After a few hundred tests
    its heap holds about two million objects, and one full collection took up to 2 s
    (measured with gc.callbacks over tests/gateway): longer than a sidecar's redis_timeout, so
    a request that met one answered 503. What earlier modules left is collected once here and
    then frozen, so later collections walk only the current module's objects."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def ns() -> str:
    """A namespace so tests sharing a server never share keys."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def engine(redis_url: str, ns: str) -> AsyncIterator[Engine]:
    async with await Engine.connect(redis_url, prefix=f"t:{ns}:") as eng:
        yield eng


@pytest.fixture
async def clocked(redis_url: str, ns: str, clock: ManualClock) -> AsyncIterator[Engine]:
    """An engine on a hand-moved clock, for exact timing assertions."""
    async with await Engine.connect(
        redis_url, prefix=f"t:{ns}:", clock=clock, hold_ttl_ms=20_000
    ) as eng:
        yield eng


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too, so at most 55535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def cluster_node(directory: Path, node_timeout_ms: int = 2000) -> RedisServer:
    """A Redis server in Cluster mode on a free port pair, not yet started."""
    return RedisServer(
        directory,
        port=cluster_port(),
        appendonly=False,
        extra_args=(
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(directory / "nodes.conf"),
            "--cluster-node-timeout",
            str(node_timeout_ms),
        ),
    )


class Cluster:
    def __init__(self, root: Path, masters: int = 3) -> None:
        self.servers = [cluster_node(root / f"node{i}") for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}/0"

    def start(self) -> Cluster:
        for server in self.servers:
            server.start()
        clients = [redis.Redis(port=s.port) for s in self.servers]
        step = 16384 // len(clients)
        for i, client in enumerate(clients):
            last = 16383 if i == len(clients) - 1 else (i + 1) * step - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        for server in self.servers[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        deadline = time.monotonic() + 30
        while not all(c.cluster("info")["cluster_state"] == "ok" for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not converge in 30 s")
            time.sleep(0.05)
        for client in clients:
            client.close()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def cluster_engine(redis_cluster: Cluster, ns: str) -> AsyncIterator[Engine]:
    async with await Engine.connect(redis_cluster.url, prefix=f"t:{ns}:") as eng:
        assert eng.cluster
        yield eng


MASTER_KEY = "sk-test-master-7f3a9c2e5b1d"


def one_model(ns: str, upstream: str, **options: Any) -> Settings:
    """Sidecar settings with one model, ``m``, at $1 per million prompt tokens."""
    return Settings(
        master_key=MASTER_KEY,
        key_prefix=f"t:{ns}:",
        models=(Deployment("m", "openai/m", api_base=upstream, input_cost_per_token=1e-6),),
        **options,
    )


@contextlib.asynccontextmanager
async def running_sidecar(settings: Settings, redis_url: str) -> AsyncIterator[str]:
    """The sidecar's app served over real HTTP on a free port; yields its base URL."""
    engine = await Engine.connect(
        redis_url, prefix=settings.key_prefix, hold_ttl_ms=round(settings.hold_ttl_s * 1000)
    )
    async with serving(create_app(settings, engine)) as base:
        yield base


@contextlib.asynccontextmanager
async def running_upstream(fake: FakeUpstream | None = None) -> AsyncIterator[str]:
    """The fake OpenAI upstream over real HTTP on a free port; yields its /v1 base URL."""
    async with serving(create_fake_upstream(fake)) as base:
        yield f"{base}/v1"


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` over real HTTP on a free port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def settings(ns: str) -> Settings:
    return Settings(master_key=MASTER_KEY, key_prefix=f"t:{ns}:")


class Admin:
    """A small client for the admin API."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str = MASTER_KEY) -> None:
        self.session, self.base, self.key = session, base, key

    async def call(
        self, method: str, path: str, body: object = None, **params: str
    ) -> tuple[int, dict]:
        async with self.session.request(
            method,
            self.base + path,
            json=body,
            params=params or None,
            headers={"Authorization": f"Bearer {self.key}"},
        ) as response:
            return response.status, await response.json(content_type=None)

    async def post(self, path: str, body: object = None) -> dict:
        status, payload = await self.call("POST", path, body if body is not None else {})
        assert status == 200, payload
        return payload

    async def get(self, path: str, **params: str) -> dict:
        status, payload = await self.call("GET", path, **params)
        assert status == 200, payload
        return payload


@pytest.fixture
async def admin(settings: Settings, redis_url: str) -> AsyncIterator[Admin]:
    async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as session:
        yield Admin(session, base)


MESSAGES = [{"role": "user", "content": "x" * 40}]  # 10 prompt tokens


@dataclass
class Stack:
    base: str
    admin: Admin
    fake: FakeUpstream
    engine: Engine
    settings: Settings
    clients: list[openai.AsyncOpenAI]

    def client(self, key: str, retries: int = 0) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=retries)
        self.clients.append(client)
        return client

    async def key(self, **fields: object) -> str:
        return (await self.admin.post("/key/generate", fields))["key"]


@pytest.fixture
async def stack(ns: str, redis_url: str) -> AsyncIterator[Stack]:
    fake = FakeUpstream(seed=7)
    async with running_upstream(fake) as upstream:
        async for stack in _stack(ns, redis_url, fake, upstream):
            yield stack


async def _stack(
    ns: str, redis_url: str, fake: FakeUpstream, upstream: str
) -> AsyncIterator[Stack]:
    settings = Settings(
        master_key=MASTER_KEY,
        key_prefix=f"t:{ns}:",
        default_max_tokens=16,
        upstream_timeout_s=0.5,
        models=(
            Deployment(
                "gpt-4o",
                "openai/gpt-4o",
                api_base=upstream,
                api_key="sk-up",
                input_cost_per_token=1e-6,
                output_cost_per_token=2e-6,
                index=0,
            ),
            Deployment("embed", "openai/text-embedding-3-small", api_base=upstream, index=1),
            Deployment(
                "down", "openai/down", api_base=f"http://127.0.0.1:{free_port()}/v1", index=2
            ),
        ),
    )
    async with (
        running_sidecar(settings, redis_url) as base,
        aiohttp.ClientSession() as session,
        await Engine.connect(redis_url, prefix=settings.key_prefix) as engine,
    ):
        stack = Stack(base, Admin(session, base), fake, engine, settings, [])
        yield stack
        for client in stack.clients:
            await client.close()


@pytest.fixture
def upstream_in_thread() -> Iterator[tuple[str, FakeUpstream]]:
    """The fake upstream on its own event loop, for the synchronous completion()."""
    fake = FakeUpstream()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    url: list[str] = []

    async def serve(stop: asyncio.Event) -> None:
        async with running_upstream(fake) as base:
            url.append(base)
            started.set()
            await stop.wait()

    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(stop),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield url[0], fake
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
