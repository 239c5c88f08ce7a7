"""The admin API's request models: every field of LiteLLM's request models is accepted (null
too), the ones the limiter does not act on are stored and shown on info, and a field nobody
knows is a 400 naming it, in OpenAI's envelope."""

from __future__ import annotations

from typing import Any

import pytest

from ratelimiter.gateway.models import ACCEPTED_ONLY, CREATE, UPDATE, UPDATED_BY, validate
from ratelimiter.gateway.store import EntityError

from ..conftest import Admin

ENVELOPE = {"message", "type", "param", "code"}

# A well-formed value of each accepted-only field, as a LiteLLM client would send it.
SAMPLES: dict[str, Any] = {
    "access_group_ids": ["ag-1"],
    "admins": ["ana"],
    "agent_id": "agent-1",
    "aliases": {"my-gpt": "gpt-4o"},
    "allowed_cache_controls": ["no-cache"],
    "allowed_model_region": "eu",
    "allowed_passthrough_routes": ["/anthropic"],
    "allowed_routes": ["/chat/completions"],
    "allowed_vector_store_indexes": [{"index_name": "docs", "index_permissions": ["read"]}],
    "auto_create_key": True,
    "auto_rotate": False,
    "blocked": False,
    "budget_reset_at": "2030-01-01T00:00:00Z",
    "config": {"a": 1},
    "default_model": "gpt-4o",
    "duration": "30d",
    "enforced_batch_output_expires_after": {"anchor": "created_at", "seconds": 3600},
    "enforced_file_expires_after": {"anchor": "created_at", "seconds": 3600},
    "enforced_params": ["user"],
    "guardrails": ["pii"],
    "key_alias": "ci",
    "key_type": "llm_api",
    "members_with_roles": [{"role": "user", "user_id": "ana"}],
    "model_aliases": {"fast": "gpt-4o-mini"},
    "object_permission": {"mcp_servers": ["s1"], "vector_stores": ["v1"]},
    "organization_id": "org-1",
    "organizations": ["org-1"],
    "password": "correct horse battery",
    "permissions": {"get_spend_routes": True},
    "policies": ["p1"],
    "project_id": "proj-1",
    "prompts": ["pr-1"],
    "rotation_interval": "90d",
    "router_settings": {"num_retries": 2},
    "rpm_limit_type": "best_effort_throughput",
    "secret_manager_settings": {"namespace": "x"},
    "send_invite_email": False,
    "spend": 1.5,
    "sso_user_id": "sso-1",
    "tags": ["prod"],
    "team_id": "team-x",
    "team_member_budget": 2.0,
    "team_member_budget_duration": "30d",
    "team_member_key_duration": "1d",
    "team_member_permissions": ["/key/generate"],
    "team_member_rpm_limit": 10,
    "team_member_tpm_limit": 1000,
    "teams": ["team-x"],
    "temp_budget_expiry": "2030-01-01T00:00:00Z",
    "temp_budget_increase": 5.0,
    "tpm_limit_type": "dynamic",
    "user_alias": "Ana",
    "allowed_models": ["m"],
    "tpd_limit": 100000,
    "updated_by": "admin-x",
    "user_role": "internal_user",
    # a tag's (accepted; LiteLLM routes by them)
    "description": "the cost centre of engineering",
    "model_info": {"model-1": "gpt-4o"},
    "models": ["gpt-4o", "model-1"],
}
SECRET = {"password"}  # accepted, never stored
# Accepted, but info shows the limiter's own value: the real spend, the window's next reset.
COMPUTED = {"spend", "budget_reset_at"}

CREATE_ROUTE = {
    "key": "/key/generate",
    "user": "/user/new",
    "team": "/team/new",
    "customer": "/customer/new",
    "budget": "/budget/new",
    "organization": "/organization/new",
    "tag": "/tag/new",
}
# Fields each create needs whatever else is sent: the id LiteLLM requires of customers and
# budgets, and the info route's query.
NEEDS = {
    "customer": {"user_id": "c-models"},
    "budget": {"budget_id": "b-models"},
    "organization": {"organization_alias": "acme"},
    "tag": {"name": "t-models"},
}


async def _info(admin: Admin, kind: str, created: dict[str, Any]) -> dict[str, Any]:
    if kind == "key":
        return (await admin.get("/key/info", key=created["key"]))["info"]
    if kind == "budget":
        (budget,) = await admin.get("/budget/info", budget_id=created["budget_id"])
        return budget
    if kind == "customer":  # LiteLLM answers with the customer itself
        return await admin.get("/customer/info", end_user_id=created["user_id"])
    if kind == "organization":  # LiteLLM nests the budget table's fields
        org = await admin.get("/organization/info", organization_id=created["organization_id"])
        return {**org, **org["litellm_budget_table"]}
    if kind == "tag":  # LiteLLM answers {name: tag}
        name = created["tag"]["name"]
        return (await admin.post("/tag/info", {"names": [name]}))[name]
    id_field = "team_id" if kind == "team" else "user_id"
    return (await admin.get(f"/{kind}/info", **{id_field: created[id_field]}))[f"{kind}_info"]


def _sent(kind: str) -> dict[str, Any]:
    fields = set(CREATE[kind].model_fields) & set(ACCEPTED_ONLY[kind])
    return {name: SAMPLES[name] for name in sorted(fields)}


def test_every_accepted_field_has_a_sample() -> None:
    missing = set().union(*ACCEPTED_ONLY.values()) - set(SAMPLES)
    assert not missing  # a new LiteLLM field needs a value here, to be tested below


