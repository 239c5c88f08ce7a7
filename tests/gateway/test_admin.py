"""The admin API over real HTTP, with LiteLLM's routes and field names."""

from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import pytest
import redis

from ratelimiter.gateway.config import Settings

from ..conftest import Admin, running_sidecar


async def test_keys_are_shown_once_and_stored_hashed(admin: Admin, redis_url: str) -> None:
    created = await admin.post(
        "/key/generate", {"key_alias": "ci", "max_budget": 5, "budget_duration": "10s"}
    )
    plain, token = created["key"], created["token"]
    assert plain.startswith("sk-") and len(plain) > 30
    assert token == hashlib.sha256(plain.encode()).hexdigest()
    by_plain = await admin.get("/key/info", key=plain)
    by_hash = await admin.get("/key/info", key=token)
    assert by_plain["key"] == by_hash["key"] == token
    assert by_plain["info"]["key_alias"] == by_hash["info"]["key_alias"] == "ci"
    client = redis.Redis.from_url(redis_url)
    stored = [client.dump(k) or b"" for k in client.scan_iter(match="*")]
    assert not any(plain.encode() in value for value in stored)  # only the hash is kept
    (window,) = by_plain["info"]["budget_windows"]
    assert (window["max_budget"], window["spend"], window["budget_duration"]) == (5.0, 0.0, "10s")
    assert window["budget_reset_at"] is not None
    assert token in (await admin.get("/key/list"))["keys"]


async def test_user_with_limits_and_a_second_key(admin: Admin) -> None:
    user = await admin.post(
        "/user/new",
        {"user_id": "krrish", "max_parallel_requests": 10, "tpm_limit": 20, "rpm_limit": 4},
    )
    assert user["key"].startswith("sk-")
    # this sidecar serves no model: a wildcard is what a key may name ahead of them
    second = await admin.post("/key/generate", {"user_id": "krrish", "models": ["openai/*"]})
    assert second["user_id"] == "krrish"
    info = await admin.get("/user/info", user_id="krrish")
    assert (info["user_info"]["rpm_limit"], info["user_info"]["tpm_limit"]) == (4, 20)


async def test_update_block_unblock_delete(admin: Admin) -> None:
    key = (await admin.post("/key/generate", {"rpm_limit": 5}))["key"]
    assert (await admin.post("/key/update", {"key": key, "rpm_limit": 7}))["rpm_limit"] == 7
    assert (await admin.post("/key/block", {"key": key}))["blocked"] is True
    assert (await admin.post("/key/unblock", {"key": key}))["blocked"] is False
    assert (await admin.post("/key/delete", {"keys": [key]}))["deleted_keys"] == [key]
    status, body = await admin.call("GET", "/key/info", key=key)
    assert status == 404 and "not found" in body["error"]["message"]


async def test_teams_and_members(admin: Admin) -> None:
    team = await admin.post("/team/new", {"team_alias": "research", "max_budget": 50})
    team_id = team["team_id"]
    await admin.post(
        "/team/member_add",
        {"team_id": team_id, "member": {"user_id": "ana", "role": "user"}, "max_budget_in_team": 2},
    )
    info = await admin.get("/team/info", team_id=team_id)
    assert info["team_info"]["members"] == [
        {"user_id": "ana", "user_email": None, "role": "user", "max_budget_in_team": 2.0}
    ]
    status, body = await admin.call(
        "POST", "/team/member_add", {"team_id": team_id, "member": {"user_id": "ana"}}
    )
    assert status == 409 and "already in team" in body["error"]["message"]
    await admin.post("/team/member_delete", {"team_id": team_id, "user_id": "ana"})
    assert (await admin.get("/team/info", team_id=team_id))["team_info"]["members"] == []
    await admin.post("/team/delete", {"team_ids": [team_id]})


