"""Small budgets and token windows through the proxy (issue 15 item 7): a request that sets
max_tokens is held in full; one that does not is held capped at what is left (the default) or,
under budget_enforcement: strict, sent with max_tokens set to what its limits afford.

The fake upstream answers a request without max_tokens with 16 completion tokens and one with
max_tokens with exactly that many; it counts MESSAGES as 10 prompt tokens, the sidecar's
estimate as 17 (its text plus the message and reply overheads). gpt-4o here costs $1 per
million prompt tokens and $2 per million completion tokens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratelimiter import Budget, Concurrency, Engine, SlidingWindow
from ratelimiter.engine import LimitState
from ratelimiter.gateway.config import ConfigError, Deployment, Settings, load_config
from ratelimiter.gateway.policy import completion_room
from ratelimiter.pricing import cost_nano, nano
from ratelimiter.testing import FakeUpstream

from ..conftest import MASTER_KEY, MESSAGES, Admin, running_sidecar, running_upstream

PROMPT, FAKE_COMPLETION = 10, 16  # tokens of MESSAGES; what the fake writes without max_tokens
ESTIMATE = 17  # the sidecar's estimate of MESSAGES
PRICE_IN, PRICE_OUT = 1e-6, 2e-6


@dataclass
class Sidecars:
    bases: list[str]
    admin: Admin
    session: aiohttp.ClientSession

    async def key(self, **fields: object) -> str:
        return (await self.admin.post("/key/generate", fields))["key"]

    async def chat(self, key: str, base: str | None = None, **body: Any) -> tuple[int, dict]:
        async with self.session.post(
            f"{base or self.bases[0]}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, **body},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            return response.status, await response.json()


@contextlib.asynccontextmanager
async def sidecars(
    ns: str, redis_url: str, enforcement: str, count: int = 1, latency_ms: float = 0.0
) -> AsyncIterator[Sidecars]:
    """``count`` sidecars sharing one Redis, default_max_tokens 4096 as shipped."""
    async with running_upstream(FakeUpstream(latency_ms=latency_ms)) as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            budget_enforcement=enforcement,
            models=(
                Deployment(
                    "gpt-4o",
                    "openai/gpt-4o",
                    api_base=upstream,
                    input_cost_per_token=PRICE_IN,
                    output_cost_per_token=PRICE_OUT,
                ),
            ),
        )
        async with contextlib.AsyncExitStack() as stack:
            bases = [
                await stack.enter_async_context(running_sidecar(settings, redis_url))
                for _ in range(count)
            ]
            session = await stack.enter_async_context(aiohttp.ClientSession())
            yield Sidecars(bases, Admin(session, bases[0]), session)


def cost(usage: dict[str, int]) -> float:
    return usage["prompt_tokens"] * PRICE_IN + usage["completion_tokens"] * PRICE_OUT


# -- capped (the default) ---------------------------------------------------------------


async def test_a_small_token_window_serves_its_first_unbounded_request(
    ns: str, redis_url: str
) -> None:
    async with sidecars(ns, redis_url, "capped") as side:
        key = await side.key(tpm_limit=20)
        status, first = await side.chat(key)
        assert status == 200, first
        assert first["usage"]["total_tokens"] == PROMPT + FAKE_COMPLETION  # 6 past, alone
        status, second = await side.chat(key)
        assert status == 429
        assert "Limit type: tokens." in second["error"]["message"]


async def test_a_small_budget_serves_unbounded_requests_until_it_is_spent(
    ns: str, redis_url: str
) -> None:
    async with sidecars(ns, redis_url, "capped") as side:
        key = await side.key(max_budget=0.001)  # each request could cost $0.0082
        spent, served = 0.0, 0
        while True:
            status, answer = await side.chat(key)
            if status != 200:
                break
            spent, served = spent + cost(answer["usage"]), served + 1
        assert answer["error"]["type"] == "budget_exceeded", answer
        one = PROMPT * PRICE_IN + FAKE_COMPLETION * PRICE_OUT
        assert served == 24  # $0.000042 each: 23 fit whole, the 24th takes the last $0.000034
        assert 0.001 < spent <= 0.001 + one
        info = await side.admin.get("/key/info", key=key)
        assert info["info"]["spend"] == pytest.approx(spent)


async def test_a_bounded_request_is_held_in_full(ns: str, redis_url: str) -> None:
    async with sidecars(ns, redis_url, "capped") as side:
        tokens = await side.key(tpm_limit=20)
        status, answer = await side.chat(tokens, max_tokens=16)  # 17 + 16 tokens > 20
        assert (status, answer["error"]["code"]) == (429, "rate_limit_exceeded")
        assert (await side.chat(tokens, max_completion_tokens=3))[0] == 200

        budget = await side.key(max_budget=0.0001)
        status, answer = await side.chat(budget, max_tokens=100)  # $0.000217 > $0.0001
        assert (status, answer["error"]["type"]) == (429, "budget_exceeded")
        status, answer = await side.chat(budget, max_tokens=41)
        assert status == 200 and cost(answer["usage"]) == pytest.approx(0.000092)


async def test_completion_room_is_the_largest_max_tokens_that_fits(engine: Engine, ns: str) -> None:
    """What a refusal of a bounded request can offer: from the states of the refusal."""
    price = (PRICE_IN, PRICE_OUT)
    tpm = SlidingWindow(f"{ns}:tpm", 20, "1m", ESTIMATE + 16, measure="tokens")
    budget = Budget(f"{{{ns}}}:b", nano(0.0001), "1d", nano(ESTIMATE * PRICE_IN + 100 * PRICE_OUT))
    refused = await engine.acquire(None, [tpm, budget, Concurrency(f"{ns}:par", 5)])
    assert not refused.allowed
    assert completion_room(refused.states, ESTIMATE, price, 1) == 3  # the window's 20 - 17
    assert completion_room(refused.states[1:], ESTIMATE, price, 1) == 41  # (100 - 17) / 2
    assert completion_room(refused.states[1:], ESTIMATE, price, 2) == 20  # n = 2
    assert completion_room(refused.states[2:], ESTIMATE, price, 1) is None  # a lease
    assert completion_room(refused.states[1:], ESTIMATE, None, 1) is None  # unpriced
    assert completion_room(refused.states, 25, price, 1) == 0  # not even the prompt fits


@given(
    left=st.integers(0, 2**53 - 1),
    prompt=st.integers(0, 10**6),
    price=st.tuples(
        st.sampled_from([0.0, 1e-7, 1.5e-7, 1e-6, 2.5e-6, 3e-5]),
        st.sampled_from([1e-7, 6e-7, 2e-6, 1e-5, 6e-5, 1.3e-6]),
    ),
    choices=st.integers(1, 8),
)
def test_completion_room_is_exact_for_a_budget(
    left: int, prompt: int, price: tuple[float, float], choices: int
) -> None:
    """The room fits the budget's estimate, and one token more per choice would not."""
    state = LimitState(Budget("{b}:b", 10**12, "1d", 0), left, 0)
    room = completion_room([state], prompt, price, choices)
    assert room is not None and room >= 0
    if cost_nano(price, prompt, 0) <= left:
        assert cost_nano(price, prompt, room * choices) <= left
    assert cost_nano(price, prompt, (room + 1) * choices) > left


