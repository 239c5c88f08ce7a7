"""The LiteLLM-compatible BudgetManager on its three stores, and max_budget with completion().

Each store is real: a JSON file shared by threads and processes, a Redis server, and the
sidecar serving LiteLLM's hosted protocol. The LLM is the fake upstream over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import ratelimiter
from ratelimiter import BudgetExceededError, BudgetManager, UnknownModel, UnknownUser
from ratelimiter.gateway.config import Settings
from ratelimiter.testing.fake_upstream import FakeUpstream

from ..conftest import MASTER_KEY, running_sidecar, running_upstream

THREADS, PROCESSES, UPDATES = 8, 4, 10
INPUT, OUTPUT = "hello world", "it's a sunny day in san francisco"
# gpt-3.5-turbo (genai-prices): 3 prompt tokens at $0.5/M, 9 completion tokens at $1.5/M
# (chars / 4), in whole nano-dollars as every cost is counted
TEXT_COST = round((3 * 0.5e-6 + 9 * 1.5e-6) * 1e9) / 1e9


def at(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "redis"])
def make_manager(
    request: pytest.FixtureRequest, tmp_path: Path, ns: str
) -> Callable[..., BudgetManager]:
    def make(**options: Any) -> BudgetManager:
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            return BudgetManager(f"p-{ns}", client_type="redis", redis_url=url, **options)
        return BudgetManager(f"p-{ns}", path=tmp_path / "user_cost.json", **options)

    return make


# -- the methods ----------------------------------------------------------------------


def test_budget_life_cycle(make_manager: Callable[..., BudgetManager]) -> None:
    manager = make_manager()
    assert not manager.is_valid_user("ann")
    manager.create_budget(total_budget=10, user="ann", duration="daily")
    assert manager.is_valid_user("ann") and manager.get_users() == ["ann"]
    assert manager.get_total_budget("ann") == 10
    manager.update_cost(user="ann", model="gpt-3.5-turbo", input_text=INPUT, output_text=OUTPUT)
    completion = {
        "model": "gpt-4o-2024-08-06",
        "usage": {"prompt_tokens": 100, "completion_tokens": 10},
        "choices": [{"message": {"content": "hi"}}],
    }
    manager.update_cost(user="ann", completion_obj=completion)
    gpt4o = 100 * 2.5e-6 + 10 * 10e-6
    assert manager.get_current_cost("ann") == pytest.approx(TEXT_COST + gpt4o)
    assert manager.get_model_cost("ann") == pytest.approx(
        {"gpt-3.5-turbo": TEXT_COST, "gpt-4o-2024-08-06": gpt4o}
    )
    again = make_manager()  # another instance sees the same store
    assert again.get_current_cost("ann") == pytest.approx(TEXT_COST + gpt4o)
    assert again.reset_cost("ann")["user"]["current_cost"] == 0
    assert manager.get_current_cost("ann") == 0 and manager.get_model_cost("ann") == {}
    manager.update_cost(user="ann", model="gpt-3.5-turbo", input_text=INPUT, output_text=OUTPUT)
    assert manager.get_current_cost("ann") == pytest.approx(TEXT_COST)
    assert manager.save_data() == {"status": "success"}


def test_projected_cost_counts_the_text_of_multimodal_messages(
    make_manager: Callable[..., BudgetManager],
) -> None:
    manager = make_manager()
    manager.create_budget(total_budget=1, user="bo")
    messages = [
        {"role": "system", "content": "x" * 40},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "y" * 40},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
    ]
    assert manager.projected_cost("gpt-4o", messages, "bo") == pytest.approx(20 * 2.5e-6)


def test_clear_errors(make_manager: Callable[..., BudgetManager]) -> None:
    manager = make_manager()
    with pytest.raises(UnknownUser, match=r"no budget for user 'nobody': call create_budget"):
        manager.get_current_cost("nobody")
    with pytest.raises(KeyError):  # what LiteLLM raised, for code that catches it
        manager.update_cost(user="nobody", model="gpt-4o", input_text="a", output_text="b")
    manager.create_budget(total_budget=1, user="cy")
    with pytest.raises(UnknownModel, match="register_model"):
        manager.update_cost(user="cy", model="my-own-model", input_text="a", output_text="b")
    with pytest.raises(ValueError, match="duration must be one of daily, weekly"):
        manager.create_budget(total_budget=1, user="cy", duration="fortnightly")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a completion object"):
        manager.update_cost(user="cy")
    with pytest.raises(ValueError, match="total_budget must be a number"):
        manager.create_budget(total_budget="ten", user="cy")  # type: ignore[arg-type]
    assert manager.get_current_cost("cy") == 0  # nothing was charged by the failed calls


def test_a_month_is_a_month(make_manager: Callable[..., BudgetManager]) -> None:
    clock = Clock(at(2027, 1, 3, 12))
    manager = make_manager(clock=clock)
    manager.create_budget(total_budget=5, user="dee", duration="monthly")
    manager.update_cost(user="dee", model="gpt-3.5-turbo", input_text=INPUT, output_text=OUTPUT)
    clock.now = at(2027, 1, 31, 23, 59, 59)  # 28 days on, LiteLLM would have reset already
    manager.update_budget_all_users()
    assert manager.get_current_cost("dee") == pytest.approx(TEXT_COST)
    clock.now = at(2027, 2, 1, 0, 0, 1)  # the month is over
    assert manager.get_current_cost("dee") == 0 and manager.get_model_cost("dee") == {}
    manager.update_cost(user="dee", model="gpt-3.5-turbo", input_text=INPUT, output_text=OUTPUT)
    manager.reset_on_duration("dee")  # already in the new period: nothing to reset
    assert manager.get_current_cost("dee") == pytest.approx(TEXT_COST)
    clock.now = at(2027, 3, 1, 0, 0, 0)  # February has 28 days; the reset comes on the 1st
    manager.update_budget_all_users()
    assert manager.get_current_cost("dee") == 0
    assert manager.user_dict["dee"]["last_updated_at"] == clock.now


def test_a_budget_in_another_time_zone_resets_at_its_midnight(
    make_manager: Callable[..., BudgetManager],
) -> None:
    clock = Clock(at(2027, 5, 10, 12))
    manager = make_manager(clock=clock, timezone="America/New_York")
    manager.create_budget(total_budget=5, user="eve", duration="daily")
    manager.update_cost(user="eve", model="gpt-3.5-turbo", input_text=INPUT, output_text=OUTPUT)
    clock.now = at(2027, 5, 11, 3, 59)  # 23:59 in New York
    assert manager.get_current_cost("eve") == pytest.approx(TEXT_COST)
    clock.now = at(2027, 5, 11, 4, 0)  # midnight there
    assert manager.get_current_cost("eve") == 0


def test_a_litellm_file_is_read_as_it_was_meant(tmp_path: Path) -> None:
    path = tmp_path / "user_cost.json"
    clock = Clock(at(2027, 1, 20))
    litellm_file = {
        "old": {
            "total_budget": 10,
            "duration": 28,  # LiteLLM's "monthly"
            "created_at": at(2027, 1, 2),
            "last_updated_at": at(2027, 1, 2),
            "current_cost": 1.5,
            "model_cost": {"gpt-4": 1.5},
        },
        "plain": {"total_budget": 3, "current_cost": 0.25},
    }
    path.write_text(json.dumps(litellm_file))
    manager = BudgetManager("p", path=path, clock=clock)
    assert manager.get_current_cost("old") == 1.5 and manager.get_current_cost("plain") == 0.25
    assert manager.user_dict["old"]["duration"] == "monthly"
    manager.update_cost(user="old", model="gpt-3.5-turbo", input_text=INPUT, output_text=OUTPUT)
    assert manager.get_current_cost("old") == pytest.approx(1.5 + TEXT_COST)  # same month
    clock.now = at(2027, 2, 1)
    assert manager.get_current_cost("old") == 0 and manager.get_current_cost("plain") == 0.25


def test_a_corrupt_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "user_cost.json"
    path.write_text("{not json")
    with pytest.raises(ratelimiter.RateLimiterError, match="is not valid JSON"):
        BudgetManager("p", path=path)
    assert path.read_text() == "{not json"


# -- no update lost -------------------------------------------------------------------


def _hammer(kind: str, target: str, project: str) -> None:
    """One process: THREADS threads, each adding UPDATES costs."""
    if kind == "redis":
        manager = BudgetManager(project, client_type="redis", redis_url=target)
    else:
        manager = BudgetManager(project, path=target)

    def work(_: int) -> None:
        for _ in range(UPDATES):
            manager.update_cost(
                user="shared", model="gpt-3.5-turbo", input_text=INPUT, output_text=OUTPUT
            )

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(work, range(THREADS)))


def test_threads_and_processes_lose_no_update(
    make_manager: Callable[..., BudgetManager], tmp_path: Path, ns: str
) -> None:
    manager = make_manager()
    manager.create_budget(total_budget=100, user="shared", duration="yearly")
    if manager.client_type == "redis":
        target = manager.store.redis.connection_pool.connection_kwargs  # type: ignore[attr-defined]
        target = f"redis://{target['host']}:{target['port']}"
    else:
        target = str(tmp_path / "user_cost.json")
    ctx = multiprocessing.get_context("spawn")
    processes = [
        ctx.Process(target=_hammer, args=(manager.client_type, target, f"p-{ns}"))
        for _ in range(PROCESSES)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    expected = PROCESSES * THREADS * UPDATES * TEXT_COST
    assert manager.get_current_cost("shared") == pytest.approx(expected, rel=1e-9)
    assert manager.get_model_cost("shared")["gpt-3.5-turbo"] == pytest.approx(expected, rel=1e-9)


# -- max_budget and completion() --------------------------------------------------------


@pytest.fixture
def budget() -> Iterator[None]:
    from ratelimiter.library import sdk

    before = ratelimiter.max_budget
    sdk.SPEND.spent = sdk.SPEND.reserved = 0.0
    yield
    ratelimiter.max_budget = before
    sdk.SPEND.spent = sdk.SPEND.reserved = 0.0


def test_max_budget_refuses_the_call_that_would_pass_it_before_sending(
    upstream_in_thread: tuple[str, FakeUpstream], budget: None
) -> None:
    url, fake = upstream_in_thread
    ratelimiter.max_budget = 0.001
    messages = [{"role": "user", "content": "x" * 400}]  # 100 tokens: $0.003 on gpt-4
    sent = fake.requests
    with pytest.raises(BudgetExceededError, match=r"max budget: 0\.001000") as raised:
        ratelimiter.completion(model="gpt-4", messages=messages, api_base=url)
    assert raised.value.projected_cost == pytest.approx(0.003)
    assert fake.requests == sent  # refused before anything was sent
    assert ratelimiter._current_cost == 0
    response = ratelimiter.completion(
        model="gpt-3.5-turbo", messages=messages, api_base=url, max_tokens=8
    )
    assert response.choices[0].message.content and response["model"] == "gpt-3.5-turbo"
    assert ratelimiter._current_cost == pytest.approx(100 * 0.5e-6 + 8 * 1.5e-6)
    with pytest.raises(BudgetExceededError):  # max_tokens counts: 1,000 tokens at $1.5/M
        ratelimiter.completion(
            model="gpt-3.5-turbo", messages=messages, api_base=url, max_tokens=1000
        )
    assert fake.requests == sent + 1


def test_concurrent_threads_cannot_pass_the_budget_together(
    upstream_in_thread: tuple[str, FakeUpstream], budget: None
) -> None:
    url, fake = upstream_in_thread
    fake.latency_ms = 50
    each = 100 * 0.5e-6 + 10 * 1.5e-6  # projected and actual alike: max_tokens = the answer
    ratelimiter.max_budget = 5 * each + each / 2
    messages = [{"role": "user", "content": "x" * 400}]

    def call(_: int) -> bool:
        try:
            ratelimiter.completion(
                model="gpt-3.5-turbo", messages=messages, api_base=url, max_tokens=10
            )
        except BudgetExceededError:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        admitted = sum(pool.map(call, range(16)))
    assert admitted == 5
    assert ratelimiter._current_cost == pytest.approx(5 * each)


async def test_acompletion_and_endpoint_errors(budget: None) -> None:
    async with running_upstream(FakeUpstream(error_rate=1.0)) as failing:
        with pytest.raises(ratelimiter.APIError, match="answered 500") as raised:
            await ratelimiter.acompletion(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], api_base=failing
            )
        assert raised.value.status_code == 500
    async with running_upstream() as base:
        response = await ratelimiter.acompletion(
            model="openai/gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            api_base=base,
            max_tokens=4,
        )
    assert response.model == "gpt-4o-mini" and response.usage.completion_tokens == 4
    assert ratelimiter._current_cost == pytest.approx(1 * 0.15e-6 + 4 * 0.6e-6)


# -- the hosted protocol, served by the sidecar ------------------------------------------


async def test_hosted_budgets_round_trip_through_the_sidecar(
    tmp_path: Path, ns: str, redis_url: str
) -> None:
    settings = Settings(master_key=MASTER_KEY, key_prefix=f"t:{ns}:")
    async with running_upstream() as upstream, running_sidecar(settings, redis_url) as base:
        code = (
            "from ratelimiter import BudgetManager\n"
            f"m = BudgetManager('proj-{ns}', client_type='hosted', api_base={base!r},"
            f" headers={{'Authorization': 'Bearer {MASTER_KEY}'}})\n"
            "m.create_budget(total_budget=2, user='u1', duration='weekly')\n"
            "m.update_cost(user='u1', model='gpt-3.5-turbo', input_text='hello world',"
            ' output_text="it\'s a sunny day in san francisco")\n'
            "n = BudgetManager(f'proj-" + ns + "', client_type='hosted', api_base="
            f"{base!r}, headers={{'Authorization': 'Bearer {MASTER_KEY}'}})\n"
            "print(n.get_users(), n.get_total_budget('u1'), n.get_current_cost('u1'))\n"
        )
        done = await run_python(code, tmp_path, {"OPENAI_BASE_URL": upstream})
        assert done[0] == 0, done[2]
        assert done[1].split() == ["['u1']", "2.0", repr(TEXT_COST)]
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/get_budget", json={"project_name": "x"}) as r:
                assert r.status == 401
            headers = {"Authorization": f"Bearer {MASTER_KEY}"}
            async with session.post(
                f"{base}/set_budget",
                json={"project_name": "x", "user_dict": {"u": {"total_budget": "lots"}}},
                headers=headers,
            ) as r:
                body = await r.json()
                assert r.status == 400 and "total_budget must be a number" in str(body)
            async with session.post(
                f"{base}/get_budget", json={"project_name": f"none-{ns}"}, headers=headers
            ) as r:
                assert (await r.json())["status"] == "error"


async def run_python(code: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- check and call in one step ---------------------------------------------------------


@pytest.mark.parametrize("client_type", ["local", "redis"])
def test_the_managers_completion_holds_before_it_calls(
    upstream_in_thread: tuple[str, FakeUpstream],
    budget: None,
    tmp_path: Path,
    redis_url: str,
    ns: str,
    client_type: str,
) -> None:
    """LiteLLM's check-then-call lets every concurrent caller see room and all of them spend
    it; here each call's projected cost is held first, so exactly what fits is sent."""
    url, fake = upstream_in_thread
    fake.latency_ms = 50
    if client_type == "redis":
        manager = BudgetManager(f"p-{ns}", client_type="redis", redis_url=redis_url)
    else:
        manager = BudgetManager(f"p-{ns}", path=tmp_path / "user_cost.json")
    each = 100 * 0.5e-6 + 10 * 1.5e-6  # projected = actual: the answer is max_tokens long
    manager.create_budget(total_budget=5 * each + each / 2, user="fay", duration="daily")
    messages = [{"role": "user", "content": "x" * 400}]
    sent = fake.requests

    def call(_: int) -> bool:
        try:
            manager.completion("fay", "gpt-3.5-turbo", messages, api_base=url, max_tokens=10)
        except BudgetExceededError as exc:
            assert "User 'fay' has" in str(exc)
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(call, range(16))) == 5
    assert fake.requests == sent + 5  # the refused ones were never sent
    assert manager.get_current_cost("fay") == pytest.approx(5 * each)
    assert not manager.user_dict["fay"].get("holds")  # every hold was replaced by its cost
    # A call that fails gives its hold back.
    manager.reset_cost("fay")
    with pytest.raises(ratelimiter.APIError):
        manager.completion("fay", "gpt-3.5-turbo", messages, api_base="http://127.0.0.1:9")
    assert manager.get_current_cost("fay") == 0
    assert manager.completion("fay", "gpt-3.5-turbo", messages, api_base=url, max_tokens=10)


async def test_the_managers_acompletion(redis_url: str, ns: str, budget: None) -> None:
    manager = BudgetManager(f"p-{ns}", client_type="redis", redis_url=redis_url)
    manager.create_budget(total_budget=1, user="gus")
    async with running_upstream() as base:
        response = await manager.acompletion(
            "gus", "gpt-4o-mini", [{"role": "user", "content": "hi"}], api_base=base, max_tokens=4
        )
    assert response.usage.completion_tokens == 4
    assert manager.get_current_cost("gus") == pytest.approx(1 * 0.15e-6 + 4 * 0.6e-6)
