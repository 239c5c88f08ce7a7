"""LiteLLM's admin contract as its clients meet it: response shapes (token_id, key_name,
updated_at, members_with_roles, /user/info and /team/info nesting), /key/regenerate, members
by email, and what /user/new does with duration, key_alias, auto_create_key and teams."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import datetime
from typing import Any

from ..conftest import Admin, Stack

MESSAGES = [{"role": "user", "content": "hello"}]
PREVIEW = re.compile(r"^sk-\.\.\.[A-Za-z0-9_-]{4}$")


async def chat(stack: Stack, key: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4, **extra},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, await response.json(content_type=None)


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_a_generated_key_carries_litellms_fields(admin: Admin) -> None:
    created = await admin.post("/key/generate", {"key_alias": "ci"})
    plain = created["key"]
    assert created["token_id"] == created["token"] == hashlib.sha256(plain.encode()).hexdigest()
    assert PREVIEW.match(created["key_name"]) and created["key_name"].endswith(plain[-4:])
    assert _when(created["created_at"]) == _when(created["updated_at"])
    assert created["expires"] is None
    info = (await admin.get("/key/info", key=plain))["info"]
    assert (info["key_name"], info["token_id"]) == (created["key_name"], created["token"])
    await asyncio.sleep(0.01)
    updated = await admin.post("/key/update", {"key": plain, "rpm_limit": 3})
    assert _when(updated["updated_at"]) > _when(updated["created_at"])
    assert updated["key_name"] == created["key_name"]


async def test_regenerate_stops_the_old_secret_and_keeps_limits_and_spend(stack: Stack) -> None:
    admin = stack.admin
    old = await admin.post("/key/generate", {"rpm_limit": 3, "max_budget": 10, "key_alias": "r"})
    assert (await chat(stack, old["key"]))[0] == 200
    new = await admin.post("/key/regenerate", {"key": old["key"], "rpm_limit": 2})
    assert new["key"] != old["key"] and PREVIEW.match(new["key_name"])
    assert new["token_id"] == hashlib.sha256(new["key"].encode()).hexdigest()
    assert (new["key_alias"], new["max_budget"], new["rpm_limit"]) == ("r", 10.0, 2)
    status, body = await chat(stack, old["key"])
    assert status == 401, body
    # the window counted under the old secret still counts: one more request fits, not two
    assert (await chat(stack, new["key"]))[0] == 200
    status, body = await chat(stack, new["key"])
    assert status == 429 and "Limit type: requests" in body["error"]["message"], body
    info = (await admin.get("/key/info", key=new["key"]))["info"]
    (window,) = info["budget_windows"]
    assert window["spend"] > 0  # the old secret's spend is the key's
    # its history is found by its new secret, the old one's requests included
    assert len(await admin.get("/spend/logs", api_key=new["key"])) == 2


async def test_regenerate_by_path_with_a_chosen_secret_and_a_grace_period(stack: Stack) -> None:
    admin = stack.admin
    old = await admin.post("/key/generate", {"rpm_limit": 10})
    chosen = "sk-chosen-by-the-admin-0001"
    new = await admin.post(
        f"/key/{old['key']}/regenerate", {"new_key": chosen, "grace_period": "1h"}
    )
    assert new["key"] == chosen and new["key_name"] == "sk-...0001"
    assert (await chat(stack, old["key"]))[0] == 200  # still valid for the grace period
    assert (await chat(stack, chosen))[0] == 200
    # deleting the old secret during its grace period leaves the new one working
    await admin.post("/key/delete", {"keys": [old["key"]]})
    assert (await chat(stack, old["key"]))[0] == 401
    assert (await chat(stack, chosen))[0] == 200
    status, body = await admin.call("POST", "/key/regenerate", {"key": chosen, "new_key": chosen})
    assert status == 409, body  # the secret is in use
    status, body = await admin.call("POST", "/key/regenerate", {"key": chosen, "new_key": "x" * 30})
    assert status == 400 and "sk-" in body["error"]["message"]
    status, body = await admin.call("POST", "/key/regenerate", {"key": "sk-nobody-has-this"})
    assert status == 404
    status, body = await admin.call(
        "POST", "/key/regenerate", {"key": chosen, "new_master_key": "sk-x"}
    )
    assert status == 400 and body["error"]["param"] == "new_master_key"


async def test_blocking_a_regenerated_key_blocks_it(stack: Stack) -> None:
    old = await stack.admin.post("/key/generate", {})
    new = await stack.admin.post("/key/regenerate", {"key": old["key"]})
    await stack.admin.post("/key/block", {"key": new["key"]})
    assert (await chat(stack, new["key"]))[0] == 403
    await stack.admin.post("/key/unblock", {"key": new["key"]})
    assert (await chat(stack, new["key"]))[0] == 200


async def test_user_info_and_team_info_have_litellms_nesting(admin: Admin) -> None:
    user = await admin.post("/user/new", {"user_id": "nest", "user_email": "n@example.com"})
    team = await admin.post(
        "/team/new",
        {"team_id": "t-nest", "members_with_roles": [{"user_id": "nest", "role": "admin"}]},
    )
    assert team["members_with_roles"] == [{"user_id": "nest", "user_email": None, "role": "admin"}]
    team_key = await admin.post("/key/generate", {"team_id": "t-nest", "user_id": "nest"})
    info = await admin.get("/user/info", user_id="nest")
    assert set(info) == {"user_id", "user_info", "keys", "teams"}
    assert info["user_info"]["user_email"] == "n@example.com"
    assert {k["token"] for k in info["keys"]} == {
        hashlib.sha256(user["key"].encode()).hexdigest(),
        team_key["token"],
    }
    assert [t["team_id"] for t in info["teams"]] == ["t-nest"]
    info = await admin.get("/team/info", team_id="t-nest")
    assert set(info) == {"team_id", "team_info", "keys", "team_memberships"}
    assert [k["token"] for k in info["keys"]] == [team_key["token"]]
    assert info["team_memberships"] == [
        {"team_id": "t-nest", "user_id": "nest", "spend": 0.0, "litellm_budget_table": None}
    ]
    customer = await admin.post("/customer/new", {"user_id": "c-nest", "max_budget": 3})
    info = await admin.get("/customer/info", end_user_id=customer["user_id"])
    assert info["user_id"] == "c-nest" and info["litellm_budget_table"]["max_budget"] == 3.0


async def test_members_by_email(admin: Admin) -> None:
    await admin.post("/user/new", {"user_id": "known", "user_email": "known@example.com"})
    await admin.post("/team/new", {"team_id": "t-mail"})
    added = await admin.post(
        "/team/member_add",
        {
            "team_id": "t-mail",
            "member": [
                {"user_email": "known@example.com", "role": "user"},
                {"user_email": "new@example.com", "role": "admin"},
            ],
        },
    )
    by_email = {m["user_email"]: m for m in added["members_with_roles"]}
    assert by_email["known@example.com"]["user_id"] == "known"
    made = by_email["new@example.com"]["user_id"]
    assert (await admin.get("/user/info", user_id=made))["user_info"]["user_email"] == (
        "new@example.com"
    )
    status, body = await admin.call(
        "POST",
        "/team/member_add",
        {"team_id": "t-mail", "member": {"user_email": "new@example.com"}},
    )
    assert status == 409, body
    left = await admin.post(
        "/team/member_delete", {"team_id": "t-mail", "user_email": "known@example.com"}
    )
    assert [m["user_id"] for m in left["members_with_roles"]] == [made]
    status, body = await admin.call(
        "POST", "/team/member_add", {"team_id": "t-mail", "member": {"role": "user"}}
    )
    assert status == 400 and "user_email" in body["error"]["message"]


async def test_user_update_by_email(admin: Admin) -> None:
    await admin.post("/user/new", {"user_id": "by-mail", "user_email": "m@example.com"})
    updated = await admin.post("/user/update", {"user_email": "m@example.com", "rpm_limit": 9})
    assert (updated["user_id"], updated["rpm_limit"]) == ("by-mail", 9)
    status, body = await admin.call("POST", "/user/update", {"user_email": "no@example.com"})
    assert status == 404 and "user_email" in body["error"]["message"]
    status, body = await admin.call("POST", "/user/update", {"rpm_limit": 9})
    assert status == 400 and "user_id" in body["error"]["message"]


async def test_user_new_makes_the_key_and_memberships_it_is_asked_for(admin: Admin) -> None:
    await admin.post("/team/new", {"team_id": "t-a"})
    await admin.post("/team/new", {"team_id": "t-b"})
    user = await admin.post(
        "/user/new",
        {
            "user_id": "fresh",
            "duration": "1h",
            "key_alias": "fresh-key",
            "teams": ["t-a", {"team_id": "t-b", "max_budget_in_team": 2, "user_role": "admin"}],
        },
    )
    assert PREVIEW.match(user["key_name"]) and user["expires"] is not None
    key = (await admin.get("/key/info", key=user["key"]))["info"]
    assert key["key_alias"] == "fresh-key" and key["user_id"] == "fresh"
    assert (_when(user["expires"]) - _when(key["created_at"])).total_seconds() == 3600
    team_b = (await admin.get("/team/info", team_id="t-b"))["team_info"]
    assert team_b["members"] == [
        {"user_id": "fresh", "user_email": None, "role": "admin", "max_budget_in_team": 2.0}
    ]
    assert "duration" not in (await admin.get("/user/info", user_id="fresh"))["user_info"]
    no_key = await admin.post("/user/new", {"user_id": "keyless", "auto_create_key": False})
    assert "key" not in no_key
    assert (await admin.get("/user/info", user_id="keyless"))["keys"] == []
    status, body = await admin.call("POST", "/user/new", {"user_id": "x", "teams": ["t-none"]})
    assert status == 404, body
    status, _ = await admin.call("GET", "/user/info", user_id="x")
    assert status == 404  # nothing was made
    status, body = await admin.call("POST", "/user/new", {"user_id": "y", "duration": "soon"})
    assert status == 400 and body["error"]["param"] == "duration"


async def test_key_list_pages_and_filters_as_litellm(admin: Admin) -> None:
    await admin.post("/user/new", {"user_id": "lister", "auto_create_key": False})
    made = [
        await admin.post("/key/generate", {"user_id": "lister", "key_alias": f"k{i}"})
        for i in range(12)
    ]
    other = await admin.post("/key/generate", {"key_alias": "k0"})
    first = await admin.get("/key/list", user_id="lister")
    assert (first["total_count"], first["current_page"], first["total_pages"]) == (12, 1, 2)
    assert len(first["keys"]) == 10  # LiteLLM's default page size
    second = await admin.get("/key/list", user_id="lister", page="2")
    assert set(first["keys"]) | set(second["keys"]) == {k["token"] for k in made}
    full = await admin.get("/key/list", key_alias="k0", return_full_object="true")
    assert {k["token_id"] for k in full["keys"]} == {made[0]["token"], other["token"]}
    assert all(k["key_name"].startswith("sk-...") for k in full["keys"])
    by_hash = await admin.get("/key/list", key_hash=made[3]["key"])
    assert by_hash["keys"] == [made[3]["token"]]
    for name, value in (("size", "101"), ("page", "0"), ("return_full_object", "yes")):
        status, body = await admin.call("GET", "/key/list", **{name: value})
        assert status == 400 and body["error"]["param"] == name


async def test_team_member_update_sets_role_budget_and_rates(stack: Stack) -> None:
    admin = stack.admin
    await admin.post("/user/new", {"user_id": "mu", "user_email": "mu@example.com"})
    await admin.post("/team/new", {"team_id": "t-mu", "members_with_roles": [{"user_id": "mu"}]})
    key = (await admin.post("/key/generate", {"team_id": "t-mu", "user_id": "mu"}))["key"]
    updated = await admin.post(
        "/team/member_update",
        {"team_id": "t-mu", "user_email": "mu@example.com", "role": "admin", "rpm_limit": 1},
    )
    assert (updated["team_id"], updated["user_id"], updated["role"]) == ("t-mu", "mu", "admin")
    assert updated["rpm_limit"] == 1 and updated["max_budget_in_team"] is None
    assert (await chat(stack, key))[0] == 200
    status, body = await chat(stack, key)
    assert status == 429 and "member" in body["error"]["message"], body
    status, body = await admin.call(
        "POST", "/team/member_update", {"team_id": "t-mu", "user_id": "nobody"}
    )
    assert status == 404
    status, body = await admin.call(
        "POST", "/team/member_update", {"team_id": "t-mu", "user_id": "mu", "rpm_limit": -1}
    )
    assert status == 400 and "rpm_limit" in body["error"]["message"]


async def test_budgets_show_when_they_reset(admin: Admin) -> None:
    made = await admin.post(
        "/budget/new", {"budget_id": "b-reset", "max_budget": 1, "budget_duration": "1d"}
    )
    assert made["created_at"] and made["budget_reset_at"].endswith("+00:00")
    (shown,) = await admin.get("/budget/info", budget_id="b-reset")
    assert shown["budget_reset_at"] == made["budget_reset_at"]
    never = await admin.post("/budget/new", {"budget_id": "b-never", "max_budget": 1})
    assert never.get("budget_reset_at") is None


async def test_user_update_makes_a_user_it_does_not_know(admin: Admin) -> None:
    updated = await admin.post("/user/update", {"user_id": "litellm-proxy-budget", "spend": 0})
    assert updated["user_id"] == "litellm-proxy-budget"
    assert (await admin.get("/user/info", user_id="litellm-proxy-budget"))["user_id"]


async def test_a_members_budget_in_its_team_is_shown_and_enforced(stack: Stack) -> None:
    """LiteLLM's flow: a user made with team_id gets a key of that team; a budget set with
    /team/member_update holds, and /user/info shows the member's spend against it."""
    admin = stack.admin
    await admin.post("/team/new", {"team_id": "t-budget"})
    user = await admin.post("/user/new", {"user_id": "spender", "team_id": "t-budget"})
    assert (await admin.get("/key/info", key=user["key"]))["info"]["team_id"] == "t-budget"
    await admin.post(
        "/team/member_update",
        {"team_id": "t-budget", "user_id": "spender", "max_budget_in_team": 0.0000001},
    )
    # no max_tokens: admitted while the budget has anything left (DESIGN, "Budgets and estimates")
    assert (await chat(stack, user["key"], max_tokens=None))[0] == 200
    status, body = await chat(stack, user["key"], max_tokens=None)
    assert status == 429 and "member" in body["error"]["message"], body
    (team,) = (await admin.get("/user/info", user_id="spender"))["teams"]
    (membership,) = team["team_memberships"]
    assert membership["spend"] > 0.0000001
    assert membership["litellm_budget_table"]["max_budget"] == 0.0000001
