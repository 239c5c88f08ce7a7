"""Issue 13, the admin side: every number the engine cannot hold, every malformed body and
query is a 400 naming the field and its range; a delete never un-limits a key; a key or end
user naming a vanished user, team or budget is refused; info shows spend past max_budget;
/key/update's duration counts from now; /key/generate's user and team must exist."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import datetime

import msgpack
import pytest
from aiohttp import web

from ratelimiter import Duration, InvalidDuration, parse_duration
from ratelimiter.engine.durations import period_bounds, time_zone
from ratelimiter.engine.limits import MAX_AMOUNT
from ratelimiter.gateway.admin import add_admin_routes
from ratelimiter.gateway.models import validate
from ratelimiter.gateway.policy import Scope, scope_budgets
from ratelimiter.gateway.store import EntityError, Store, hash_key
from ratelimiter.testing.fake_upstream import FakeUpstream

from ..conftest import MESSAGES, Admin, Cluster, Stack, _stack, running_upstream

ENVELOPE = {"message", "type", "param", "code"}
MAX_DOLLARS = MAX_AMOUNT / 1e9
# The longest duration in each unit: 100 years of 365.25 days.
LONGEST = {
    "s": 3_155_760_000,
    "m": 52_596_000,
    "h": 876_600,
    "d": 36_525,
    "w": 5_217,
    "mo": 1_200,
    "y": 100,
}


async def chat(stack: Stack, key: str, **extra: object) -> tuple[int, dict]:
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, **extra},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, await response.json(content_type=None)


async def refused(admin: Admin, path: str, body: object, status: int = 400) -> str:
    """The error message of a call that must fail with ``status``, in OpenAI's envelope."""
    got, payload = await admin.call("POST", path, body)
    assert got == status, payload
    assert set(payload["error"]) == ENVELOPE
    return payload["error"]["message"]


def store_of(stack: Stack) -> Store:
    return Store(stack.engine.redis, prefix=stack.settings.key_prefix)


# -- item 3: a delete never un-limits a key -------------------------------------------


async def test_deleting_a_user_deletes_its_keys(stack: Stack) -> None:
    await stack.admin.post("/user/new", {"user_id": "u-zero", "rpm_limit": 0})
    key = await stack.key(user_id="u-zero")
    assert (await chat(stack, key))[0] == 429
    deleted = await stack.admin.post("/user/delete", {"user_ids": ["u-zero"]})
    status, body = await chat(stack, key)
    assert status == 401, body  # before: 200, the user's limit gone with the user
    assert hash_key(key) in deleted["deleted_keys"]
    got, _ = await stack.admin.call("GET", "/key/info", key=key)
    assert got == 404


async def test_a_deleted_user_leaves_its_teams(stack: Stack) -> None:
    await stack.admin.post("/user/new", {"user_id": "u-gone"})
    await stack.admin.post(
        "/team/new",
        {"team_id": "t-left", "members": [{"user_id": "u-gone"}, {"user_id": "u-stays"}]},
    )
    await stack.admin.post("/user/delete", {"user_ids": ["u-gone"]})
    team = await stack.admin.get("/team/info", team_id="t-left")
    assert [m["user_id"] for m in team["team_info"]["members"]] == ["u-stays"]


async def test_deleting_a_team_deletes_its_keys(stack: Stack) -> None:
    await stack.admin.post("/team/new", {"team_id": "t-zero", "rpm_limit": 0})
    key = await stack.key(team_id="t-zero")
    assert (await chat(stack, key))[0] == 429
    deleted = await stack.admin.post("/team/delete", {"team_ids": ["t-zero"]})
    status, body = await chat(stack, key)
    assert status == 401, body  # before: 200
    assert deleted["deleted_keys"] == [hash_key(key)]


async def test_a_budget_still_named_cannot_be_deleted(stack: Stack) -> None:
    await stack.admin.post("/budget/new", {"budget_id": "b-zero", "rpm_limit": 0})
    key = await stack.key(budget_id="b-zero")
    await stack.admin.post("/customer/new", {"user_id": "c-zero", "budget_id": "b-zero"})
    await stack.admin.post("/customer/new", {"user_id": "c-one", "budget_id": "b-zero"})
    message = await refused(stack.admin, "/budget/delete", {"id": "b-zero"}, 409)
    assert "still used by 1 key, 2 customers" in message
    assert (await chat(stack, key))[0] == 429  # the budget still limits its key
    await stack.admin.post("/key/update", {"key": key, "budget_id": None})
    await stack.admin.post("/customer/delete", {"user_ids": ["c-zero", "c-one"]})
    await stack.admin.post("/budget/delete", {"id": "b-zero"})


