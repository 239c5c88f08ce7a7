"""Authentication and model access for proxy requests, and the scopes a request resolves to."""

from __future__ import annotations

import time

import pytest

from ratelimiter import Engine
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.resolver import authenticate, resolve
from ratelimiter.gateway.store import EntityError, Store, hash_key
from ratelimiter.pricing import nano

GPT = Deployment("gpt-4o", "openai/gpt-4o", rpm=100, tpm=1000, index=0)
CLAUDE = Deployment("claude", "anthropic/claude-sonnet", access_groups=("premium",), index=1)
MASTER = "sk-resolver-master-4c7e1a"


@pytest.fixture
def settings(ns: str) -> Settings:
    return Settings(master_key=MASTER, key_prefix=f"t:{ns}:", models=(GPT, CLAUDE))


@pytest.fixture
def store(engine: Engine, settings: Settings) -> Store:
    return Store(engine.redis, prefix=settings.key_prefix)


async def add_key(store: Store, plain: str, **fields: object) -> None:
    await store.create("key", hash_key(plain), {"token": hash_key(plain), **fields})


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"expires_at": 1}, 401, "this API key has expired"),
        ({"blocked": True}, 403, "this API key is blocked"),
        ({"team_id": "blocked-team"}, 403, "team 'blocked-team' is blocked"),
    ],
)
async def test_refused_keys(
    store: Store, settings: Settings, fields: dict, status: int, message: str
) -> None:
    await store.create("team", "blocked-team", {"team_id": "blocked-team", "blocked": True})
    await add_key(store, "sk-k", **fields)
    with pytest.raises(EntityError, match=message) as raised:
        await authenticate(store, settings, "sk-k")
    assert raised.value.status == status


async def test_missing_unknown_and_deleted_keys(store: Store, settings: Settings) -> None:
    with pytest.raises(EntityError, match="missing API key"):
        await authenticate(store, settings, None)
    with pytest.raises(EntityError, match="does not exist or was deleted"):
        await authenticate(store, settings, "sk-never-issued")
    await add_key(store, "sk-gone")
    await store.delete("key", hash_key("sk-gone"))
    with pytest.raises(EntityError, match="does not exist or was deleted") as raised:
        await authenticate(store, settings, "sk-gone")
    assert raised.value.status == 401


async def test_a_future_expiry_and_the_master_key_pass(store: Store, settings: Settings) -> None:
    await add_key(store, "sk-valid", expires_at=int(time.time() * 1000) + 60_000)
    assert (await authenticate(store, settings, "sk-valid")).key is not None
    assert (await authenticate(store, settings, MASTER)).master


@pytest.mark.parametrize(
    ("key_models", "user_models", "model", "allowed"),
    [
        ([], [], GPT, True),
        (["all-proxy-models"], [], CLAUDE, True),
        (["premium"], [], CLAUDE, True),
        (["premium"], [], GPT, False),
        (["anthropic/*"], [], CLAUDE, True),
        (["gpt-4o", "claude"], ["gpt-4o"], CLAUDE, False),  # the narrowest list wins
        (["gpt-4o", "claude"], ["gpt-4o"], GPT, True),
    ],
)
async def test_model_access(
    store: Store,
    settings: Settings,
    key_models: list,
    user_models: list,
    model: Deployment,
    allowed: bool,
) -> None:
    await store.create("user", "u", {"user_id": "u", "models": user_models})
    await add_key(store, "sk-m", models=key_models, user_id="u")
    caller = await authenticate(store, settings, "sk-m")
    if allowed:
        await resolve(store, settings, caller, model, None, 1, 1)
    else:
        with pytest.raises(EntityError, match="not allowed to access model") as raised:
            await resolve(store, settings, caller, model, None, 1, 1)
        assert raised.value.status == 403


async def test_scopes_of_a_team_members_request(store: Store, settings: Settings) -> None:
    await store.create(
        "team",
        "t",
        {
            "team_id": "t",
            "budget_duration": "monthly",
            "members": [{"user_id": "ana", "role": "user", "max_budget_in_team": 2.0}],
        },
    )
    await store.create("user", "ana", {"user_id": "ana"})
    await add_key(store, "sk-ana", user_id="ana", team_id="t")
    caller = await authenticate(store, settings, "sk-ana")
    request = await resolve(store, settings, caller, GPT, "cust", 120, nano(0.01))
    kinds = [(s.kind, s.id) for s in request.scopes]
    assert kinds == [
        ("key", hash_key("sk-ana")),
        ("user", "ana"),
        ("team", "t"),
        ("member", "t:ana"),
        ("end_user", "cust"),
        ("deployment", "gpt-4o#0"),
    ]
    member = request.scopes[3].fields
    assert (member["max_budget"], member["budget_duration"]) == (2.0, "monthly")
    assert request.scopes[5].fields == {"rpm_limit": 100, "tpm_limit": 1000}
    assert (request.tokens, request.cost) == (120, nano(0.01))


async def test_a_blocked_end_user(store: Store, settings: Settings) -> None:
    await store.create("customer", "mallory", {"user_id": "mallory", "blocked": True})
    caller = await authenticate(store, settings, MASTER)
    with pytest.raises(EntityError, match="end user 'mallory' is blocked"):
        await resolve(store, settings, caller, GPT, "mallory", 1, 1)
