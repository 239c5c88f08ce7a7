"""Organizations (issue 15 item 4): LiteLLM's /organization routes over real HTTP, and the
organization as a scope above teams, enforced in the same atomic admission as the others."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import msgpack
import pytest

from ratelimiter import SlidingWindow
from ratelimiter.gateway.policy import Scope

from ..conftest import MESSAGES, Admin, Stack
from .test_small_limits import PRICE_IN, PRICE_OUT, sidecars

# -- the admin routes ----------------------------------------------------------------------


async def test_create_info_list_update(admin: Admin) -> None:
    created = await admin.post(
        "/organization/new",
        {
            "organization_id": "acme",
            "organization_alias": "Acme Corp",
            "models": ["openai/*"],
            "max_budget": 100,
            "budget_duration": "30d",
            "rpm_limit": 50,
            "metadata": {"cost_center": "7"},
            "tpd_limit": 1000,  # accepted, not enforced: shown in the budget table
        },
    )
    assert created["organization_id"] == "acme"
    table = created["litellm_budget_table"]
    assert (table["max_budget"], table["rpm_limit"], table["tpd_limit"]) == (100.0, 50, 1000)
    assert created["members"] == [] and created["teams"] == [] and created["spend"] == 0.0
    assert datetime.fromisoformat(created["created_at"]).tzinfo is UTC
    info = await admin.get("/organization/info", organization_id="acme")
    assert info["organization_alias"] == "Acme Corp" and info["metadata"] == {"cost_center": "7"}
    (window,) = info["budget_windows"]
    assert (window["max_budget"], window["budget_duration"]) == (100.0, "30d")
    # LiteLLM's deprecated POST form answers a list
    (posted,) = await admin.post("/organization/info", {"organizations": ["acme"]})
    assert posted["organization_id"] == "acme"

    await admin.post("/organization/new", {"organization_alias": "Beta"})  # a generated id
    listed = await admin.get("/organization/list")
    assert {o["organization_alias"] for o in listed} == {"Acme Corp", "Beta"}
    assert [
        o["organization_id"] for o in await admin.get("/organization/list", org_alias="acm")
    ] == ["acme"]
    assert [
        o["organization_alias"] for o in await admin.get("/organization/list", org_id="acme")
    ] == ["Acme Corp"]

    # LiteLLM's PATCH, with the limits nested as its UI sends them; a flat field too
    status, updated = await admin.call(
        "PATCH",
        "/organization/update",
        {
            "organization_id": "acme",
            "litellm_budget_table": {"max_budget": 7, "budget_reset_at": None},
            "tpm_limit": 900,
        },
    )
    assert status == 200, updated
    table = updated["litellm_budget_table"]
    assert (table["max_budget"], table["tpm_limit"], table["rpm_limit"]) == (7.0, 900, 50)
    assert updated["organization_alias"] == "Acme Corp"  # untouched
    posted = await admin.post("/organization/update", {"organization_id": "acme", "rpm_limit": 5})
    assert posted["litellm_budget_table"]["rpm_limit"] == 5


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/organization/new", {}, 400, "organization_alias: is required"),
        (
            "POST",
            "/organization/new",
            {"organization_alias": "a", "max_budgt": 1},
            400,
            "max_budgt",
        ),
        (
            "POST",
            "/organization/new",
            {"organization_alias": "a", "max_budget": "5"},
            400,
            "max_budget",
        ),
        (
            "POST",
            "/organization/new",
            {"organization_alias": "a", "max_budget": 1e300},
            400,
            "at most",
        ),
        (
            "POST",
            "/organization/new",
            {"organization_alias": "a", "rpm_limit": -1},
            400,
            "rpm_limit",
        ),
        (
            "POST",
            "/organization/new",
            {"organization_alias": "a", "rpm_limit": 2**60},
            400,
            "2**53",
        ),
        ("POST", "/organization/new", {"organization_alias": "x" * 300}, 400, "256"),
        ("POST", "/organization/new", {"organization_alias": "a", "models": "m"}, 400, "models"),
        (
            "POST",
            "/organization/new",
            {"organization_alias": "a", "budget_id": "nope"},
            404,
            "budget_id",
        ),
        (
            "POST",
            "/organization/new",
            {"organization_alias": "a", "models": ["gpt-9"]},
            400,
            "gpt-9",
        ),
        ("POST", "/organization/new", [1], 400, "JSON object"),
        ("PATCH", "/organization/update", {"organization_id": "nope"}, 404, "not found"),
        ("PATCH", "/organization/update", {"rpm_limit": 1}, 400, "organization_id"),
        (
            "PATCH",
            "/organization/update",
            {"organization_id": "o", "litellm_budget_table": {"max_budgt": 1}},
            400,
            "litellm_budget_table.max_budgt",
        ),
        (
            "PATCH",
            "/organization/update",
            {"organization_id": "o", "litellm_budget_table": {"max_budget": -1}},
            400,
            "max_budget",
        ),
        ("GET", "/organization/info", None, 400, "organization_id"),
        ("DELETE", "/organization/delete", {"organization_ids": []}, 400, "organization_ids"),
        ("DELETE", "/organization/delete", {"organization_ids": ["nope"]}, 404, "not found"),
        ("POST", "/organization/member_add", {"organization_id": "o"}, 400, "member: is required"),
        (
            "POST",
            "/organization/member_add",
            {"organization_id": "o", "member": {"user_id": "u", "role": "boss"}},
            400,
            "member.role",
        ),
        (
            "POST",
            "/organization/member_add",
            {"organization_id": "o", "member": [{"user_id": "u", "role": "org_admin", "x": 1}]},
            400,
            "member[0].x",
        ),
        (
            "POST",
            "/organization/member_add",
            {"organization_id": "o", "member": {"role": "org_admin"}},
            400,
            "user_id or user_email",
        ),
        ("DELETE", "/organization/member_delete", {"organization_id": "o"}, 400, "user_id"),
        (
            "DELETE",
            "/organization/member_delete",
            {"organization_id": "o", "user_id": "z"},
            404,
            "not a member",
        ),
    ],
)
async def test_hostile_input_is_a_4xx_naming_the_field(
    admin: Admin, method: str, path: str, body: object, status: int, says: str
) -> None:
    await admin.post("/organization/new", {"organization_id": "o", "organization_alias": "O"})
    got, answer = await admin.call(method, path, body)
    assert got == status, answer
    assert says in answer["error"]["message"], answer


async def test_an_organizations_budget_id_fills_its_limits_and_cannot_be_deleted(
    admin: Admin,
) -> None:
    await admin.post("/budget/new", {"budget_id": "gold", "rpm_limit": 3, "max_budget": 9})
    org = await admin.post(
        "/organization/new", {"organization_alias": "a", "budget_id": "gold", "max_budget": 1}
    )
    table = org["litellm_budget_table"]
    assert (table["budget_id"], table["rpm_limit"], table["max_budget"]) == ("gold", 3, 1.0)
    status, body = await admin.call("POST", "/budget/delete", {"id": "gold"})
    assert status == 409 and "1 organization" in body["error"]["message"]


async def test_teams_and_keys_in_an_organization(admin: Admin) -> None:
    await admin.post("/organization/new", {"organization_id": "o1", "organization_alias": "one"})
    await admin.post("/organization/new", {"organization_id": "o2", "organization_alias": "two"})
    status, body = await admin.call(
        "POST", "/team/new", {"team_id": "t", "organization_id": "missing"}
    )
    assert status == 404 and "/organization/new" in body["error"]["message"]
    await admin.post("/team/new", {"team_id": "t", "organization_id": "o1"})
    info = await admin.get("/organization/info", organization_id="o1")
    assert [t["team_id"] for t in info["teams"]] == ["t"]
    # a key in the team carries its team's organization (as LiteLLM copies it)
    key = await admin.post("/key/generate", {"team_id": "t"})
    assert key["organization_id"] == "o1"
    status, body = await admin.call(
        "POST", "/key/generate", {"team_id": "t", "organization_id": "o2"}
    )
    assert status == 400 and "conflicts with team 't'" in body["error"]["message"]
    status, body = await admin.call("POST", "/key/generate", {"organization_id": "missing"})
    assert status == 404
    # the team moves: its keys go with it, and the organizations list it accordingly
    await admin.post("/team/update", {"team_id": "t", "organization_id": "o2"})
    assert (await admin.get("/key/info", key=key["key"]))["info"]["organization_id"] == "o2"
    assert (await admin.get("/organization/info", organization_id="o1"))["teams"] == []
    await admin.post("/team/update", {"team_id": "t", "organization_id": None})
    assert (await admin.get("/key/info", key=key["key"]))["info"]["organization_id"] is None
    assert (await admin.get("/organization/info", organization_id="o2"))["teams"] == []


async def test_delete_takes_the_teams_and_keys_as_litellm_does(admin: Admin) -> None:
    await admin.post("/organization/new", {"organization_id": "gone", "organization_alias": "g"})
    await admin.post("/organization/new", {"organization_id": "kept", "organization_alias": "k"})
    await admin.post("/team/new", {"team_id": "tg", "organization_id": "gone"})
    await admin.post("/team/new", {"team_id": "tk", "organization_id": "kept"})
    in_team = (await admin.post("/key/generate", {"team_id": "tg"}))["key"]
    alone = (await admin.post("/key/generate", {"organization_id": "gone"}))["key"]
    other = (await admin.post("/key/generate", {"team_id": "tk"}))["key"]
    status, deleted = await admin.call(
        "DELETE", "/organization/delete", {"organization_ids": ["gone"]}
    )
    assert status == 200, deleted
    (org,) = deleted
    assert org["organization_id"] == "gone" and [t["team_id"] for t in org["teams"]] == ["tg"]
    assert len(org["deleted_keys"]) == 2
    for path, params in (
        ("/organization/info", {"organization_id": "gone"}),
        ("/team/info", {"team_id": "tg"}),
        ("/key/info", {"key": in_team}),
        ("/key/info", {"key": alone}),
    ):
        assert (await admin.call("GET", path, **params))[0] == 404, path
    assert (await admin.call("GET", "/key/info", key=other))[0] == 200
    assert (await admin.call("GET", "/team/info", team_id="tk"))[0] == 200
    # POST works too, as on every other delete here
    assert (await admin.post("/organization/delete", {"organization_ids": ["kept"]}))[0][
        "organization_id"
    ] == "kept"


async def test_members_add_and_delete(admin: Admin) -> None:
    await admin.post("/organization/new", {"organization_id": "o", "organization_alias": "O"})
    await admin.post("/user/new", {"user_id": "ana", "user_email": "ana@example.com"})
    added = await admin.post(
        "/organization/member_add",
        {
            "organization_id": "o",
            "member": [
                {"user_id": "ana", "role": "org_admin"},
                {"user_id": "bo", "role": "internal_user"},  # created, as LiteLLM does
                {"user_email": "cy@example.com", "role": "internal_user_viewer"},
            ],
            "max_budget_in_organization": 5,
        },
    )
    assert added["organization_id"] == "o"
    ids = [u["user_id"] for u in added["updated_users"]]
    assert ids[:2] == ["ana", "bo"] and ids[2]  # cy got a new id
    roles = [m["user_role"] for m in added["updated_organization_memberships"]]
    assert roles == ["org_admin", "internal_user", "internal_user_viewer"]
    assert (await admin.get("/user/info", user_id="bo"))["user_id"] == "bo"
    status, body = await admin.call(
        "POST",
        "/organization/member_add",
        {"organization_id": "o", "member": {"user_email": "ana@example.com", "role": "org_admin"}},
    )
    assert status == 409 and "already in organization" in body["error"]["message"]
    info = await admin.get("/organization/info", organization_id="o")
    assert [m["user_id"] for m in info["members"]] == ids
    assert info["members"][0]["max_budget_in_organization"] == 5.0

    status, gone = await admin.call(
        "DELETE", "/organization/member_delete", {"organization_id": "o", "user_id": "bo"}
    )
    assert status == 200 and gone["user_id"] == "bo"
    removed = await admin.post(
        "/organization/member_delete", {"organization_id": "o", "user_email": "cy@example.com"}
    )
    assert removed["user_id"] == ids[2]
    await admin.post("/user/delete", {"user_ids": ["ana"]})  # a deleted user leaves too
    assert (await admin.get("/organization/info", organization_id="o"))["members"] == []


async def test_openapi_documents_litellms_methods(admin: Admin) -> None:
    paths = (await admin.get("/openapi.json"))["paths"]
    assert {"patch", "post"} <= set(paths["/organization/update"])
    assert {"delete", "post"} <= set(paths["/organization/delete"])
    assert {"delete", "post"} <= set(paths["/organization/member_delete"])
    assert {"get", "post"} <= set(paths["/organization/info"])
    assert "get" in paths["/organization/list"]


# -- enforcement -------------------------------------------------------------------------


async def _chat(stack: Stack, key: str, **body: object) -> tuple[int, dict]:
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5, **body},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, await response.json()


async def _left(stack: Stack, kind: str, scope_id: str, capacity: int) -> int:
    window = SlidingWindow(
        Scope(kind, scope_id).key(stack.settings.key_prefix, "rpm"), capacity, "1m"
    )
    (state,) = await stack.engine.peek([window])
    return state.remaining


async def test_the_organizations_rate_limit_binds_its_teams_together(stack: Stack) -> None:
    await stack.admin.post(
        "/organization/new", {"organization_id": "org", "organization_alias": "o", "rpm_limit": 2}
    )
    for team in ("ta", "tb"):
        await stack.admin.post(
            "/team/new", {"team_id": team, "organization_id": "org", "rpm_limit": 10}
        )
    a = await stack.key(team_id="ta", rpm_limit=10)
    b = await stack.key(team_id="tb", rpm_limit=10)
    assert (await _chat(stack, a))[0] == 200
    assert (await _chat(stack, b))[0] == 200
    status, body = await _chat(stack, a)
    assert status == 429, body
    message = body["error"]["message"]
    assert message.startswith("Rate limit exceeded for organization: org."), message
    assert body["error"]["type"] == "requests"
    # the refused request took nothing from any scope: its team and key still have 9 of 10
    assert await _left(stack, "team", "ta", 10) == 9
    assert await _left(stack, "team", "tb", 10) == 9
    assert await _left(stack, "organization", "org", 2) == 0


async def test_the_organizations_budget_and_models_apply_to_teamless_keys(stack: Stack) -> None:
    await stack.admin.post(
        "/organization/new",
        {
            "organization_id": "org",
            "organization_alias": "o",
            "max_budget": 0.0,
            "models": ["gpt-4o"],
        },
    )
    key = await stack.key(organization_id="org")
    status, body = await _chat(stack, key)
    assert status == 429 and body["error"]["type"] == "budget_exceeded"
    assert body["error"]["message"].startswith("Budget has been exceeded! Organization=org ")
    await stack.admin.post(
        "/organization/update", {"organization_id": "org", "max_budget": 1, "models": ["embed"]}
    )
    status, body = await _chat(stack, key)
    assert status == 403 and body["error"]["type"] == "org_model_access_denied", body
    assert body["error"]["message"].startswith("organization not allowed to access model.")


async def test_a_team_moved_into_and_out_of_an_organization(stack: Stack) -> None:
    await stack.admin.post(
        "/organization/new", {"organization_id": "org", "organization_alias": "o", "rpm_limit": 1}
    )
    await stack.admin.post("/team/new", {"team_id": "t"})
    key = await stack.key(team_id="t")
    assert (await _chat(stack, key))[0] == 200
    await stack.admin.post("/team/update", {"team_id": "t", "organization_id": "org"})
    assert (await _chat(stack, key))[0] == 200  # the organization's first request
    assert (await _chat(stack, key))[0] == 429  # its rpm_limit of 1
    await stack.admin.post("/team/update", {"team_id": "t", "organization_id": None})
    assert (await _chat(stack, key))[0] == 200


async def test_spend_is_reported_by_organization(stack: Stack) -> None:
    await stack.admin.post(
        "/organization/new", {"organization_id": "org", "organization_alias": "o"}
    )
    await stack.admin.post("/team/new", {"team_id": "t", "organization_id": "org"})
    key = await stack.key(team_id="t")
    status, body = await _chat(stack, key)
    assert status == 200, body
    info = await stack.admin.get("/organization/info", organization_id="org")
    assert info["spend"] > 0  # its lifetime spend, from the ledger
    logs = await stack.admin.get("/spend/logs", organization_id="org")
    assert len(logs) == 1 and logs[0]["organization_id"] == "org"
    assert await stack.admin.get("/spend/logs", organization_id="other") == []


async def test_an_organization_that_is_gone_refuses_its_keys(stack: Stack) -> None:
    """Deleting cascades; a team that still names a missing organization (data from before
    organizations existed) is refused, never served without the organization's limits."""
    await stack.admin.post("/team/new", {"team_id": "t"})
    key = await stack.key(team_id="t")
    prefix = stack.settings.key_prefix
    store_key = f"{prefix}e:{{team}}:t"
    team = msgpack.unpackb(await stack.engine.redis.get(store_key))
    await stack.engine.redis.set(store_key, msgpack.packb({**team, "organization_id": "old"}))
    await stack.engine.redis.publish(f"{prefix}invalidate", msgpack.packb(["team", "t"]))
    await asyncio.sleep(0.2)  # the sidecar drops its cached copy
    status, body = await _chat(stack, key)
    assert status == 403 and "organization 'old'" in body["error"]["message"], body


