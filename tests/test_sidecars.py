"""Several sidecar processes on one Redis, or one Cluster, enforce one limit together, exactly;
one killed mid-stream leaves nothing held that another does not collect."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from ratelimiter.engine.embedded import free_port
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.testing.fake_upstream import FakeUpstream

from .conftest import Admin, running_sidecar, running_upstream

MASTER = "sk-two-sidecars-6b1e9d4f2a"


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with running_upstream(FakeUpstream(latency_ms=5)) as base:
        yield base


SIDECARS = 4


@pytest.fixture(params=["single", "cluster"])
def shared_redis(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster").url
    return request.getfixturevalue("redis_url")


@pytest.fixture
def sidecars(tmp_path: Path, shared_redis: str, upstream: str, ns: str) -> Iterator[list[str]]:
    """Four sidecar processes on one Redis (or one Cluster)."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
        f"      api_base: {upstream}\n      input_cost_per_token: 0.000001\n"
        f"ratelimiter_settings:\n  key_prefix: 't:{ns}:'\n"
    )
    env = {**os.environ, "REDIS_URL": shared_redis, "RATELIMITER_MASTER_KEY": MASTER}
    ports = [free_port() for _ in range(SIDECARS)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ratelimiter.cli",
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(20)


async def wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            async with session.get(f"{base}/health/readiness") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"{base} did not come up"
        await asyncio.sleep(0.1)


async def test_sidecars_admit_exactly_the_limit_asked_ten_times_over(
    sidecars: list[str],
) -> None:
    limit = 30
    async with aiohttp.ClientSession() as session:
        for base in sidecars:
            await wait_ready(session, base)
        admin = Admin(session, sidecars[0], MASTER)
        key = (await admin.post("/key/generate", {"rpm_limit": limit}))["key"]

        async def call(i: int) -> int:
            async with session.post(
                f"{sidecars[i % len(sidecars)]}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                return response.status

        statuses = await asyncio.gather(*(call(i) for i in range(10 * limit)))
        assert statuses.count(200) == limit
        assert statuses.count(429) == 9 * limit
        # Every admitted request has its one ledger entry, whichever sidecar served it.
        deadline = time.monotonic() + 10
        while len(logs := await admin.get("/spend/logs", api_key=key)) != limit:
            assert time.monotonic() < deadline, len(logs)
            await asyncio.sleep(0.1)


async def test_a_killed_sidecars_hold_is_charged_once_by_another(
    tmp_path: Path, redis_url: str, ns: str
) -> None:
    fake = FakeUpstream(chunk_delay_ms=100)
    async with running_upstream(fake) as upstream:
        config = tmp_path / "config.yaml"
        config.write_text(
            "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
            f"      api_base: {upstream}\n      input_cost_per_token: 0.000001\n"
            "      output_cost_per_token: 0.000001\n"
            f"ratelimiter_settings:\n  key_prefix: 't:{ns}:'\n  hold_ttl: 1\n"
        )
        port = free_port()
        doomed = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ratelimiter.cli",
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env={**os.environ, "REDIS_URL": redis_url, "RATELIMITER_MASTER_KEY": MASTER},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        settings = Settings(
            master_key=MASTER,
            key_prefix=f"t:{ns}:",
            hold_ttl_s=1,
            collect_interval_s=0.2,
            models=(Deployment("m", "openai/m", api_base=upstream, input_cost_per_token=1e-6),),
        )
        try:
            async with (
                running_sidecar(settings, redis_url) as survivor,
                aiohttp.ClientSession() as session,
            ):
                admin = Admin(session, survivor, MASTER)
                key = (
                    await admin.post("/key/generate", {"max_budget": 1, "max_parallel_requests": 1})
                )["key"]
                base = f"http://127.0.0.1:{port}"
                await wait_ready(session, base)
                async with session.post(
                    f"{base}/v1/chat/completions",
                    json={
                        "model": "m",
                        "stream": True,
                        "max_tokens": 100,
                        "messages": [{"role": "user", "content": "x" * 40}],
                    },
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 200
                    await response.content.readline()
                    doomed.kill()  # SIGKILL mid-stream: nothing gets settled
                    doomed.wait()
                deadline = time.monotonic() + 10
                while True:
                    logs = await admin.get("/spend/logs", api_key=key)
                    if logs:
                        break
                    assert time.monotonic() < deadline, "the dead sidecar's hold was not collected"
                    await asyncio.sleep(0.2)
                (entry,) = logs
                assert entry["ledger_status"] == "expired"
                assert entry["spend"] == entry["estimated_spend"] == pytest.approx(117e-6)
                info = (await admin.get("/key/info", key=key))["info"]
                assert info["spend"] == pytest.approx(117e-6)  # counters agree with the ledger
                async with session.post(  # and the lease came back
                    f"{survivor}/v1/chat/completions",
                    json={
                        "model": "m",
                        "max_tokens": 1,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 200
        finally:
            doomed.kill()
            doomed.wait()
