"""The policy layer on its own: one resolved request -> the full list of engine limits."""

from __future__ import annotations

from ratelimiter import Budget, Concurrency, Engine, Gate, SlidingWindow
from ratelimiter.gateway.policy import Resolved, Scope, limits_for
from ratelimiter.pricing import NANO, nano

P = "rl:"


def by_name(limits: list) -> dict[str, object]:
    return {f"{limit.key}": limit for limit in limits}


def test_every_scope_and_kind() -> None:
    request = Resolved(
        scopes=(
            Scope("proxy", "all", {"max_budget": 100, "budget_duration": "30d"}),
            Scope(
                "key",
                "h1",
                {
                    "rpm_limit": 4,
                    "tpm_limit": 1000,
                    "max_parallel_requests": 2,
                    "budget_limits": [
                        {"max_budget": 1, "budget_duration": "24h"},
                        {"max_budget": 10, "budget_duration": "30d"},
                    ],
                    "model_rpm_limit": {"gpt-4o": 2},
                    "model_tpm_limit": {"o1": 5},
                },
            ),
            Scope(
                "team",
                "t",
                {
                    "model_max_budget": {
                        "gpt-4o": {"max_budget": 3, "budget_duration": "1d", "tpm_limit": 50}
                    }
                },
            ),
            Scope("member", "t:ana", {"max_budget": 2}),
        ),
        model="gpt-4o",
        tokens=120,
        cost=nano(0.01),
    )
    limits = by_name(limits_for(request, P))
    assert limits["rl:{proxy:all}:spend:30d"] == Budget(
        "rl:{proxy:all}:spend:30d", 100 * NANO, "30d", nano(0.01), name="proxy:budget"
    )
    assert limits["rl:{key:h1}:rpm"] == SlidingWindow(
        "rl:{key:h1}:rpm", 4, "1m", name="key:requests"
    )
    tpm = limits["rl:{key:h1}:tpm"]
    assert (tpm.capacity, tpm.amount, tpm.measure) == (1000, 120, "tokens")
    assert limits["rl:{key:h1}:parallel"] == Concurrency(
        "rl:{key:h1}:parallel", 2, 60_000, name="key:parallel"
    )
    assert {k for k in limits if k.startswith("rl:{key:h1}:spend")} == {
        "rl:{key:h1}:spend:24h",
        "rl:{key:h1}:spend:30d",
    }
    assert limits["rl:{key:h1}:rpm:model_rate:gpt-4o"].capacity == 2
    assert not any("o1" in k for k in limits)  # another model's limit does not apply
    assert limits["rl:{team:t}:spend:model:gpt-4o:1d"].capacity == 3 * NANO
    assert limits["rl:{team:t}:tpm:model:gpt-4o"].capacity == 50
    assert limits["rl:{member:t:ana}:spend:100y"].capacity == 2 * NANO  # never resets
    assert limits["rl:{key:h1}:blocked"] == Gate("rl:{key:h1}:blocked", name="key:blocked")
    assert "rl:{proxy:all}:blocked" not in limits  # nobody can block the proxy
    assert len(limits) == 12


def test_a_scope_without_limits_adds_only_its_gate() -> None:
    assert limits_for(Resolved((Scope("user", "u"),), "m", 10, 10), P) == [
        Gate("rl:{user:u}:blocked", name="user:blocked")
    ]
    assert limits_for(Resolved((Scope("deployment", "d"),), "m", 10, 10), P) == []


async def test_two_budget_windows_are_both_enforced(engine: Engine, ns: str) -> None:
    key = Scope(
        "key",
        ns,
        {
            "budget_limits": [
                {"max_budget": 0.05, "budget_duration": "24h"},
                {"max_budget": 1, "budget_duration": "30d"},
            ]
        },
    )

    def request() -> list:
        return limits_for(Resolved((key,), "gpt-4o", 100, nano(0.02)), P)

    admitted = [(await engine.acquire(None, request())).allowed for _ in range(3)]
    assert admitted == [True, True, False]
    refused = await engine.acquire(None, request())
    assert refused.refused is not None and refused.refused.name == "key:budget:24h"


def test_one_duration_twice_keeps_the_lower_budget() -> None:
    key = Scope(
        "key",
        "k",
        {
            "max_budget": 5,
            "budget_duration": "30d",
            "budget_limits": [{"max_budget": 3, "budget_duration": "30d"}],
        },
    )
    (budget,) = [x for x in limits_for(Resolved((key,), "m", 1, 1), P) if isinstance(x, Budget)]
    assert (budget.capacity, budget.name) == (3 * NANO, "key:budget:30d")
