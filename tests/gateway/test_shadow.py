"""Shadow mode through the running sidecar: a shadow limit is counted as its enforced copy
would be, its would-be refusals are reported (header, metric, log line, ledger), the request is
served, and switching between shadow and enforced is an admin call, with no restart."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratelimiter.engine.limits import Budget, SlidingWindow
from ratelimiter.gateway.config import ConfigError, load_config
from ratelimiter.gateway.policy import Scope
from ratelimiter.gateway.store import hash_key
from ratelimiter.responses import SHADOW_REASON, SHADOW_REFUSED

from ..conftest import (
    MASTER_KEY,
    MESSAGES,
    Admin,
    Stack,
    one_model,
    running_sidecar,
    running_upstream,
)
from .test_capacity import settings_for
from .test_surfaces import ASK, Surfaces, surfaces  # noqa: F401 (a fixture)

# How an enforced refusal's error type names the limit that a shadow header names.
REFUSED_AS = {"requests": "key:requests", "tokens": "key:tokens", "budget_exceeded": "key:budget"}
# One traffic pattern (max_tokens of each request): with 10 prompt tokens, a request holds
# 10 + max_tokens tokens and costs 10e-6 + 2e-6 per completion token.
TRAFFIC = [4, 30, 8, 50, 2, 16, 4, 60, 10, 3, 5, 7, 40, 1]
BUDGET = {"max_budget": 0.0002, "budget_duration": "1d"}
# Each run against its own three keys: enforced, shadow_mode, shadow_limits naming them all.
CONFIGS = [
    {"rpm_limit": 3},
    {"tpm_limit": 100},
    BUDGET,
    {"rpm_limit": 9, "tpm_limit": 200, **BUDGET},
]
ALL = ["rpm_limit", "tpm_limit", "max_budget"]


async def chat(
    session: aiohttp.ClientSession, base: str, key: str, max_tokens: int = 4, stream: bool = False
) -> tuple[int, dict[str, str], Any]:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    async with session.post(
        f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        raw = await response.read()
        payload = raw if stream else await response.json(content_type=None)
        return response.status, dict(response.headers), payload


def outcome(status: int, headers: dict[str, str], payload: Any) -> str | None:
    """The limit that refused (enforced) or would have refused (shadow), or None."""
    if status == 429:
        return REFUSED_AS[payload["error"]["type"]]
    assert status == 200, payload
    return headers.get(SHADOW_REFUSED)


async def metric(admin: Admin, scope: str, reason: str) -> float:
    async with admin.session.get(f"{admin.base}/metrics") as response:
        text = await response.text()
    line = f'ratelimiter_shadow_refusals_total{{reason="{reason}",scope="{scope}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


async def spend_logs(stack: Stack, key: str, count: int) -> list[dict[str, Any]]:
    """The key's ledger entries, once all ``count`` are settled (settlement runs after the
    answer, off the client's latency)."""
    for _ in range(200):
        rows = await stack.admin.get("/spend/logs", api_key=key)
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(rows)} of {count} ledger entries")