async def test_budgets_and_customers(admin: Admin) -> None:
    await admin.post(
        "/budget/new",
        {"budget_id": "default", "max_budget": 1, "budget_duration": "daily", "rpm_limit": 10},
    )
    assert [b["budget_id"] for b in await admin.get("/budget/list")] == ["default"]
    await admin.post("/budget/update", {"budget_id": "default", "max_budget": 2})
    assert (await admin.post("/budget/info", {"budgets": ["default"]}))[0]["max_budget"] == 2.0
    await admin.post("/end_user/new", {"user_id": "cust-1", "budget_id": "default"})
    info = await admin.get("/customer/info", end_user_id="cust-1")
    (window,) = info["budget_windows"]  # the customer's limits come from its budget
    assert (window["max_budget"], window["budget_duration"]) == (2.0, "1d")
    await admin.post("/customer/block", {"user_ids": ["cust-1"]})
    assert (await admin.get("/customer/info", end_user_id="cust-1"))["blocked"] is True
    await admin.post("/customer/delete", {"user_ids": ["cust-1"]})
    await admin.post("/budget/delete", {"id": "default"})


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/key/generate", {"max_budgett": 5}, 400, "max_budgett: unknown field for a key"),
        ("/key/generate", {"rpm_limit": -1}, 400, "rpm_limit: must be a non-negative whole number"),
        ("/key/generate", {"max_budget": "lots"}, 400, "max_budget: must be a non-negative number"),
        ("/key/generate", {"budget_duration": "10 sec"}, 400, "invalid duration '10 sec'"),
        ("/key/generate", {"budget_id": "nope"}, 404, "budget_id 'nope' does not exist"),
        ("/key/generate", {"models": "gpt-4o"}, 400, "models: must be a list of names"),
        ("/key/generate", [1, 2], 400, "must be a JSON object"),
        (
            "/customer/new",
            {"user_id": "c", "budget_id": "x", "max_budget": 1},
            400,
            "either budget_id or max_budget",
        ),
        (
            "/team/new",
            {"model_max_budget": {"gpt-4o": {"max_budget": 1, "window": "1d"}}},
            400,
            "model_max_budget.gpt-4o.window: unknown field",
        ),
        ("/team/update", {"team_id": "ghost", "rpm_limit": 1}, 404, "team 'ghost' not found"),
        ("/key/delete", {"keys": []}, 400, "keys must be a non-empty list"),
    ],
)
async def test_validation_errors(
    admin: Admin, path: str, body: object, status: int, message: str
) -> None:
    got, payload = await admin.call("POST", path, body)
    assert got == status, payload
    assert message in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}


async def test_duplicates_conflict(admin: Admin) -> None:
    await admin.post("/budget/new", {"budget_id": "b1", "max_budget": 1})
    status, payload = await admin.call("POST", "/budget/new", {"budget_id": "b1"})
    assert (status, payload["error"]["type"]) == (409, "conflict_error")


async def test_bad_requests_and_auth(admin: Admin) -> None:
    async with admin.session.post(
        admin.base + "/key/generate",
        data="{not json",
        headers={"Authorization": f"Bearer {admin.key}", "Content-Type": "application/json"},
    ) as r:
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
    async with admin.session.post(
        admin.base + "/key/generate",
        data="a=1",
        headers={"Authorization": f"Bearer {admin.key}", "Content-Type": "text/plain"},
    ) as r:
        assert r.status == 400 and "application/json" in (await r.json())["error"]["message"]
    async with admin.session.post(admin.base + "/key/generate", json={}) as r:
        assert r.status == 401 and "missing API key" in (await r.json())["error"]["message"]
    virtual = (await admin.post("/key/generate", {}))["key"]
    status, payload = await Admin(admin.session, admin.base, virtual).call("GET", "/budget/list")
    assert status == 401 and "Only proxy admin" in payload["error"]["message"]
    assert "master key" in payload["error"]["message"]


async def test_a_change_on_one_sidecar_reaches_another_within_a_second(
    settings: Settings, redis_url: str
) -> None:
    async with (
        running_sidecar(settings, redis_url) as a,
        running_sidecar(settings, redis_url) as b,
        aiohttp.ClientSession() as session,
    ):
        one, two = Admin(session, a), Admin(session, b)
        key = (await one.post("/key/generate", {"rpm_limit": 1}))["key"]
        assert (await two.get("/key/info", key=key))["info"]["rpm_limit"] == 1  # now cached on b
        await asyncio.sleep(0.2)  # b's listener is subscribed
        await one.post("/key/update", {"key": key, "rpm_limit": 99})
        started = time.monotonic()
        while (await two.get("/key/info", key=key))["info"]["rpm_limit"] != 99:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.02)


async def test_health(admin: Admin) -> None:
    assert await admin.get("/health/liveliness") == "I'm alive!"
    assert (await admin.get("/health/readiness"))["status"] == "healthy"