async def test_deleting_a_user_finds_keys_moved_to_it_and_not_keys_moved_away(
    stack: Stack,
) -> None:
    for user in ("u-a", "u-b"):
        await stack.admin.post("/user/new", {"user_id": user})
    moved = await stack.key(user_id="u-a")
    await stack.admin.post("/key/update", {"key": moved, "user_id": "u-b"})
    deleted = await stack.admin.post("/user/delete", {"user_ids": ["u-a"]})
    assert hash_key(moved) not in deleted["deleted_keys"]  # only the key /user/new gave u-a
    await stack.admin.get("/key/info", key=moved)
    deleted = await stack.admin.post("/user/delete", {"user_ids": ["u-b"]})
    assert hash_key(moved) in deleted["deleted_keys"]


async def test_keys_written_before_the_reference_sets_are_found(stack: Stack) -> None:
    """A key stored by an older version (no reference sets, no marker) is still deleted
    with its user: the first lookup indexes what is already there."""
    await stack.admin.post("/user/new", {"user_id": "u-old"})
    token = hash_key("sk-written-by-an-older-version")
    prefix, redis = stack.settings.key_prefix, stack.engine.redis
    await redis.set(
        f"{prefix}e:{{key}}:{token}", msgpack.packb({"token": token, "user_id": "u-old"})
    )
    await redis.sadd(f"{prefix}e:{{key}}:index", token)
    deleted = await stack.admin.post("/user/delete", {"user_ids": ["u-old"]})
    assert token in deleted["deleted_keys"]
    assert not await redis.exists(f"{prefix}e:{{key}}:{token}")


async def refused_soon(stack: Stack, key: str, message: str, **extra: object) -> None:
    """The sidecar hears of a change made behind its back within its invalidation delay."""
    deadline = time.monotonic() + 2
    while True:
        status, body = await chat(stack, key, **extra)
        if status == 403:
            assert message in body["error"]["message"], body
            return
        assert status == 200 and time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("kind", "entity_id", "fields", "key_fields", "message"),
    [
        ("user", "u-gone", {"user_id": "u-gone"}, {"user_id": "u-gone"}, "user 'u-gone'"),
        ("team", "t-gone", {"team_id": "t-gone"}, {"team_id": "t-gone"}, "team 't-gone'"),
        (
            "budget",
            "b-gone",
            {"budget_id": "b-gone", "rpm_limit": 100},
            {"budget_id": "b-gone"},
            "budget 'b-gone'",
        ),
    ],
)
async def test_a_key_naming_a_vanished_entity_is_refused(
    stack: Stack, kind: str, entity_id: str, fields: dict, key_fields: dict, message: str
) -> None:
    """Removed behind the admin API's back (a race, an older version): never "no limit"."""
    await stack.admin.post(f"/{kind}/new", fields)
    key = await stack.key(**key_fields)
    assert (await chat(stack, key, max_tokens=4))[0] == 200
    await store_of(stack).delete(kind, entity_id)
    await refused_soon(stack, key, message, max_tokens=4)  # before: 200, unlimited


async def test_an_end_user_naming_a_vanished_budget_is_refused(stack: Stack) -> None:
    await stack.admin.post("/budget/new", {"budget_id": "b-end", "max_budget": 1})
    await stack.admin.post("/customer/new", {"user_id": "c-end", "budget_id": "b-end"})
    key = await stack.key()
    assert (await chat(stack, key, max_tokens=4, user="c-end"))[0] == 200
    await store_of(stack).delete("budget", "b-end")
    await refused_soon(
        stack, key, "end user 'c-end' names budget 'b-end'", max_tokens=4, user="c-end"
    )
    info = await stack.admin.get("/customer/info", end_user_id="c-end")
    assert "budget 'b-end'" in info["error"]  # info still answers, and says what is wrong


@pytest.fixture
async def cluster_stack(ns: str, redis_cluster: Cluster) -> AsyncIterator[Stack]:
    async with running_upstream(FakeUpstream(seed=3)) as upstream:
        async for stack in _stack(ns, redis_cluster.url, FakeUpstream(seed=3), upstream):
            yield stack


