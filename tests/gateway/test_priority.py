"""Priority reservation on a shared deployment (issue 20 item 2), through running sidecars:
LiteLLM's ``priority_reservation`` config, priorities from key or team metadata, shares held
once the deployment is saturated, borrowing below it, TPM-only deployments, retry-after per
priority, and hostile settings.

The sidecars' engines run on one hand-moved clock, so windows pass exactly when the test says.
A request here is estimated at 17 prompt tokens (MESSAGES) plus its max_tokens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratelimiter import Engine
from ratelimiter.gateway.app import create_app
from ratelimiter.gateway.config import ConfigError, Deployment, Settings, load_config
from ratelimiter.gateway.priority import PriorityReservation

from ..conftest import MASTER_KEY, MESSAGES, Admin, ManualClock, running_upstream, serving

ESTIMATE = 17  # the sidecar's estimate of MESSAGES' prompt


@dataclass
class Deployed:
    bases: list[str]
    admin: Admin
    session: aiohttp.ClientSession
    clock: ManualClock

    async def key(self, priority: str | None = None, **fields: Any) -> str:
        if priority is not None:
            fields["metadata"] = {"priority": priority}
        return (await self.admin.post("/key/generate", fields))["key"]

    async def chat(self, key: str, base: int = 0, **body: Any) -> aiohttp.ClientResponse:
        async with self.session.post(
            f"{self.bases[base % len(self.bases)]}/v1/chat/completions",
            json={"model": "shared", "messages": MESSAGES, **body},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            await response.read()
            return response


@contextlib.asynccontextmanager
async def deployed(
    ns: str,
    redis_url: str,
    shares: dict[str, Any],
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    saturation: float = 0.5,
    default_priority: float = 0.25,
    count: int = 2,
    **options: Any,
) -> AsyncIterator[Deployed]:
    """``count`` sidecars sharing one Redis and one clock, serving model ``shared``."""
    clock = ManualClock()
    weights = {
        name: ("percent", value) if isinstance(value, float) else value
        for name, value in shares.items()
    }
    async with running_upstream() as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            models=(Deployment("shared", "openai/shared", api_base=upstream, rpm=rpm, tpm=tpm),),
            priority_reservation=PriorityReservation(weights, default_priority, saturation),
            **options,
        )
        async with contextlib.AsyncExitStack() as stack:
            bases = []
            for _ in range(count):
                engine = await Engine.connect(redis_url, prefix=settings.key_prefix, clock=clock)
                stack.push_async_callback(engine.close)
                bases.append(await stack.enter_async_context(serving(create_app(settings, engine))))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            yield Deployed(bases, Admin(session, bases[0]), session, clock)


async def burst(side: Deployed, keys: dict[str, str], each: int) -> dict[str, int]:
    """``each`` concurrent requests per priority, spread over the sidecars: admitted by priority."""
    names = [name for name in keys for _ in range(each)]
    answers = await asyncio.gather(*(side.chat(keys[name], base=n) for n, name in enumerate(names)))
    admitted = dict.fromkeys(keys, 0)
    for name, answer in zip(names, answers, strict=True):
        assert answer.status in (200, 429), answer.status
        admitted[name] += answer.status == 200
    return admitted


async def test_oversubscribed_priorities_each_get_their_share(ns: str, redis_url: str) -> None:
    """rpm 10 split prod 0.8 / dev 0.2, saturated at 5; both ask 10x the deployment's rpm, in
    bursts every 10 s for three minutes. Every window admits exactly 10. In the first (cold)
    window dev may borrow below the saturation level: it gets at most 5, prod at least 5; from
    then on prod is waiting whenever it is refused within its share, so nobody borrows its
    unused part and each window gives prod 8 and dev 2, exactly."""
    async with deployed(ns, redis_url, {"prod": 0.8, "dev": 0.2}, rpm=10) as side:
        keys = {"prod": await side.key("prod"), "dev": await side.key("dev")}
        per_burst = []
        for _ in range(18):  # 100 requests per minute per priority
            per_burst.append(await burst(side, keys, 17))
            side.clock.advance(10_000)
        windows = [per_burst[i : i + 6] for i in range(0, 18, 6)]
        totals = [{name: sum(b[name] for b in w) for name in keys} for w in windows]
        assert all(t["prod"] + t["dev"] == 10 for t in totals), totals
        assert totals[0]["dev"] <= 5 and totals[0]["prod"] >= 5, totals
        assert totals[1:] == [{"prod": 8, "dev": 2}] * 2, totals


async def test_below_saturation_nobody_is_refused(ns: str, redis_url: str) -> None:
    """rpm 100 split prod 0.9 / dev 0.1, saturated at 50: 25 requests of each priority at once
    (dev 2.5 times its share) all pass."""
    async with deployed(ns, redis_url, {"prod": 0.9, "dev": 0.1}, rpm=100) as side:
        keys = {"prod": await side.key("prod"), "dev": await side.key("dev")}
        assert await burst(side, keys, 25) == {"prod": 25, "dev": 25}
        assert (await side.chat(keys["dev"])).status == 429  # now past 50: dev holds to 10
        assert (await side.chat(keys["prod"])).status == 200


async def test_a_split_deployment_is_decided_in_redis_under_capacity_blocks(
    ns: str, redis_url: str
) -> None:
    """With capacity_blocks for deployments, a deployment split by priority is still checked
    in the atomic acquire with its shares (a block would leave the shares without their total):
    rpm 64, dev 0.25 (16), saturated at 0, so dev is held to 16."""
    async with deployed(
        ns, redis_url, {"dev": 0.25}, rpm=64, saturation=0.0, capacity_blocks={"deployment": 8}
    ) as side:
        dev = await side.key("dev")
        served = [(await side.chat(dev, base=n)).status for n in range(17)]
        assert served == [200] * 16 + [429]


async def test_a_tpm_only_deployment_is_split(ns: str, redis_url: str) -> None:
    """tpm 1000 and no rpm (LiteLLM #35422 skipped these): prod 0.8, dev 0.2, saturated at 500.
    Each request holds 100 tokens and settles at the fake's 93 (10 prompt + 83 completion)."""
    async with deployed(ns, redis_url, {"prod": 0.8, "dev": 0.2}, tpm=1000, count=1) as side:
        prod, dev = await side.key("prod"), await side.key("dev")
        size = {"max_tokens": 100 - ESTIMATE}
        for _ in range(5):  # dev borrows up to the saturation level: 5 x 100 held
            assert (await side.chat(dev, **size)).status == 200
        refused = await side.chat(dev, **size)  # 465 + 100 > 500, and 465 > dev's 200
        assert refused.status == 429
        error = (await refused.json())["error"]
        assert error["message"].startswith("Priority-based rate limit exceeded. Priority: dev, ")
        assert "Rate limit type: tokens" in error["message"]
        assert "largest max_tokens" not in error["message"]  # the total's room is not dev's
        assert error["type"] == "tokens"
        for _ in range(5):  # prod's own 800 is there
            assert (await side.chat(prod, **size)).status == 200
        full = await side.chat(prod, **size)  # 930 + 100 > 1000: the deployment is full
        assert full.status == 429
        assert "Rate limit exceeded for deployment" in (await full.json())["error"]["message"]


async def test_retry_after_is_each_prioritys_own(ns: str, redis_url: str) -> None:
    """rpm 10, prod 0.5 (5), dev 0.2 (2), saturated at 5. dev takes 3 at 0 s (one borrowed),
    prod 5 at 20 s; at 30 s both are past their shares above saturation: dev's own window frees
    at 61 s, prod's at 81 s (a 1 s bucket past the 60 s window)."""
    async with deployed(ns, redis_url, {"prod": 0.5, "dev": 0.2}, rpm=10) as side:
        prod, dev = await side.key("prod"), await side.key("dev")
        for _ in range(3):
            assert (await side.chat(dev)).status == 200
        side.clock.advance(20_000)
        for _ in range(5):
            assert (await side.chat(prod)).status == 200
        side.clock.advance(10_000)
        for key, seconds in ((dev, 31), (prod, 51)):
            refused = await side.chat(key)
            assert refused.status == 429
            assert refused.headers["retry-after-ms"] == str(seconds * 1000)
            assert refused.headers["retry-after"] == str(seconds)


async def test_team_priority_comes_first_and_others_share_the_default_pool(
    ns: str, redis_url: str
) -> None:
    """A team's metadata.priority wins over its key's (LiteLLM's order); a key with no priority,
    or one not configured, counts in default_pool, whose share is default_priority (0.1 of rpm
    20 here: 2); saturated at 0, so every pool is held to its share at once."""
    async with deployed(
        ns, redis_url, {"prod": 0.5}, rpm=20, saturation=0.0, default_priority=0.1, count=1
    ) as side:
        team = await side.admin.post("/team/new", {"metadata": {"priority": "prod"}})
        in_team = await side.key("unknown", team_id=team["team_id"])
        nobody, stranger = await side.key(), await side.key("no-such-priority")
        served = [(await side.chat(in_team)).status for _ in range(11)]
        assert served == [200] * 10 + [429]
        pooled = [(await side.chat(k)).status for k in (nobody, stranger, nobody)]
        assert pooled == [200, 200, 429]
        body = await (await side.chat(stranger)).json()
        assert "Priority: default_pool" in body["error"]["message"]


@pytest.mark.parametrize("priority", [123, ["prod"], {"prod": 1}, "", "prod" * 5_000, None])
async def test_an_odd_metadata_priority_counts_in_the_default_pool(
    ns: str, redis_url: str, priority: Any
) -> None:
    """Whatever a key's metadata.priority holds, it is served from default_pool (1 of rpm 10
    here, saturated at 0), never an error."""
    async with deployed(
        ns, redis_url, {"prod": 0.5}, rpm=10, saturation=0.0, default_priority=0.1, count=1
    ) as side:
        key = (await side.admin.post("/key/generate", {"metadata": {"priority": priority}}))["key"]
        assert (await side.chat(key)).status == 200
        refused = await side.chat(key)
        assert refused.status == 429
        assert "Priority: default_pool" in (await refused.json())["error"]["message"]


def write(tmp_path: Path, litellm: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: m\n"
        "    litellm_params: {model: openai/m, api_base: 'http://127.0.0.1:1', rpm: 10}\n"
        f"general_settings: {{master_key: {MASTER_KEY}}}\n"
        f"litellm_settings:\n{litellm}"
    )
    return path


def test_litellm_config_is_read_unchanged(tmp_path: Path) -> None:
    settings = load_config(
        write(
            tmp_path,
            "  callbacks: ['dynamic_rate_limiter_v3']\n"
            "  priority_reservation: {prod: 0.9, dev: {type: rpm, value: 1}, x: {type: percent}}\n"
            "  priority_reservation_settings:\n"
            "    default_priority: 0\n"
            "    saturation_threshold: 0.8\n"
            "    saturation_check_cache_ttl: 60\n",
        )
    )
    reservation = settings.priority_reservation
    assert reservation is not None
    assert (reservation.default_priority, reservation.saturation_threshold) == (0.0, 0.8)
    # 0.9 + 0.1 + 1.0 is over 1: scaled down as LiteLLM does; the default pool is apart
    fractions = reservation.fractions(10, None)
    assert fractions == pytest.approx({"prod": 0.45, "dev": 0.05, "x": 0.5, "default_pool": 0})
    assert load_config(write(tmp_path, "  max_budget: 1\n")).priority_reservation is None


@pytest.mark.parametrize(
    ("litellm", "problem"),
    [
        ("  priority_reservation: [prod]\n", "priority_reservation: must map priority names"),
        ("  priority_reservation: {prod: -1}\n", "priority_reservation.prod: must be a non-neg"),
        ("  priority_reservation: {prod: 1.5}\n", "priority_reservation.prod: must be a fraction"),
        ("  priority_reservation: {prod: .nan}\n", "priority_reservation.prod: must be"),
        ("  priority_reservation: {prod: true}\n", "priority_reservation.prod: must be"),
        ("  priority_reservation: {prod: 'lots'}\n", "priority_reservation.prod: must be"),
        ("  priority_reservation: {'a b': 0.1}\n", "priority name 'a b' must be"),
        ("  priority_reservation: {'" + "p" * 65 + "': 0.1}\n", "must be 1 to 64"),
        ("  priority_reservation: {p: {type: rps, value: 1}}\n", "p.type: must be percent"),
        ("  priority_reservation: {p: {type: rpm, value: -3}}\n", "p.value: must be a non-neg"),
        ("  priority_reservation: {p: {kind: rpm}}\n", "p.kind: unknown setting"),
        (
            "  priority_reservation: {p: 0.1}\n"
            "  priority_reservation_settings: {saturation_threshold: 2}\n",
            "saturation_threshold: must be a fraction from 0 to 1",
        ),
        (
            "  priority_reservation: {p: 0.1}\n"
            "  priority_reservation_settings: {default_priority: -0.5}\n",
            "default_priority: must be a non-negative number",
        ),
        (
            "  priority_reservation: {p: 0.1}\n"
            "  priority_reservation_settings: {saturation_treshold: 0.5}\n",
            "did you mean 'saturation_threshold'",
        ),
        (
            "  priority_reservation: {p: 0.1}\n  priority_reservation_settings: [1]\n",
            "priority_reservation_settings: must be a mapping",
        ),
    ],
)
def test_hostile_settings_are_refused_with_their_path(
    tmp_path: Path, litellm: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match="litellm_settings") as error:
        load_config(write(tmp_path, litellm))
    assert problem in str(error.value)


def test_too_many_priorities_are_refused(tmp_path: Path) -> None:
    many = ", ".join(f"p{n}: 0.01" for n in range(65))
    with pytest.raises(ConfigError, match="has 65 priorities; at most 64"):
        load_config(write(tmp_path, f"  priority_reservation: {{{many}}}\n"))