# -- strict -------------------------------------------------------------------------------


async def test_strict_sends_what_the_tightest_limit_affords(ns: str, redis_url: str) -> None:
    async with sidecars(ns, redis_url, "strict") as side:
        key = await side.key(tpm_limit=200, max_budget=0.0005)  # $0.0005 affords 241 tokens
        status, answer = await side.chat(key)
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] == 200 - ESTIMATE
        assert answer["choices"][0]["finish_reason"] == "length"  # the upstream got max_tokens
        status, answer = await side.chat(key)  # it affords 0, below the minimum of 16
        assert (status, answer["error"]["code"]) == (429, "rate_limit_exceeded")
        assert set(answer["error"]) == {"message", "type", "param", "code"}

        budget = await side.key(max_budget=0.0005)
        status, answer = await side.chat(budget)
        assert answer["usage"]["completion_tokens"] == (500 - ESTIMATE) // 2
        status, answer = await side.chat(budget)
        assert (status, answer["error"]["type"]) == (429, "budget_exceeded")


async def test_strict_keeps_the_clients_own_bound_and_default(ns: str, redis_url: str) -> None:
    async with sidecars(ns, redis_url, "strict") as side:
        roomy = await side.key(tpm_limit=100_000)
        _, answer = await side.chat(roomy)
        assert answer["usage"]["completion_tokens"] == 4096  # default_max_tokens
        _, answer = await side.chat(roomy, max_tokens=7)
        assert answer["usage"]["completion_tokens"] == 7
        unlimited = await side.key()
        assert (await side.chat(unlimited))[1]["usage"]["completion_tokens"] == 4096