async def test_deletes_follow_references_on_a_cluster(cluster_stack: Stack) -> None:
    stack = cluster_stack
    await stack.admin.post("/budget/new", {"budget_id": "b-c", "max_budget": 1})
    await stack.admin.post("/user/new", {"user_id": "u-c", "budget_id": "b-c"})
    key = await stack.key(user_id="u-c")
    message = await refused(stack.admin, "/budget/delete", {"id": "b-c"}, 409)
    assert "1 user" in message
    deleted = await stack.admin.post("/user/delete", {"user_ids": ["u-c"]})
    assert hash_key(key) in deleted["deleted_keys"]
    await stack.admin.post("/budget/delete", {"id": "b-c"})


# -- item 4: numbers the engine cannot hold -------------------------------------------

DOLLARS_MAX = "at most 9007199.25 dollars"
COUNT_MAX = f"at most {MAX_AMOUNT}"
DURATION_MAX = "the longest is 100 years"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/key/generate", {"max_budget": 1e10}, DOLLARS_MAX),
        ("/key/generate", {"max_budget": 1e308}, DOLLARS_MAX),
        ("/key/generate", {"soft_budget": 1e10}, DOLLARS_MAX),
        ("/key/generate", {"rpm_limit": 2**63 - 1}, COUNT_MAX),
        ("/key/generate", {"tpm_limit": 2**60}, COUNT_MAX),
        ("/key/generate", {"max_parallel_requests": 2**53}, COUNT_MAX),
        ("/key/generate", {"model_max_budget": {"gpt-4o": {"max_budget": 1e308}}}, DOLLARS_MAX),
        ("/key/generate", {"model_max_budget": {"gpt-4o": {"rpm_limit": 2**60}}}, COUNT_MAX),
        ("/key/generate", {"model_rpm_limit": {"gpt-4o": 2**60}}, COUNT_MAX),
        ("/key/generate", {"model_tpm_limit": {"gpt-4o": 2**63 - 1}}, COUNT_MAX),
        (
            "/key/generate",
            {"budget_limits": [{"max_budget": 1e10, "budget_duration": "1d"}]},
            DOLLARS_MAX,
        ),
        (
            "/key/generate",
            {"budget_limits": [{"max_budget": 1, "budget_duration": "100000y"}]},
            DURATION_MAX,
        ),
        ("/key/generate", {"budget_duration": "100000y"}, DURATION_MAX),
        ("/key/generate", {"duration": "99999999999999999999d"}, DURATION_MAX),
        ("/key/generate", {"duration": "1" * 5000 + "d"}, DURATION_MAX),
        ("/key/update", {"key": "sk-any", "rpm_limit": 2**63 - 1}, COUNT_MAX),
        ("/key/update", {"key": "sk-any", "duration": "36526d"}, DURATION_MAX),
        ("/user/new", {"max_budget": 1e10}, DOLLARS_MAX),
        ("/team/new", {"tpm_limit": 2**60}, COUNT_MAX),
        ("/customer/new", {"user_id": "c", "max_budget": 1e10}, DOLLARS_MAX),
        ("/budget/new", {"budget_id": "b", "budget_duration": "101y"}, DURATION_MAX),
        (
            "/team/member_add",
            {"team_id": "t", "member": {"user_id": "ana"}, "max_budget_in_team": 1e10},
            DOLLARS_MAX,
        ),
    ],
)
async def test_numbers_past_the_engines_range_are_refused(
    admin: Admin, path: str, body: dict, message: str
) -> None:
    assert message in await refused(admin, path, body)  # before: 200, then a 500 per request


def test_not_a_number_and_infinity_are_refused() -> None:
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(EntityError, match="non-negative number of dollars") as raised:
            validate("key", {"max_budget": value})
        assert raised.value.status == 400


async def test_the_largest_values_are_accepted_and_served(stack: Stack) -> None:
    key = await stack.key(
        max_budget=MAX_DOLLARS,
        rpm_limit=MAX_AMOUNT,
        tpm_limit=MAX_AMOUNT,
        max_parallel_requests=MAX_AMOUNT,
        budget_duration="100y",
        duration="100y",
    )
    assert (await chat(stack, key, max_tokens=4))[0] == 200
    (window,) = (await stack.admin.get("/key/info", key=key))["info"]["budget_windows"]
    assert window["max_budget"] == MAX_DOLLARS and window["budget_duration"] == "100y"