async def test_the_same_traffic_refused_by_an_enforced_copy_is_counted_by_a_shadow_copy(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimiter.proxy")
    refusals: list[str] = []
    whole_keys = []
    for limits in CONFIGS:
        enforced = await stack.key(**limits)
        whole = await stack.key(**limits, shadow_mode=True)
        named = await stack.key(**limits, shadow_limits=ALL)
        seen: dict[str, list[str | None]] = {enforced: [], whole: [], named: []}
        for max_tokens in TRAFFIC:
            for key, outcomes in seen.items():
                status, headers, payload = await chat(
                    stack.admin.session, stack.base, key, max_tokens
                )
                assert status == 200 or key == enforced, payload
                outcomes.append(outcome(status, headers, payload))
        assert any(seen[enforced]) and not all(seen[enforced]), (limits, seen[enforced])
        assert seen[whole] == seen[enforced] and seen[named] == seen[enforced], limits
        refusals += [o for o in seen[enforced] if o is not None]
        whole_keys.append((whole, [o for o in seen[enforced] if o is not None]))
    assert {"key:requests", "key:tokens", "key:budget"} <= set(refusals)
    windows = sum(1 for o in refusals if o != "key:budget")
    assert await metric(stack.admin, "key", "window_full") == 2 * windows  # two shadow copies
    assert await metric(stack.admin, "key", "budget_exhausted") == 2 * (len(refusals) - windows)
    logged = [r.shadow_refused for r in caplog.records if getattr(r, "shadow_refused", None)]
    assert sorted(logged) == sorted(refusals * 2)
    for whole, expected in whole_keys:  # the ledger entry of each request says it too
        rows = await spend_logs(stack, whole, len(TRAFFIC))
        assert sorted(filter(None, (row["shadow_refused"] for row in rows))) == sorted(expected)
        assert all(row["shadow_reason"] for row in rows if row["shadow_refused"])
        # and the UI's count per entity and limit, summed over sidecars
        counts = await today(stack.admin, f"key:{hash_key(whole)}", len(expected))
        assert counts == {name: expected.count(name) for name in set(expected)}


async def today(admin: Admin, entity: str, total: int) -> dict[str, int]:
    """/ui/api/shadow's counts of one entity once they reach ``total`` (counted after the
    response)."""
    for _ in range(200):
        counts = (await admin.get("/ui/api/shadow"))["entities"].get(entity, {})
        if sum(counts.values()) >= total:
            return counts
        await asyncio.sleep(0.05)
    raise AssertionError(f"{entity}: {counts}")


async def test_switching_between_shadow_and_enforced_needs_no_restart(stack: Stack) -> None:
    key = await stack.key(rpm_limit=2, shadow_limits=["rpm_limit"])
    session, base = stack.admin.session, stack.base
    answers = [await chat(session, base, key) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert [h.get(SHADOW_REFUSED) for _, h, _ in answers] == [None, None, "key:requests"]
    assert answers[2][1][SHADOW_REASON] == "window_full"
    # the shadow limit is left out of the headers clients pace themselves by
    assert "x-ratelimit-remaining-requests" not in answers[2][1]
    await stack.admin.post("/key/update", {"key": key, "shadow_limits": []})
    status, headers, payload = await chat(session, base, key)
    assert status == 429 and payload["error"]["type"] == "requests"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    await stack.admin.post("/key/update", {"key": key, "shadow_mode": True})
    status, headers, _ = await chat(session, base, key)
    assert status == 200 and headers[SHADOW_REFUSED] == "key:requests"
    info = await stack.admin.get("/key/info", key=key)
    assert info["info"]["shadow_mode"] is True and info["info"]["shadow_limits"] == []


async def statuses_and_shadow(
    stack: Stack, url: str, body: dict[str, Any], headers: dict[str, str], times: int
) -> list[tuple[int, str | None]]:
    """``times`` requests one after another: each one's status and shadow refusal header."""
    seen = []
    for _ in range(times):
        async with stack.admin.session.post(url, json=body, headers=headers) as response:
            seen.append((response.status, response.headers.get(SHADOW_REFUSED)))
    return seen


async def test_an_end_users_limit_is_switched_by_customer_update(stack: Stack) -> None:
    await stack.admin.post("/customer/new", {"user_id": "bob", "rpm_limit": 1})
    await stack.admin.post("/customer/update", {"user_id": "bob", "shadow_limits": ["rpm_limit"]})
    key = await stack.key()
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4, "user": "bob"}
    url = f"{stack.base}/v1/chat/completions"
    seen = await statuses_and_shadow(stack, url, body, headers, 2)
    assert seen == [(200, None), (200, "end_user:requests")]
    await stack.admin.post("/customer/update", {"user_id": "bob", "shadow_limits": None})
    async with stack.admin.session.post(url, json=body, headers=headers) as response:
        assert response.status == 429
    info = await stack.admin.get("/customer/info", end_user_id="bob")
    assert info["shadow_limits"] is None


async def test_a_tags_limit_in_shadow(stack: Stack) -> None:
    await stack.admin.post(
        "/tag/new", {"name": "canary", "rpm_limit": 1, "shadow_limits": ["rpm_limit"]}
    )
    key = await stack.key()
    headers = {"Authorization": f"Bearer {key}", "x-litellm-tags": "canary"}
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4}
    url = f"{stack.base}/v1/chat/completions"
    seen = await statuses_and_shadow(stack, url, body, headers, 2)
    assert seen == [(200, None), (200, "tag:requests")]
    await stack.admin.post("/tag/update", {"name": "canary", "shadow_limits": []})
    async with stack.admin.session.post(url, json=body, headers=headers) as response:
        assert response.status == 429


