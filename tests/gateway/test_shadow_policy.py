"""Which of a request's limits each shadow field puts in shadow, read from the limits the policy
really builds (so a renamed limit key cannot silently leave shadow mode behind)."""

from __future__ import annotations

from typing import Any

import pytest

from ratelimiter.engine.limits import Gate
from ratelimiter.gateway.policy import Resolved, Scope, limits_for
from ratelimiter.gateway.shadow import SHADOWABLE, shadow_keys

PREFIX = "rl:"
EVERY_LIMIT: dict[str, Any] = {
    "max_budget": 10.0,
    "budget_duration": "1d",
    "budget_limits": [{"max_budget": 50.0, "budget_duration": "30d"}],
    "tpm_limit": 1_000,
    "rpm_limit": 10,
    "input_tpm_limit": 800,
    "output_tpm_limit": 200,
    "max_parallel_requests": 2,
    "model_max_budget": {"m": {"max_budget": 1.0, "rpm_limit": 5, "tpm_limit": 500}},
    "model_rpm_limit": {"m": 3},
    "model_tpm_limit": {"m": 300},
}
# The limit names each field sets (policy.py), keyed by the field.
SETS = {
    "rpm_limit": {"requests"},
    "tpm_limit": {"tokens"},
    "input_tpm_limit": {"input_tokens"},
    "output_tpm_limit": {"output_tokens"},
    "max_parallel_requests": {"parallel"},
    "max_budget": {"budget", "budget:30d"},
    "model_max_budget": {"model_budget", "requests@model", "tokens@model"},
    "model_rpm_limit": {"requests@rate"},
    "model_tpm_limit": {"tokens@rate"},
}


def named(limits: list[Any], keys: frozenset[str]) -> set[str]:
    """The shadowed limits, by name, per-model ones told apart by their key."""
    out = set()
    for limit in limits:
        if limit.key in keys:
            name = limit.name.split(":", 1)[1]
            if ":model_rate:" in limit.key:
                name += "@rate"
            elif ":model:" in limit.key and name != "model_budget":
                name += "@model"
            out.add(name)
    return out


def request(fields: dict[str, Any]) -> tuple[Resolved, list[Any]]:
    scopes = (Scope("key", "3f9a", fields), Scope("deployment", "d1", {"rpm_limit": 100}))
    resolved = Resolved(scopes, "m", 100, 1_000)
    return resolved, limits_for(resolved, PREFIX)


@pytest.mark.parametrize("field", SHADOWABLE)
def test_each_name_shadows_exactly_the_limits_its_field_sets(field: str) -> None:
    resolved, limits = request({**EVERY_LIMIT, "shadow_limits": [field]})
    keys = shadow_keys(resolved.scopes, limits, PREFIX)
    assert named(limits, keys) == SETS[field]


def test_shadow_mode_shadows_every_limit_of_the_scope_but_its_block() -> None:
    resolved, limits = request({**EVERY_LIMIT, "shadow_mode": True})
    keys = shadow_keys(resolved.scopes, limits, PREFIX)
    mine = [limit for limit in limits if limit.key.startswith("rl:{key:3f9a}:")]
    assert keys == {limit.key for limit in mine if not isinstance(limit, Gate)}
    assert any(isinstance(limit, Gate) for limit in mine)  # the block stays enforced


def test_the_whole_sidecar_shadows_every_limit_but_the_blocks() -> None:
    resolved, limits = request(EVERY_LIMIT)
    keys = shadow_keys(resolved.scopes, limits, PREFIX, everything=True)
    assert keys == {limit.key for limit in limits if not isinstance(limit, Gate)}
    assert "rl:{deployment:d1}:rpm" in keys


def test_nothing_in_shadow_costs_nothing() -> None:
    resolved, limits = request({**EVERY_LIMIT, "shadow_mode": False, "shadow_limits": []})
    assert shadow_keys(resolved.scopes, limits, PREFIX) == frozenset()


def test_a_team_members_limits_follow_the_team() -> None:
    scopes = (
        Scope("team", "t", {"rpm_limit": 10, "shadow_limits": ["rpm_limit"]}),
        Scope("member", "t:ann", {"rpm_limit": 2, "tpm_limit": 50}),
    )
    limits = limits_for(Resolved(scopes, "m", 1, 1), PREFIX)
    keys = shadow_keys(scopes, limits, PREFIX)
    assert keys == {"rl:{team:t}:rpm", "rl:{member:t:ann}:rpm"}