@pytest.mark.parametrize("kind", sorted(CREATE_ROUTE))
async def test_litellm_fields_are_stored_and_shown_on_info(admin: Admin, kind: str) -> None:
    if kind == "key":  # a key's team must exist
        await admin.post("/team/new", {"team_id": "team-x"})
    sent = _sent(kind)
    created = await admin.post(CREATE_ROUTE[kind], {**sent, **NEEDS.get(kind, {})})
    info = await _info(admin, kind, created)
    for name, value in sent.items():
        if name in SECRET:
            assert name not in info and name not in created
        elif name in COMPUTED and kind != "budget":  # /budget/info shows the record
            assert info[name] != value
        elif name.endswith("_expiry"):
            assert info[name].startswith("2030-01-01T00:00:00")
        else:
            assert info[name] == value, name  # before: 400 "unknown field"


@pytest.mark.parametrize("kind", sorted(CREATE_ROUTE))
async def test_every_litellm_field_may_be_null(admin: Admin, kind: str) -> None:
    """LiteLLM's SDKs send every optional field of the model, unset ones as null."""
    body = {name: None for name in CREATE[kind].model_fields} | NEEDS.get(kind, {})
    created = await admin.post(CREATE_ROUTE[kind], body)
    info = await _info(admin, kind, created)
    assert not info.get("blocked")
    update = {name: None for name in UPDATE[kind].model_fields}
    update[UPDATED_BY[kind]] = created.get("tag", created)[
        "key" if kind == "key" else "team_id" if kind == "team" else UPDATED_BY[kind]
    ]
    path = "/end_user/update" if kind == "customer" else f"/{kind}/update"
    assert (await admin.call("POST", path, update))[0] == 200


async def test_key_update_stores_its_own_litellm_fields(admin: Admin) -> None:
    key = (await admin.post("/key/generate", {}))["key"]
    await admin.post(
        "/key/update", {"key": key, "temp_budget_increase": 5, "tags": ["a"], "rpm_limit": 3}
    )
    info = (await admin.get("/key/info", key=key))["info"]
    assert (info["temp_budget_increase"], info["tags"], info["rpm_limit"]) == (5.0, ["a"], 3)


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/key/generate", {"max_budgett": 1}, "max_budgett", "did you mean max_budget?"),
        ("/team/new", {"team_aliass": "x"}, "team_aliass", "unknown field for a team"),
        (
            "/key/generate",
            {"object_permission": {"modelz": []}},
            "object_permission.modelz",
            "did you mean models?",
        ),
        ("/user/new", {"user_role": "root"}, "user_role", "must be one of proxy_admin, "),
        ("/key/generate", {"tags": "prod"}, "tags", "must be a list of tags, got 'prod'"),
        ("/key/generate", {"tags": ["x" * 300]}, "tags[0]", "1 to 128 characters"),
        ("/team/new", {"team_member_rpm_limit": 2**60}, "team_member_rpm_limit", "at most"),
        ("/key/generate", {"spend": -1}, "spend", "at least 0"),
        ("/key/generate", {"key": "sk-mine-1234"}, "key", "the limiter generates every key"),
        ("/customer/new", {"user_id": "c", "allowed_model_region": "mars"}, "", "'eu' or 'us'"),
        ("/key/update", {"key": "sk-x", "temp_budget_expiry": "soon"}, "", "datetime"),
        ("/key/generate", {"temp_budget_expiry": "2030-01-01"}, "", "unknown field for a key"),
        ("/key/delete", {"keys": ["sk-x"], "kyes": 1}, "kyes", "did you mean keys?"),
        ("/budget/delete", {"id": "b", "force": True}, "force", "unknown field for /budget/"),
        ("/key/generate", {"send_invite_email": 0}, "", "must be true or false, got 0"),
        ("/budget/new", {"budget_id": "b", "budget_reset_at": 0}, "budget_reset_at", "as text"),
    ],
)
async def test_unknown_and_malformed_fields_are_a_400_naming_them(
    admin: Admin, path: str, body: dict[str, Any], param: str, message: str
) -> None:
    status, payload = await admin.call("POST", path, body)
    assert status == 400, payload
    error = payload["error"]
    assert set(error) == ENVELOPE and message in error["message"]
    assert error["param"] == (param or next(iter(set(body) - {"key", "user_id"})))
    assert "pydantic" not in error["message"] and "errors.pydantic.dev" not in error["message"]


def test_update_leaves_blocked_alone_when_sent_as_null() -> None:
    assert "blocked" not in validate("key", {"key": "sk-x", "blocked": None}, partial=True)
    assert validate("key", {"blocked": None})["blocked"] is False


def test_the_engines_bounds_still_hold_on_enforced_fields() -> None:
    with pytest.raises(EntityError, match=r"at most 9007199\.25 dollars") as raised:
        validate("customer", {"user_id": "c", "soft_budget": 1e10})
    assert raised.value.param == "soft_budget"
    with pytest.raises(EntityError, match="at most 9007199254740991"):
        validate("team", {"model_rpm_limit": {"gpt-4o": 2**60}})


def test_both_spellings_of_a_model_budget_are_checked() -> None:
    spec = {"budget_duration": None, "time_period": 5}  # before: the bad one went unseen
    with pytest.raises(EntityError, match="time_period: duration must be a string"):
        validate("key", {"model_max_budget": {"gpt-4o": spec}})
    both = validate(
        "key", {"model_max_budget": {"gpt-4o": {"budget_limit": 2, "time_period": "1d"}}}
    )
    assert both["model_max_budget"]["gpt-4o"]["budget_duration"] == "1d"


def test_a_members_email_is_checked() -> None:
    with pytest.raises(EntityError, match=r"members\[0\].user_email"):
        validate("team", {"members": [{"user_id": "ana", "user_email": 5}]})
