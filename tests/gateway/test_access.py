"""Self-service and user roles on the admin API, over real HTTP: what a virtual key may read
and change, by its user's role (LiteLLM's proxy_admin, proxy_admin_viewer, internal_user,
internal_user_viewer) and its team membership, and the refusals, in LiteLLM's words."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from ratelimiter.gateway.config import Deployment, Settings

from ..conftest import MASTER_KEY, Admin

UPSTREAM = "http://127.0.0.1:9/v1"  # never called: these tests list models, they call none


@pytest.fixture
def settings(ns: str) -> Settings:
    return Settings(
        master_key=MASTER_KEY,
        key_prefix=f"t:{ns}:",
        models=(
            Deployment("gpt-4o", "openai/gpt-4o", api_base=UPSTREAM, index=0),
            Deployment("cheap", "openai/cheap", api_base=UPSTREAM, index=1),
            Deployment("secret", "openai/secret", api_base=UPSTREAM, index=2),
        ),
    )


@dataclass
class World:
    master: Admin
    ana: Admin  # internal_user, admin of team red
    ana_user_id: str
    bob: Admin  # internal_user_viewer, plain member of team red
    carl: Admin  # internal_user of no team
    root: Admin  # proxy_admin
    viewer: Admin  # proxy_admin_viewer
    loose: Admin  # a key of team blue with no user

    def as_key(self, key: str) -> Admin:
        return Admin(self.master.session, self.master.base, key)


@pytest.fixture
async def world(admin: Admin) -> AsyncIterator[World]:
    async def user(user_id: str, role: str | None) -> Admin:
        body = {"user_id": user_id, **({"user_role": role} if role else {})}
        created = await admin.post("/user/new", body)
        return Admin(admin.session, admin.base, created["key"])

    await admin.post("/team/new", {"team_id": "red"})
    await admin.post("/team/new", {"team_id": "blue"})
    ana = await user("ana", "internal_user")
    bob = await user("bob", "internal_user_viewer")
    carl = await user("carl", None)  # no role: acts as internal_user, as in LiteLLM
    root = await user("root", "proxy_admin")
    viewer = await user("vera", "proxy_admin_viewer")
    for member, role in (("ana", "admin"), ("bob", "user")):
        await admin.post(
            "/team/member_add", {"team_id": "red", "member": {"user_id": member, "role": role}}
        )
    loose = (await admin.post("/key/generate", {"team_id": "blue"}))["key"]
    yield World(admin, ana, "ana", bob, carl, root, viewer, Admin(admin.session, admin.base, loose))


async def refused(client: Admin, method: str, path: str, body: object = None, **params: str):
    status, payload = await client.call(method, path, body, **params)
    assert status >= 400, payload
    return status, payload["error"]["message"]


# -- reading -------------------------------------------------------------------------------


async def test_a_key_reads_its_own_key_info_but_not_another_users(world: World) -> None:
    own = await world.ana.get("/key/info", key=world.ana.key)
    assert own["info"]["user_id"] == "ana"
    status, message = await refused(world.ana, "GET", "/key/info", key=world.carl.key)
    assert status == 403 and message.startswith("You are not allowed to access this key's info")
    # a key that does not exist is a 404, as in LiteLLM (a secret cannot be guessed)
    status, message = await refused(world.ana, "GET", "/key/info", key="sk-no-such-key")
    assert status == 404
    # with no key named, a key reads its own info (LiteLLM's)
    assert (await world.ana.get("/key/info"))["info"]["user_id"] == "ana"


async def test_a_key_with_no_user_reads_only_itself(world: World) -> None:
    assert (await world.loose.get("/key/info", key=world.loose.key))["info"]["team_id"] == "blue"
    status, _ = await refused(world.loose, "GET", "/key/info", key=world.ana.key)
    assert status == 403
    status, message = await refused(world.loose, "GET", "/key/list")
    assert status == 403 and "No 'user_id' is associated with your API key" in message
    status, message = await refused(world.loose, "POST", "/key/generate", {})
    assert status == 401 and message.startswith("Authentication Error, Only proxy admin")


async def test_a_key_reads_its_users_info_not_another_users(world: World) -> None:
    info = await world.ana.get("/user/info", user_id="ana")
    assert info["user_info"]["user_role"] == "internal_user"
    for other in ("carl", "nobody"):  # another user, or none: the same refusal
        status, message = await refused(world.ana, "GET", "/user/info", user_id=other)
        assert status == 403
        assert message.startswith("key not allowed to access this user's info. user_id=")


async def test_a_key_reads_its_teams_info_not_another_teams(world: World) -> None:
    assert (await world.bob.get("/team/info", team_id="red"))["team_id"] == "red"  # a member
    assert (await world.loose.get("/team/info", team_id="blue"))["team_id"] == "blue"  # its team
    for client, team in ((world.carl, "red"), (world.ana, "blue"), (world.ana, "no-such")):
        status, message = await refused(client, "GET", "/team/info", team_id=team)
        assert status == 403 and "not authorized to access this team=" in message


async def test_models_are_listed_as_far_as_the_key_may_call_them(world: World) -> None:
    limited = world.as_key(
        (await world.master.post("/key/generate", {"models": ["gpt-4o", "cheap"]}))["key"]
    )
    listed = await limited.get("/v1/models")
    assert [m["id"] for m in listed["data"]] == ["gpt-4o", "cheap"]
    info = await limited.get("/model/info")
    assert [m["model_name"] for m in info["data"]] == ["gpt-4o", "cheap"]
    everything = await world.master.get("/model/info")
    assert [m["model_name"] for m in everything["data"]] == ["gpt-4o", "cheap", "secret"]


async def test_key_list_shows_a_user_its_own_keys(world: World) -> None:
    second = await world.ana.post("/key/generate", {})
    mine = (await world.ana.get("/key/list"))["keys"]
    assert second["token"] in mine and len(mine) == 2  # the key from /user/new and this one
    everyone = (await world.viewer.get("/key/list"))["keys"]
    assert set(mine) < set(everyone)
    assert second["token"] not in (await world.bob.get("/key/list"))["keys"]


# -- internal_user: its own keys -------------------------------------------------------------


async def test_an_internal_user_makes_keys_for_itself_only(world: World) -> None:
    made = await world.ana.post("/key/generate", {"key_alias": "laptop"})
    assert made["user_id"] == "ana"  # a key without user_id is the caller's, as in LiteLLM
    assert (await world.carl.post("/key/generate", {}))["user_id"] == "carl"  # no role
    status, message = await refused(world.ana, "POST", "/key/generate", {"user_id": "carl"})
    assert status == 403 and message.startswith("User can only create keys for themselves")
    status, message = await refused(world.carl, "POST", "/key/generate", {"team_id": "red"})
    assert status == 400 and message.startswith("User=carl not assigned to team=red")
    status, message = await refused(world.carl, "POST", "/key/generate", {"team_id": "nope"})
    assert status == 400 and message.startswith("User=carl not assigned to team=nope")


async def test_a_key_cannot_make_a_key_with_a_larger_budget_than_its_own(world: World) -> None:
    capped = world.as_key(
        (await world.master.post("/key/generate", {"user_id": "carl", "max_budget": 5}))["key"]
    )
    assert (await capped.post("/key/generate", {"max_budget": 5}))["max_budget"] == 5
    status, message = await refused(capped, "POST", "/key/generate", {"max_budget": 6})
    assert status == 400
    assert message.startswith("max_budget (6) cannot exceed the caller's own max_budget (5")
    window = {"budget_limits": [{"max_budget": 50, "budget_duration": "1d"}]}
    status, _ = await refused(capped, "POST", "/key/generate", window)
    assert status == 400


async def test_an_internal_user_updates_and_deletes_its_own_keys_only(world: World) -> None:
    made = await world.ana.post("/key/generate", {"key_alias": "old"})
    renamed = await world.ana.post("/key/update", {"key": made["key"], "key_alias": "new"})
    assert renamed["key_alias"] == "new"
    for body in (
        {"key": world.carl.key, "key_alias": "mine now"},  # another user's key
        {"key": "sk-no-such-key", "key_alias": "x"},  # none: the same answer
    ):
        status, message = await refused(world.ana, "POST", "/key/update", body)
        assert status == 403 and message.startswith("User can only create keys for themselves")
    status, message = await refused(
        world.ana, "POST", "/key/update", {"key": made["key"], "user_id": "carl"}
    )
    assert status == 403 and message.startswith("User can only create keys for themselves")
    status, message = await refused(world.ana, "POST", "/key/delete", {"keys": [world.carl.key]})
    assert status == 403
    assert (await world.master.get("/key/info", key=world.carl.key))["info"]["user_id"] == "carl"
    assert (await world.ana.post("/key/delete", {"keys": [made["key"]]}))["deleted_keys"]


async def test_an_internal_user_cannot_raise_the_limits_an_admin_gave_its_key(
    world: World,
) -> None:
    given = (await world.master.post("/key/generate", {"user_id": "ana", "rpm_limit": 5}))["key"]
    for change in ({"rpm_limit": 500}, {"max_budget": 100}, {"models": ["secret"]}):
        status, message = await refused(world.ana, "POST", "/key/update", {"key": given, **change})
        assert status == 403
        assert message.startswith("Only proxy admins, team admins, or org admins can call")
    await world.master.post("/key/block", {"key": given})
    status, message = await refused(
        world.ana, "POST", "/key/update", {"key": given, "blocked": False}
    )
    assert status == 403 and "only an admin can unblock" in message
    assert (await world.master.get("/key/info", key=given))["info"]["rpm_limit"] == 5
    status, _ = await refused(world.ana, "POST", "/key/unblock", {"key": given})
    assert status == 401


async def test_an_internal_user_cannot_give_itself_a_role_or_a_team(world: World) -> None:
    status, message = await refused(
        world.ana, "POST", "/user/update", {"user_id": "ana", "user_role": "proxy_admin"}
    )
    assert status == 401 and message.startswith("Authentication Error, Only proxy admin")
    assert "Your role=internal_user" in message
    status, message = await refused(
        world.carl, "POST", "/team/member_add", {"team_id": "red", "member": {"user_id": "carl"}}
    )
    assert status == 403 and message.startswith("Call not allowed. User not proxy admin OR team")
    status, _ = await refused(world.carl, "POST", "/team/new", {"team_id": "mine"})
    assert status == 401


async def test_an_internal_user_sees_its_own_spend_only(world: World) -> None:
    assert await world.ana.get("/spend/logs") == []
    status, message = await refused(world.ana, "GET", "/spend/logs", user_id="carl")
    assert status == 403 and message.startswith("key not allowed to access this user's spend")
    status, _ = await refused(world.ana, "GET", "/global/spend")
    assert status == 401


# -- internal_user_viewer ----------------------------------------------------------------------


async def test_an_internal_user_viewer_reads_but_makes_no_key(world: World) -> None:
    assert (await world.bob.get("/key/info", key=world.bob.key))["info"]["user_id"] == "bob"
    assert await world.bob.get("/spend/logs") == []
    for path, body in (
        ("/key/generate", {}),
        ("/key/update", {"key": world.bob.key, "key_alias": "x"}),
        ("/key/delete", {"keys": [world.bob.key]}),
    ):
        status, message = await refused(world.bob, "POST", path, body)
        assert status == 401 and message.startswith("Authentication Error, Only proxy admin")
        assert "Your role=internal_user_viewer" in message


# -- team admins -----------------------------------------------------------------------------


async def test_a_team_admin_manages_its_teams_members_and_keys(world: World) -> None:
    await world.ana.post(
        "/team/member_add", {"team_id": "red", "member": {"user_id": "carl", "role": "user"}}
    )
    team_key = await world.ana.post("/key/generate", {"team_id": "red", "rpm_limit": 10})
    assert (team_key["team_id"], team_key["user_id"]) == ("red", "ana")
    # another member's key in the team: its admin may read, limit and delete it
    carls = (await world.master.post("/key/generate", {"user_id": "carl", "team_id": "red"}))["key"]
    assert (await world.ana.get("/key/info", key=carls))["info"]["user_id"] == "carl"
    assert (await world.ana.post("/key/update", {"key": carls, "rpm_limit": 3}))["rpm_limit"] == 3
    await world.ana.post("/key/delete", {"keys": [carls]})
    await world.ana.post("/team/member_delete", {"team_id": "red", "user_id": "carl"})
    # but not another team's
    status, _ = await refused(
        world.ana, "POST", "/team/member_add", {"team_id": "blue", "member": {"user_id": "ana"}}
    )
    assert status == 403
    status, _ = await refused(world.ana, "POST", "/key/delete", {"keys": [world.loose.key]})
    assert status == 403


async def test_a_plain_team_member_may_not_make_team_keys(world: World) -> None:
    await world.master.post(
        "/team/member_add", {"team_id": "red", "member": {"user_id": "carl", "role": "user"}}
    )
    status, message = await refused(world.carl, "POST", "/key/generate", {"team_id": "red"})
    assert status == 401 and message.startswith("Team member does not have permissions")
    status, message = await refused(
        world.carl, "POST", "/team/member_delete", {"team_id": "red", "user_id": "bob"}
    )
    assert status == 403 and message.startswith("Call not allowed. User not proxy admin OR team")


# -- proxy_admin and proxy_admin_viewer ----------------------------------------------------------


async def test_a_proxy_admin_does_what_the_master_key_does(world: World) -> None:
    made = await world.root.post("/user/new", {"user_id": "dan", "max_budget": 3})
    await world.root.post("/key/generate", {"user_id": "dan", "max_budget": 1000})
    await world.root.post("/key/update", {"key": made["key"], "rpm_limit": 1})
    await world.root.post("/key/block", {"key": made["key"]})
    await world.root.post("/team/new", {"team_id": "green"})
    await world.root.post("/budget/new", {"budget_id": "b", "max_budget": 1})
    assert (await world.root.get("/key/info", key=world.carl.key))["info"]["user_id"] == "carl"
    await world.root.get("/global/spend")
    await world.root.post("/user/delete", {"user_ids": ["dan"]})


async def test_a_proxy_admin_viewer_reads_everything_and_changes_nothing(world: World) -> None:
    assert (await world.viewer.get("/key/info", key=world.ana.key))["info"]["user_id"] == "ana"
    await world.viewer.get("/user/info", user_id="ana")
    await world.viewer.get("/team/info", team_id="blue")
    await world.viewer.get("/user/list")
    await world.viewer.get("/budget/list")
    await world.viewer.get("/spend/logs")
    await world.viewer.get("/global/spend")
    await world.viewer.get("/global/spend/report")
    for path, body in (
        ("/key/generate", {}),
        ("/key/update", {"key": world.ana.key, "key_alias": "x"}),
        ("/key/delete", {"keys": [world.ana.key]}),
        ("/key/block", {"key": world.ana.key}),
        ("/user/new", {"user_id": "eve"}),
        ("/team/update", {"team_id": "red", "max_budget": 1}),
        ("/team/member_add", {"team_id": "red", "member": {"user_id": "vera"}}),
        ("/budget/new", {"budget_id": "b2"}),
    ):
        status, message = await refused(world.viewer, "POST", path, body)
        assert status == 403, path
        assert message.startswith("user not allowed to access this route, role= proxy_admin_viewer")


# -- keys that may do nothing ------------------------------------------------------------------


async def test_a_blocked_or_expired_key_gets_nothing(world: World) -> None:
    await world.master.post("/key/block", {"key": world.root.key})
    status, message = await refused(world.root, "GET", "/key/info", key=world.root.key)
    assert status == 403 and "blocked" in message
    status, _ = await refused(world.root, "POST", "/user/new", {"user_id": "x"})
    assert status == 403
    expired = await world.master.post("/key/generate", {"user_id": "ana", "duration": "1s"})
    await asyncio.sleep(1.1)
    late = world.as_key(expired["key"])
    for path, params in (("/key/info", {"key": expired["key"]}), ("/key/list", {})):
        status, message = await refused(late, "GET", path, **params)
        assert status == 401 and "expired" in message
    status, _ = await refused(world.as_key("sk-made-up"), "GET", "/key/list")
    assert status == 401


async def test_an_internal_user_sets_no_alias_or_organization_on_its_keys(world: World) -> None:
    """An alias reaches its target past a models list naming the alias, and a key of no team
    is under the organization it names: a user could reach any model or leave its
    organization's budget by setting either on its own keys."""
    for body in ({"aliases": {"gpt-4o": "gpt-4o-mini"}}, {"organization_id": "elsewhere"}):
        status, message = await refused(world.ana, "POST", "/key/generate", body)
        field = next(iter(body))
        assert status == 403 and message.startswith(f"{field}: only an admin"), message
        status, _ = await refused(
            world.carl, "POST", "/key/update", {"key": world.carl.key, **body}
        )
        assert status == 403
    # the empty values LiteLLM's clients send are no change
    made = await world.ana.post("/key/generate", {"aliases": {}, "organization_id": None})
    assert made["user_id"] == world.ana_user_id
