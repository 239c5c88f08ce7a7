"""Spend as LiteLLM reports it (issue 15 item 5): lifetime spend of every entity, budget or
not; resetting it; /spend/logs as a list found by the upstream's id; /global/spend/*."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from ratelimiter.gateway.policy import Scope, scope_budgets
from ratelimiter.gateway.reconcile import check
from ratelimiter.ledger import Ledger

from ..conftest import MESSAGES, Stack


def token_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def logged_spend(stack: Stack, **filters: str) -> float:
    return sum(row["spend"] for row in await stack.admin.get("/spend/logs", **filters))


async def test_every_entity_tracks_its_lifetime_spend_without_a_budget(stack: Stack) -> None:
    """Before: a key without a budget showed $0 on /key/info while the ledger had its spend."""
    await stack.admin.post("/team/new", {"team_id": "t-life"})
    key = await stack.key(user_id="u-life", team_id="t-life")  # no budget anywhere
    client = stack.client(key)
    for _ in range(3):
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=4, user="c-life"
        )
    spent = await logged_spend(stack, api_key=key)
    assert spent == pytest.approx(3 * (10e-6 + 4 * 2e-6))
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["spend"] == pytest.approx(spent) and info["budget_windows"] == []
    user = await stack.admin.get("/user/info", user_id="u-life")
    assert user["user_info"]["spend"] == pytest.approx(spent)
    assert [k["spend"] for k in user["keys"]] == [pytest.approx(spent)]
    team = await stack.admin.get("/team/info", team_id="t-life")
    assert team["team_info"]["spend"] == pytest.approx(spent)
    customer = await stack.admin.get("/customer/info", end_user_id="c-life")
    assert customer["spend"] == pytest.approx(spent)
    # Listings read every entity's spend in one go.
    (user,) = [u for u in await stack.admin.get("/user/list") if u["user_id"] == "u-life"]
    assert user["spend"] == pytest.approx(spent)
    (team,) = [t for t in await stack.admin.get("/team/list") if t["team_id"] == "t-life"]
    assert team["spend"] == pytest.approx(spent)


async def test_lifetime_spend_outlives_the_daily_rollups(stack: Stack) -> None:
    """The rollups expire after 400 days; lifetime spend is kept apart, without a TTL."""
    key = await stack.key()
    await stack.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    before = (await stack.admin.get("/key/info", key=key))["info"]["spend"]
    assert before > 0
    redis = stack.engine.redis
    rollups = [k async for k in redis.scan_iter(match=f"{stack.settings.key_prefix}*:rollup:*")]
    assert rollups
    await redis.delete(*rollups)  # as if 400 days had passed
    assert (await stack.admin.get("/key/info", key=key))["info"]["spend"] == before
    lifetime = [k async for k in redis.scan_iter(match=f"{stack.settings.key_prefix}*:lifetime")]
    assert lifetime and [await redis.ttl(k) for k in lifetime] == [-1] * len(lifetime)


async def test_lifetime_spend_is_kept_for_any_dimension_name(stack: Stack) -> None:
    """An organization (another branch) needs no change: the mechanism is keyed by name."""
    ledger = Ledger(stack.engine)
    for n in range(2):
        decision = await stack.engine.acquire(
            None, [], meta=b"", ledger=["organization:acme", "key:k1"]
        )
        assert decision.reservation is not None
        await stack.engine.settle(decision.reservation, {"spend": 1_000 * (n + 1)})
    found = await ledger.lifetime_spend(["organization:acme", "key:k1", "organization:none"])
    assert found == {"organization:acme": 3_000, "key:k1": 3_000, "organization:none": 0}
    await ledger.set_lifetime_spend("organization:acme", 0)
    assert (await ledger.lifetime_spend(["organization:acme"]))["organization:acme"] == 0


async def test_spend_resets_lifetime_and_budget_periods_and_keeps_the_ledger(
    stack: Stack,
) -> None:
    key = await stack.key(user_id="u-reset", max_budget=1, budget_duration="1d")
    client = stack.client(key)
    for _ in range(2):
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=4, user="c-reset"
        )
    one = 10e-6 + 4 * 2e-6
    body = await stack.admin.post("/key/update", {"key": key, "spend": 0})
    assert "spend" not in body or body["spend"] in (0, 0.0)
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["spend"] == 0.0 and info["budget_windows"][0]["spend"] == 0.0
    assert info["budget_windows"][0]["remaining"] == pytest.approx(1.0)
    # The ledger keeps its entries; the check still agrees (the reset is accounted for).
    assert len(await stack.admin.get("/spend/logs", api_key=key)) == 2
    assert await check(stack.engine, stack.settings) == []
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["spend"] == pytest.approx(one)
    assert info["budget_windows"][0]["spend"] == pytest.approx(one)
    # The user and the customer, as LiteLLM allows on their updates.
    user = (await stack.admin.get("/user/info", user_id="u-reset"))["user_info"]
    assert user["spend"] == pytest.approx(3 * one)
    await stack.admin.post("/user/update", {"user_id": "u-reset", "spend": 0})
    assert (await stack.admin.get("/user/info", user_id="u-reset"))["user_info"]["spend"] == 0
    await stack.admin.post("/customer/update", {"user_id": "c-reset", "spend": 0})
    assert (await stack.admin.get("/customer/info", end_user_id="c-reset"))["spend"] == 0.0
    # A value sets the lifetime spend and lowers (never raises) the current periods to it.
    await stack.admin.post("/key/update", {"key": key, "spend": 5})
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["spend"] == 5.0 and info["budget_windows"][0]["spend"] == pytest.approx(one)
    await stack.admin.post("/key/update", {"key": key, "spend": one / 2})
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["budget_windows"][0]["spend"] == pytest.approx(one / 2)
    assert await check(stack.engine, stack.settings) == []
    # Carried over on create (a key moved from elsewhere).
    moved = await stack.key(spend=2.5)
    assert (await stack.admin.get("/key/info", key=moved))["info"]["spend"] == 2.5
    # Out of range, or on a route whose LiteLLM model has no spend: a 400 naming it.
    for path, body in (
        ("/key/update", {"key": key, "spend": -1}),
        ("/user/update", {"user_id": "u-reset", "spend": "0"}),
        ("/team/update", {"team_id": "t-none", "spend": 0}),
    ):
        status, answer = await stack.admin.call("POST", path, body)
        assert status == 400 and answer["error"]["param"] == "spend", (path, answer)


async def test_a_reset_under_requests_in_flight_counts_each_of_them_once(stack: Stack) -> None:
    """Holds taken before the reset stay; each request settles into the new period and the
    new lifetime once; nothing is counted twice and the budget stays exact."""
    key = await stack.key(max_budget=1, budget_duration="1d")
    client = stack.client(key)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    fields = {"max_budget": 1, "budget_duration": "1d"}
    (budget,) = scope_budgets(Scope("key", token_of(key), fields), stack.settings.key_prefix)
    stack.fake.latency_ms = 400  # under the stack's upstream timeout (0.5 s)
    flights = [
        asyncio.create_task(
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
        )
        for _ in range(8)
    ]
    held = 8 * 25_000  # each holds its estimate: 17 prompt tokens x $1e-6 + 4 x $2e-6
    for _ in range(200):
        (use,) = await stack.engine.budget_use([budget])
        if use.held == held:
            break
        await asyncio.sleep(0.005)
    assert use.held == held and use.spent > 0
    resets = [
        stack.admin.post("/key/update", {"key": key, "spend": 0}),
        stack.admin.post("/key/update", {"key": key, "spend": 0}),  # twice, concurrently
    ]
    await asyncio.gather(*resets)
    (use,) = await stack.engine.budget_use([budget])
    assert use.spent == 0 and use.held == held  # holds untouched
    answers = await asyncio.gather(*flights)
    stack.fake.latency_ms = 0
    ids = {a.id for a in answers}
    rows = [r for r in await stack.admin.get("/spend/logs", api_key=key) if r["request_id"] in ids]
    assert len(rows) == 8
    after = sum(r["spend"] for r in rows)
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["spend"] == pytest.approx(after)
    (window,) = info["budget_windows"]
    assert window["spend"] == pytest.approx(after)
    assert window["remaining"] == pytest.approx(1 - after)  # no hold left behind
    assert await check(stack.engine, stack.settings) == []


async def test_spend_logs_is_a_list_found_by_the_upstream_id(stack: Stack) -> None:
    key = await stack.key(key_alias="logs")
    client = stack.client(key)
    answer = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=4, stream=True
    )
    streamed_id = None
    async for chunk in stream:
        streamed_id = streamed_id or chunk.id
    assert answer.id.startswith("chatcmpl-") and streamed_id and streamed_id != answer.id
    for upstream_id, call_type in ((answer.id, "chat"), (streamed_id, "chat")):
        (row,) = await stack.admin.get("/spend/logs", request_id=upstream_id)
        assert row["request_id"] == upstream_id and row["sidecar_request_id"] != upstream_id
        assert row["api_key"] == token_of(key) and row["metadata"]["user_api_key_alias"] == "logs"
        assert row["status"] == "success" and row["spend"] > 0
        assert call_type in row["call_type"]
        # The sidecar's own id finds it too.
        (again,) = await stack.admin.get("/spend/logs", request_id=row["sidecar_request_id"])
        assert again == row
    today = datetime.now(UTC).date().isoformat()
    # LiteLLM: with both dates, spend per day unless summarize is false.
    (day,) = await stack.admin.get("/spend/logs", api_key=key, start_date=today, end_date=today)
    assert day["startTime"] == today and day["spend"] == pytest.approx(
        await logged_spend(stack, api_key=key)
    )
    assert day[token_of(key)] == pytest.approx(day["spend"]) and "gpt-4o" in day["models"]
    rows = await stack.admin.get(
        "/spend/logs", api_key=key, start_date=today, end_date=today, summarize="false"
    )
    assert len(rows) == 2
    status, body = await stack.admin.call("GET", "/spend/logs", summarize="perhaps")
    assert status == 400 and body["error"]["param"] == "summarize"


async def test_the_global_spend_routes_answer_in_litellms_shapes(stack: Stack) -> None:
    await stack.admin.post("/team/new", {"team_id": "t-glob", "team_alias": "Globex"})
    big = await stack.key(key_alias="big", team_id="t-glob")
    small = await stack.key(key_alias="small")
    for key, n, user in ((big, 3, "c-big"), (small, 1, "c-small")):
        for _ in range(n):
            await stack.client(key).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=4, user=user
            )
    one = 10e-6 + 4 * 2e-6

    top = await stack.admin.get("/global/spend/keys", limit="1")
    assert top == [
        {
            "api_key": token_of(big),
            "key_alias": "big",
            "key_name": "sk-..." + big[-4:],
            "total_spend": pytest.approx(3 * one),
        }
    ]
    assert len(await stack.admin.get("/global/spend/keys")) == 2

    (model,) = await stack.admin.get("/global/spend/models")
    assert model == {"model": "gpt-4o", "total_spend": pytest.approx(4 * one)}

    teams = await stack.admin.get("/global/spend/teams")
    assert set(teams) == {"daily_spend", "teams", "total_spend_per_team"}
    assert teams["teams"] == ["Globex", "Unassigned"]
    (daily,) = teams["daily_spend"]
    assert daily["date"] == datetime.now(UTC).date().isoformat()
    assert daily["Globex"] == pytest.approx(3 * one) and daily["Unassigned"] == pytest.approx(one)
    assert teams["total_spend_per_team"][0] == {
        "team_id": "Globex",
        "total_spend": pytest.approx(3 * one),
    }

    users = await stack.admin.post("/global/spend/end_users", {})
    assert users == [
        {"end_user": "c-big", "total_count": 3, "total_spend": pytest.approx(3 * one)},
        {"end_user": "c-small", "total_count": 1, "total_spend": pytest.approx(one)},
    ]
    assert [
        u["end_user"] for u in await stack.admin.post("/global/spend/end_users", {"api_key": small})
    ] == ["c-small"]
    later = datetime.now(UTC) + timedelta(hours=1)
    window = {"startTime": later.isoformat(), "endTime": (later + timedelta(hours=1)).isoformat()}
    assert await stack.admin.post("/global/spend/end_users", window) == []

    (day,) = await stack.admin.get("/global/spend/report", group_by="customer")
    assert {c["customer"] for c in day["customers"]} == {"c-big", "c-small"}
    (row,) = [c for c in day["customers"] if c["customer"] == "c-big"]
    assert row["total_spend"] == pytest.approx(3 * one)
    assert row["metadata"] == [
        {
            "model": "gpt-4o",
            "api_key": token_of(big),
            "spend": pytest.approx(3 * one),
            "total_tokens": 42,
        }
    ]
    (day,) = await stack.admin.get("/global/spend/report")  # group_by=team by default
    names = {t["team_name"]: t for t in day["teams"]}
    assert set(names) == {"Globex", "Unassigned Team"}
    assert names["Globex"]["team_id"] == "t-glob"
    per_key = await stack.admin.get("/global/spend/report", group_by="api_key")
    assert [k["api_key"] for k in per_key] == [token_of(big), token_of(small)]
    assert per_key[0]["total_cost"] == pytest.approx(3 * one)
    assert per_key[0]["model_details"] == [
        {
            "model": "gpt-4o",
            "total_cost": pytest.approx(3 * one),
            "total_input_tokens": 30,
            "total_output_tokens": 12,
        }
    ]
    (only,) = await stack.admin.get("/global/spend/report", api_key=small)
    assert only["api_key"] == token_of(small)

    for method, path, params, body, param in (
        ("GET", "/global/spend/keys", {"limit": "0"}, None, "limit"),
        ("GET", "/global/spend/keys", {"limit": "x" * 300}, None, "limit"),
        ("GET", "/global/spend/models", {"limit": "-3"}, None, "limit"),
        ("GET", "/global/spend/report", {"group_by": "model"}, None, "group_by"),
        ("GET", "/global/spend/report", {"start_date": "yesterday"}, None, "start_date"),
        ("POST", "/global/spend/end_users", {}, {"startTime": "soon"}, "startTime"),
        ("POST", "/global/spend/end_users", {}, {"planet": "mars"}, "planet"),
        ("POST", "/global/spend/end_users", {}, {"api_key": 7}, "api_key"),
        ("POST", "/global/spend/end_users", {}, [], None),
    ):
        status, answer = await stack.admin.call(method, path, body, **params)
        assert status == 400, (path, params, body, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["message"] and answer["error"]["param"] == param, answer