def test_durations_end_at_a_hundred_years_and_their_periods_compute() -> None:
    now = int(time.time() * 1000)
    for unit, most in LONGEST.items():
        longest = parse_duration(f"{most}{unit}")
        for zone in ("UTC", "Pacific/Kiritimati", "America/St_Johns"):
            start, end = period_bounds(longest, now, time_zone(zone))
            assert start <= now < end
            assert datetime.fromtimestamp(end / 1000).year <= 2071
        with pytest.raises(InvalidDuration, match="the longest is 100 years"):
            parse_duration(f"{most + 1}{unit}")
    with pytest.raises(InvalidDuration, match=r"\(5003 characters\)"):  # not echoed whole
        parse_duration("9" * 5000 + "d")
    with pytest.raises(InvalidDuration, match="the longest is 100 years"):
        Duration(10**5000, "d")  # built directly, not parsed: the same bound


# -- item 6: malformed bodies, queries and lists --------------------------------------


def admin_post_routes() -> list[str]:
    app = web.Application()
    add_admin_routes(app)
    canonical = {r.resource.canonical for r in app.router.routes() if r.method == "POST"}
    return sorted(path.replace("{key_id}", "sk-unknown") for path in canonical)


@pytest.mark.parametrize("raw", ["[1, 2]", '"x"', "5", "null", "true"])
async def test_every_admin_post_route_refuses_a_body_that_is_not_an_object(
    admin: Admin, raw: str
) -> None:
    routes = admin_post_routes()
    assert len(routes) >= 20
    for path in routes:
        async with admin.session.post(
            admin.base + path,
            data=raw,
            headers={"Authorization": f"Bearer {admin.key}", "Content-Type": "application/json"},
        ) as response:
            payload = await response.json(content_type=None)
            assert response.status == 400, (path, payload)  # before: 500 on 17 routes
            assert set(payload["error"]) == ENVELOPE
            assert "must be a JSON object" in payload["error"]["message"]


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/spend/logs", {"page": "99999999999999999999999"}, "page must be a whole number"),
        ("/spend/logs", {"page": "0"}, "from 1 to 1000000"),
        ("/spend/logs", {"page": "9" * 5000}, "page must be a whole number"),
        ("/spend/logs", {"page_size": "5000"}, "page_size must be a whole number from 1 to 1000"),
        ("/spend/logs", {"start_date": "9999-12-31"}, "from 1970-01-01 to 9999-12-30"),
        ("/spend/logs", {"end_date": "9999-12-31"}, "end_date must be a date"),
        ("/spend/logs", {"start_date": "0001-01-01", "end_date": "0001-01-02"}, "start_date"),
        ("/global/spend", {"start_date": "9999-12-30", "end_date": "9999-12-31"}, "end_date"),
        ("/global/spend/report", {"end_date": "9999-12-31"}, "end_date must be a date"),
        ("/key/info", {"key": "k" * 300}, "key must be an id of 1 to 256 characters"),
    ],
)
async def test_queries_out_of_range_are_refused(
    admin: Admin, path: str, params: dict[str, str], message: str
) -> None:
    status, payload = await admin.call("GET", path, **params)
    assert status == 400, payload
    assert set(payload["error"]) == ENVELOPE and message in payload["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/customer/block", {"user_ids": [{"a": 1}]}, "user_ids must be an id"),
        ("/customer/unblock", {"user_ids": [[1]]}, "user_ids must be an id"),
        ("/budget/info", {"budgets": [[1]]}, "budgets must be an id"),
        ("/budget/info", {"budgets": "b" * 300}, "budgets must be an id"),
        ("/user/delete", {"user_ids": [5]}, "user_ids must be an id"),
        ("/key/delete", {"keys": ["sk-x"] * 1001}, "at most 1000 ids"),
        ("/customer/block", {"user_ids": ["c"] * 1001}, "at most 1000 ids"),
        ("/team/member_add", {"team_id": "t", "member": ["ana"]}, "member"),
        ("/team/member_add", {"team_id": "t", "member": 5}, "must be an object"),
        ("/team/member_add", {"team_id": ["t"], "member": {"user_id": "a"}}, "team_id must be"),
        ("/key/update", {"key": 5}, "key must be an id"),
        ("/key/generate", {"models": ["m"] * 1001}, "at most 1000 names"),
        (
            "/key/generate",
            {"budget_limits": [{"max_budget": 1, "budget_duration": "1d"}] * 33},
            "at most 32",
        ),
    ],
)
async def test_lists_and_ids_are_checked_and_bounded(
    admin: Admin, path: str, body: dict, message: str
) -> None:
    assert message in await refused(admin, path, body)