async def test_a_refusal_by_an_enforced_limit_takes_nothing_in_shadow_limits(
    stack: Stack,
) -> None:
    team = await stack.admin.post(
        "/team/new",
        {"rpm_limit": 50, "tpm_limit": 5_000, "max_budget": 1.0, "shadow_mode": True},
    )
    key = await stack.key(rpm_limit=1, team_id=team["team_id"])
    session, base = stack.admin.session, stack.base
    statuses = [(await chat(session, base, key, 8))[0] for _ in range(4)]
    assert statuses == [200, 429, 429, 429]
    scope = Scope("team", team["team_id"])
    prefix = stack.settings.key_prefix
    rpm = SlidingWindow(scope.key(prefix, "rpm"), 50, "1m")
    tpm = SlidingWindow(scope.key(prefix, "tpm"), 5_000, "1m", measure="tokens")
    states = await stack.engine.peek([rpm, tpm])
    assert [s.remaining for s in states] == [49, 5_000 - 18]  # one request of 10 + 8 tokens
    budget = Budget(scope.key(prefix, "spend:100y"), 10**9, "100y", 0)
    (use,) = await stack.engine.budget_use([budget])
    while use.held:  # settled after the answer
        await asyncio.sleep(0.02)
        (use,) = await stack.engine.budget_use([budget])
    assert use.spent == 10_000 + 8 * 2_000  # nano-dollars of the one admitted request


async def test_a_budget_puts_the_entities_that_use_it_in_shadow(stack: Stack) -> None:
    await stack.admin.post(
        "/budget/new", {"budget_id": "trial", "rpm_limit": 1, "shadow_limits": ["rpm_limit"]}
    )
    key = await stack.key(budget_id="trial")
    session, base = stack.admin.session, stack.base
    answers = [await chat(session, base, key, stream=True) for _ in range(2)]
    assert [status for status, _, _ in answers] == [200, 200]
    assert answers[1][1][SHADOW_REFUSED] == "key:requests"
    await stack.admin.post("/budget/update", {"budget_id": "trial", "shadow_limits": None})
    assert (await chat(session, base, key))[0] == 429


@pytest.fixture
async def shadow_sidecar(ns: str, redis_url: str) -> AsyncIterator[tuple[Admin, str]]:
    async with running_upstream() as upstream:
        settings = one_model(ns, upstream, shadow=True)
        async with (
            running_sidecar(settings, redis_url) as base,
            aiohttp.ClientSession() as session,
        ):
            yield Admin(session, base), base


