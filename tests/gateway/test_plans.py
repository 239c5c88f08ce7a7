"""Compiled plans (policy.plan_for): a request's limits are built once per scopes and fields
and only their amounts are filled in per request; a changed entity must never be served the
limits it had before."""

from __future__ import annotations

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratelimiter.engine import Decision, LimitState
from ratelimiter.engine.limits import Budget, Concurrency, Gate, Limit, SharedWindow, SlidingWindow
from ratelimiter.errors import InvalidLimit
from ratelimiter.gateway import policy
from ratelimiter.gateway.policy import Resolved, Scope, limits_for, plan_for
from ratelimiter.responses import HeaderTemplate, anthropic_rate_headers, rate_headers

from ..conftest import MESSAGES, Stack

P = "rl:"


async def _refused_after(client: openai.AsyncOpenAI, served: int) -> None:
    for _ in range(served):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)


async def test_a_lowered_key_rpm_holds_from_the_next_request(stack: Stack) -> None:
    key = await stack.key(rpm_limit=5)
    client = stack.client(key)
    for _ in range(2):  # the key's plan is built and then served from the cache
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    await stack.admin.post("/key/update", {"key": key, "rpm_limit": 2})
    await _refused_after(client, 0)
    await stack.admin.post("/key/update", {"key": key, "rpm_limit": 4})
    await _refused_after(client, 2)


async def test_a_changed_budget_holds_for_the_keys_that_name_it(stack: Stack) -> None:
    await stack.admin.post("/budget/new", {"budget_id": "plan-b", "rpm_limit": 5})
    client = stack.client(await stack.key(budget_id="plan-b"))
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    await stack.admin.post("/budget/update", {"budget_id": "plan-b", "rpm_limit": 2})
    await _refused_after(client, 1)


def _key(fields: dict[str, object]) -> Resolved:
    return Resolved((Scope("key", "k", fields),), "m", 10, 1000)


def test_a_plan_is_reused_while_the_fields_are_equal_and_replaced_when_they_change() -> None:
    fields = {"rpm_limit": 3, "tpm_limit": 100}
    first = plan_for(_key(fields).scopes, "m", P)
    assert plan_for(_key(fields).scopes, "m", P) is first
    assert plan_for(_key(dict(fields)).scopes, "m", P) is first  # another object, same content
    changed = plan_for(_key({**fields, "rpm_limit": 2}).scopes, "m", P)
    assert changed is not first
    (rpm,) = [t for t, _ in changed.entries if t.key.endswith(":rpm")]
    assert rpm.capacity == 2
    # one part per scope identity: the superseded one is gone, not kept alongside
    assert sum(1 for name in policy._parts if name[4:] == ("key", "k")) == 1


def test_a_scope_met_in_many_combinations_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    build = policy._build
    monkeypatch.setattr(
        policy, "_build", lambda scope, *a: built.append(scope.id) or build(scope, *a)
    )
    key = Scope("key", "shared", {"rpm_limit": 3})
    for n in range(20):
        plan_for((key, Scope("end_user", f"e{n}", {"rpm_limit": 1})), "m", P)
    assert built.count("shared") == 1


def test_amounts_are_filled_in_per_request_and_checked() -> None:
    fields = {"tpm_limit": 100, "max_budget": 1.0}
    small, large = _key(fields), Resolved(_key(fields).scopes, "m", 70, 5000)
    tokens = [limit for limit in limits_for(small, P) if isinstance(limit, SlidingWindow)]
    assert [(t.amount, t.capped) for t in tokens] == [(10, False)]
    filled = [limit for limit in limits_for(large, P, capped=True) if limit.measure is not None]
    assert sorted((limit.amount, limit.capped) for limit in filled) == [(70, True), (5000, True)]
    with pytest.raises(InvalidLimit, match="key:tokens"):
        limits_for(Resolved(small.scopes, "m", -1, 1000), P)


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "PLANS", 4)
    monkeypatch.setattr(policy, "_plans", {})
    monkeypatch.setattr(policy, "_parts", {})
    for n in range(10):
        plan_for((Scope("key", f"k{n}", {"rpm_limit": 1}),), "m", P)
    assert len(policy._plans) == len(policy._parts) == 4


_REMAINING = st.one_of(st.integers(-2, 3), st.integers(0, 10**6))  # ties, the first wins
_NAMES = st.sampled_from(["key:requests", "key:tokens", "user:budget", "requests", "tokens", ""])


@st.composite
def _decisions(draw: st.DrawFn) -> tuple[list[Limit], frozenset[str], Decision]:
    """Limits of every kind, names that repeat or collide with the tightest windows' headers,
    some in shadow, and a decision over them (admitted, maybe with a shadow refusal)."""
    limits: list[Limit] = []
    for n in range(draw(st.integers(0, 12))):
        key, name = f"rl:{{s}}:{n}", draw(_NAMES)
        kind = draw(
            st.sampled_from(["window", "tokens", "input", "share", "budget", "lease", "gate"])
        )
        capacity = draw(st.integers(0, 10**6))
        if kind == "window":
            limits.append(SlidingWindow(key, capacity, "1m", name=name))
        elif kind in ("tokens", "input"):
            measure = "tokens" if kind == "tokens" else "input_tokens"
            limits.append(SlidingWindow(key, capacity, "1m", 0, measure=measure, name=name))
        elif kind == "share":
            total = SlidingWindow(f"{key}:total", capacity, "1m", name=name)
            limits += [total, SharedWindow(key, capacity, "1m", name=name, total_key=total.key)]
        elif kind == "budget":
            limits.append(Budget(key, capacity, "1d", 0, name=name))
        elif kind == "lease":
            limits.append(Concurrency(key, capacity, name=name))
        else:
            limits.append(Gate(key, name=name))
    shadow = frozenset(draw(st.sets(st.sampled_from([limit.key for limit in limits] or ["x"]))))
    states = tuple(
        LimitState(limit, draw(_REMAINING), draw(st.integers(0, 10**8)), 1, limit.key in shadow)
        for limit in limits
    )
    refused = draw(st.sampled_from([None, *limits]))
    decision = Decision(True, "r", states, shadow_refused=refused, shadow_reason="requests")
    return limits, shadow, decision


@given(_decisions())
def test_a_header_template_makes_the_headers_rate_headers_makes(
    case: tuple[list[Limit], frozenset[str], Decision],
) -> None:
    limits, shadow, decision = case
    template = HeaderTemplate(limits, shadow)
    for made in (rate_headers, anthropic_rate_headers):
        assert list(made(decision, "r", template).items()) == list(made(decision, "r").items())


def test_a_template_is_not_used_for_a_decision_of_other_limits() -> None:
    template = HeaderTemplate([SlidingWindow("rl:{k}:rpm", 5, "1m", name="key:requests")], ())
    unchecked = Decision(True, "r", ())  # admitted while Redis was away: no states
    assert rate_headers(unchecked, "r", template) == {"x-request-id": "r"}