# -- item 8: info shows real spend ----------------------------------------------------


async def test_info_shows_spend_past_max_budget(stack: Stack) -> None:
    """A request charged more than it held (its usage beat its estimate) passes the budget:
    info says by how much."""
    key = await stack.key(max_budget=0.000001, budget_duration="1d")  # 1,000 nano-dollars
    fields = {"max_budget": 0.000001, "budget_duration": "1d"}
    scope = Scope("key", hash_key(key), fields)
    (budget,) = scope_budgets(scope, stack.settings.key_prefix, cost=600)
    decision = await stack.engine.acquire(None, [budget], ledger=[f"key:{hash_key(key)}"])
    assert decision.allowed and decision.reservation is not None
    await stack.engine.settle(decision.reservation, {"spend": 42_000})
    info = (await stack.admin.get("/key/info", key=key))["info"]
    (window,) = info["budget_windows"]
    assert info["spend"] == window["spend"] == pytest.approx(42e-6)  # before: 1e-06
    assert window["remaining"] == 0.0 and window["max_budget"] == 0.000001
    status, body = await chat(stack, key, max_tokens=4)
    assert status == 429 and body["error"]["type"] == "budget_exceeded"


async def test_info_counts_holds_in_remaining_not_in_spend(stack: Stack) -> None:
    key = await stack.key(max_budget=0.00001, budget_duration="1d")
    scope = Scope("key", hash_key(key), {"max_budget": 0.00001, "budget_duration": "1d"})
    (budget,) = scope_budgets(scope, stack.settings.key_prefix, cost=4_000)
    decision = await stack.engine.acquire(None, [budget])
    (window,) = (await stack.admin.get("/key/info", key=key))["info"]["budget_windows"]
    assert (window["spend"], window["remaining"]) == (0.0, pytest.approx(6e-6))
    assert decision.reservation is not None
    await stack.engine.settle(decision.reservation, {"spend": 3_000})
    (window,) = (await stack.admin.get("/key/info", key=key))["info"]["budget_windows"]
    assert (window["spend"], window["remaining"]) == (pytest.approx(3e-6), pytest.approx(7e-6))


# -- item 10 and 16: /key/update's duration, /key/generate's owners ------------------


async def test_key_update_duration_counts_from_now(stack: Stack) -> None:
    key = await stack.key(duration="1h")
    before = int(time.time() * 1000)
    updated = await stack.admin.post("/key/update", {"key": key, "duration": "1s"})
    assert before + 1000 <= updated["expires_at"] <= time.time() * 1000 + 1000
    assert updated["expires"] is not None
    await asyncio.sleep(1.1)
    status, body = await chat(stack, key, max_tokens=4)
    assert status == 401 and "expired" in body["error"]["message"]  # before: 200 for an hour


async def test_calendar_durations_expire_on_the_calendar(admin: Admin) -> None:
    created = await admin.post("/key/generate", {"duration": "1mo"})  # before: 500
    days = (created["expires_at"] - _ms(created["created_at"])) / 86_400_000
    assert 28 <= days <= 31


async def test_key_generate_creates_its_user_and_needs_its_team(admin: Admin) -> None:
    await admin.post("/key/generate", {"user_id": "first-seen"})
    info = await admin.get("/user/info", user_id="first-seen")  # before: 404
    assert info["user_id"] == "first-seen"
    message = await refused(admin, "/key/generate", {"team_id": "no-such-team"}, 404)
    assert "team_id 'no-such-team' does not exist" in message
    key = (await admin.post("/key/generate", {}))["key"]
    await refused(admin, "/key/update", {"key": key, "team_id": "no-such-team"}, 404)


async def test_a_key_for_a_model_that_does_not_exist_is_refused(stack: Stack) -> None:
    """Issue 16 item 8: a typo left a key that could call nothing."""
    status, body = await stack.admin.call("POST", "/key/generate", {"models": ["gpt-5-typo"]})
    assert (status, body["error"]["param"]) == (400, "models"), body
    assert "'gpt-5-typo' matches no model served here" in body["error"]["message"]
    names = ["gpt-4o", "openai/text-embedding-3-small", "openai/*", "all-proxy-models"]
    assert (await stack.admin.post("/key/generate", {"models": names}))["models"] == names
    status, _ = await stack.admin.call("POST", "/team/new", {"models": ["gpt-5-typo"]})
    assert status == 400


def _ms(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp() * 1000