async def test_a_whole_sidecar_in_shadow_serves_everything_but_blocks(
    shadow_sidecar: tuple[Admin, str],
) -> None:
    admin, base = shadow_sidecar
    key = (await admin.post("/key/generate", {"rpm_limit": 1, "max_parallel_requests": 0}))["key"]
    answers = []
    for _ in range(3):
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 4}
        async with admin.session.post(
            f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            answers.append((response.status, response.headers.get(SHADOW_REFUSED)))
    # parallel 0 would refuse every request, with no retry: it is named on each
    assert answers == [(200, "key:parallel")] * 3
    assert await metric(admin, "key", "exceeds_capacity") == 3
    await admin.post("/key/block", {"key": key})
    async with admin.session.post(
        f"{base}/v1/chat/completions",
        json={"model": "m", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 403


HOSTILE = [
    ("shadow_mode", "yes"),
    ("shadow_mode", 1),
    ("shadow_mode", []),
    ("shadow_limits", "rpm_limit"),
    ("shadow_limits", ["rpm"]),
    ("shadow_limits", [1]),
    ("shadow_limits", [None]),
    ("shadow_limits", {"rpm_limit": True}),
    ("shadow_limits", ["rpm_limit"] * 10_000),
    ("shadow_limits", ["x" * 100_000]),
    ("shadow_limits", ["blocked"]),
]


@pytest.mark.parametrize("field,value", HOSTILE, ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("path", ["/key/generate", "/team/new", "/customer/new", "/budget/new"])
async def test_hostile_shadow_fields_are_refused_by_name(
    admin: Admin, path: str, field: str, value: Any
) -> None:
    status, payload = await admin.call("POST", path, {field: value})
    assert status == 400, payload
    message = payload["error"]["message"]
    assert message.startswith(field) and len(message) < 1_000
    assert "Traceback" not in message


async def test_shadow_fields_are_kept_checked_and_shown(admin: Admin) -> None:
    made = await admin.post(
        "/user/new", {"user_id": "ann", "shadow_limits": ["max_budget", "max_budget", "rpm_limit"]}
    )
    assert made["shadow_limits"] == ["max_budget", "rpm_limit"]
    org = await admin.post("/organization/new", {"organization_alias": "acme", "shadow_mode": True})
    info = await admin.get("/organization/info", organization_id=org["organization_id"])
    assert info["shadow_mode"] is True
    await admin.post("/customer/new", {"user_id": "bob", "shadow_mode": False})
    assert (await admin.get("/customer/info", end_user_id="bob"))["shadow_mode"] is False


@pytest.mark.parametrize("value", ["maybe", 3, [True]])
def test_a_bad_whole_sidecar_shadow_setting_is_a_config_error(tmp_path: Path, value: Any) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"general_settings:\n  master_key: {MASTER_KEY}\nratelimiter_settings:\n"
        f"  shadow: {value!r}\n"
    )
    with pytest.raises(ConfigError, match=r"ratelimiter_settings\.shadow"):
        load_config(path, env={})
    path.write_text(
        f"general_settings:\n  master_key: {MASTER_KEY}\nratelimiter_settings:\n  shadow: true\n"
    )
    assert load_config(path, env={}).shadow is True


async def test_a_shadow_limit_is_never_served_from_capacity_blocks(ns: str, redis_url: str) -> None:
    """A deployment's rpm in shadow, its scope named in capacity_blocks: each request is
    decided in Redis, so exactly the capacity is counted and the rest would be refused."""
    async with running_upstream() as upstream:
        settings = settings_for(
            ns, upstream, rpm=16, capacity_blocks={"deployment": 2}, shadow=True
        )
        async with (
            running_sidecar(settings, redis_url) as base,
            aiohttp.ClientSession() as session,
        ):
            admin = Admin(session, base)
            key = (await admin.post("/key/generate", {}))["key"]
            would = []
            for _ in range(20):
                async with session.post(
                    f"{base}/v1/chat/completions",
                    json={"model": "m", "messages": MESSAGES, "max_tokens": 4},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 200
                    would.append(response.headers.get(SHADOW_REFUSED))
    assert would == [None] * 16 + ["deployment:requests"] * 4


async def test_every_surface_reports_a_would_be_refusal(surfaces: Surfaces) -> None:  # noqa: F811
    """Anthropic's Messages (with Anthropic's own rate-limit headers) and OpenAI's Responses
    say it as chat does; the shadow limit is left out of Anthropic's headers too."""
    key = await surfaces.key(rpm_limit=1, shadow_mode=True)
    claude = surfaces.claude(key)
    first = await claude.messages.with_raw_response.create(
        model="claude", max_tokens=1, messages=ASK
    )
    assert SHADOW_REFUSED not in first.headers
    second = await claude.messages.with_raw_response.create(
        model="claude", max_tokens=1, messages=ASK
    )
    assert second.headers[SHADOW_REFUSED] == "key:requests"
    assert second.headers[SHADOW_REASON] == "window_full"
    assert "anthropic-ratelimit-requests-remaining" not in second.headers
    responses = await surfaces.openai(key).responses.with_raw_response.create(
        model="gpt", input="hi", max_output_tokens=16
    )
    assert responses.headers[SHADOW_REFUSED] == "key:requests"
    await surfaces.balanced()


async def test_an_enforcing_sidecar_and_a_shadow_sidecar_agree_request_by_request(
    ns: str, redis_url: str
) -> None:
    """The same traffic through two sidecars, one enforcing, one with shadow: true (each with
    its own key prefix): refusals in one, the same would-be refusals at the same requests in
    the other, for a key's rpm, tpm and budget and for the deployment's rpm."""
    async with running_upstream() as upstream:
        enforcing = settings_for(f"{ns}e", upstream, rpm=12)
        shadowing = settings_for(f"{ns}s", upstream, rpm=12, shadow=True)
        async with (
            running_sidecar(enforcing, redis_url) as one,
            running_sidecar(shadowing, redis_url) as two,
            aiohttp.ClientSession() as session,
        ):
            seen: list[list[str | None]] = [[], []]
            for limits in CONFIGS:
                keys = [
                    (await Admin(session, base).post("/key/generate", limits))["key"]
                    for base in (one, two)
                ]
                for max_tokens in TRAFFIC:
                    for n, base in enumerate((one, two)):
                        seen[n].append(await sent(session, base, keys[n], max_tokens))
    assert seen[1] == seen[0]
    assert {"key:requests", "key:tokens", "key:budget", "deployment:requests"} <= set(seen[0])


async def sent(session: aiohttp.ClientSession, base: str, key: str, max_tokens: int) -> str | None:
    """The limit that refused the request (enforced) or would have (shadow), or None."""
    body = {"model": "m", "messages": MESSAGES, "max_tokens": max_tokens}
    async with session.post(
        f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        payload = await response.json(content_type=None)
        if response.status != 429:
            assert response.status == 200, payload
            return response.headers.get(SHADOW_REFUSED)
        error = payload["error"]
        if error["message"].startswith("Rate limit exceeded for deployment"):
            return "deployment:requests"
        return REFUSED_AS[error["type"]]