async def test_the_organization_budget_holds_across_two_teams_and_two_sidecars(
    ns: str, redis_url: str
) -> None:
    """Concurrent bounded requests from two teams, through two sidecars on one Redis, never
    take the organization past its budget; each team alone could spend it all."""
    budget = 0.0005
    async with sidecars(ns, redis_url, "capped", count=2) as side:
        await side.admin.post(
            "/organization/new",
            {"organization_id": "org", "organization_alias": "o", "max_budget": budget},
        )
        keys = []
        for team in ("ta", "tb"):
            await side.admin.post(
                "/team/new", {"team_id": team, "organization_id": "org", "max_budget": 1}
            )
            keys.append(await side.key(team_id=team))

        async def client(i: int) -> list[tuple[int, dict]]:
            answers = []
            for _ in range(15):
                answers.append(await side.chat(keys[i % 2], side.bases[i // 2 % 2], max_tokens=10))
            return answers

        answers = [a for batch in await asyncio.gather(*map(client, range(8))) for a in batch]
        served = [body["usage"] for status, body in answers if status == 200]
        refused = [body for status, body in answers if status == 429]
        assert served and refused  # the budget bound
        spent = sum(
            u["prompt_tokens"] * PRICE_IN + u["completion_tokens"] * PRICE_OUT for u in served
        )
        assert spent <= budget + 1e-12
        assert all(r["error"]["type"] == "budget_exceeded" for r in refused)
        # The other sidecar settles after its responses: its last ones may still be on their
        # way when this one is asked (a read waits only for its own sidecar's).
        deadline = time.monotonic() + 10
        while (info := await side.admin.get("/organization/info", organization_id="org"))[
            "spend"
        ] != pytest.approx(spent):
            assert time.monotonic() < deadline, info["spend"]
            await asyncio.sleep(0.02)
        assert info["spend"] <= budget