async def test_strict_bounds_a_stream_and_a_legacy_completion(ns: str, redis_url: str) -> None:
    async with sidecars(ns, redis_url, "strict") as side:
        key = await side.key(tpm_limit=100)
        headers = {"Authorization": f"Bearer {key}"}
        async with side.session.post(
            f"{side.bases[0]}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers=headers,
        ) as response:
            assert response.status == 200
            words = (await response.text()).count('"content":')
        assert words == 100 - ESTIMATE  # one word per chunk, as many as max_tokens
        legacy = {"model": "gpt-4o", "prompt": "x" * 40, "n": 2}  # a 10-token prompt
        async with side.session.post(
            f"{side.bases[0]}/v1/completions", json=legacy, headers=headers
        ) as response:
            assert response.status == 429  # 7 left: under 10 + 2 x 16
        roomy = {"Authorization": f"Bearer {await side.key(tpm_limit=200)}"}
        async with side.session.post(
            f"{side.bases[0]}/v1/completions", json=legacy, headers=roomy
        ) as response:
            answer = await response.json()
        assert answer["usage"]["completion_tokens"] == (200 - 10) // 2  # max_tokens per choice


# -- under concurrency ----------------------------------------------------------------------

TASKS, ROUNDS = 20, 40


async def load(side: Sidecars, key: str) -> list[dict[str, int]]:
    """TASKS clients at once, spread over the sidecars, each sending ROUNDS requests without
    max_tokens one after another; the usage of those served."""

    async def client(i: int) -> list[tuple[int, dict]]:
        return [await side.chat(key, side.bases[i % len(side.bases)]) for _ in range(ROUNDS)]

    answers = [a for many in await asyncio.gather(*map(client, range(TASKS))) for a in many]
    assert {status for status, _ in answers} <= {200, 429}
    return [answer["usage"] for status, answer in answers if status == 200]


@pytest.mark.parametrize("enforcement", ["capped", "strict"])
async def test_overshoot_under_concurrency(ns: str, redis_url: str, enforcement: str) -> None:
    """Two sidecars, 20 concurrent clients of 40 requests each without max_tokens, against a
    300-token window and, on another key, a $0.0005 budget (the upstream takes 10 ms). Capped:
    each limit is passed by at most one request's excess (what it used beyond the part it
    took, at most its whole usage: 26 tokens, $0.000042). Strict: never passed."""
    async with sidecars(ns, redis_url, enforcement, count=2, latency_ms=10) as side:
        window = await load(side, await side.key(tpm_limit=300))
        budget = await load(side, await side.key(max_budget=0.0005))
    tokens = sum(u["total_tokens"] for u in window)
    spend = sum(cost(u) for u in budget)
    print(f"\n{enforcement}: {len(window)} served, {tokens} tokens of 300; ", end="")
    print(f"{len(budget)} served, ${spend:.6f} of $0.0005")
    assert window and budget
    if enforcement == "capped":
        one_tokens = PROMPT + FAKE_COMPLETION
        one_spend = PROMPT * PRICE_IN + FAKE_COMPLETION * PRICE_OUT
        assert tokens <= 300 + one_tokens
        assert spend <= 0.0005 + one_spend + 1e-12
    else:
        assert tokens <= 300
        assert spend <= 0.0005 + 1e-12


# -- configuration ---------------------------------------------------------------------------


def test_budget_enforcement_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("ratelimiter_settings:\n  budget_enforcement: strict\n")
    env = {"RATELIMITER_MASTER_KEY": MASTER_KEY}
    assert load_config(path, env=env).budget_enforcement == "strict"
    path.write_text("ratelimiter_settings: {}\n")
    assert load_config(path, env=env).budget_enforcement == "capped"
    path.write_text("ratelimiter_settings:\n  budget_enforcement: hard\n")
    with pytest.raises(ConfigError, match=r"budget_enforcement: must be capped .* got 'hard'"):
        load_config(path, env=env)
