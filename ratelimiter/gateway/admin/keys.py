"""Virtual keys: /key/generate, update, regenerate, info, delete, block, unblock and list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ...engine.durations import expiry_ms, parse_duration
from ...errors import EntityError
from ...responses import json_response
from ..http import STORE
from ..models import RegenerateKeyRequest, validate
from ..store import hash_key, new_key
from . import access
from .common import (
    MAX_PAGE,
    check_references,
    delete,
    entity_info,
    gate,
    id_of,
    ids_of,
    key_organization,
    key_token,
    load,
    now_ms,
    present,
    query,
    read_object,
    required,
    scope_id,
    set_spend,
    take_spend,
    truth,
    update,
    whole,
)


def preview(plain: str) -> str:
    """LiteLLM's ``key_name``: enough of a key to recognise it, too little to use it."""
    return f"sk-...{plain[-4:]}"


def _expiry(fields: dict[str, Any], now: int) -> dict[str, Any]:
    """A ``duration`` counts from now, on creation as on update (as in LiteLLM)."""
    if not fields.get("duration"):
        return {}
    return {"expires_at": expiry_ms(parse_duration(fields["duration"]), now)}


async def create_key(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """A new key and its record (its plain secret is in the answer only, never stored)."""
    store = request.app[STORE]
    fields = validate("key", body)
    spend = take_spend(fields)
    await check_references(request, "key", fields)
    await key_organization(store, fields, fields)
    plain = new_key()
    token = hash_key(plain)
    now = now_ms()
    entity = {
        "expires_at": None,
        **fields,
        **_expiry(fields, now),
        "token": token,
        "key_id": token,
        "key_name": preview(plain),
        "created_at": now,
        "updated_at": now,
    }
    await store.create("key", token, entity)
    if spend:  # a new key has spent nothing: only a spend carried over is recorded
        await set_spend(request, "key", token, entity, spend)
    return {**present("key", entity), "key": plain, "spend": spend or 0.0}


async def key_generate(request: web.Request) -> web.Response:
    body = await access.key_generate(request)
    return json_response(await create_key(request, body))


async def key_update(request: web.Request) -> web.Response:
    await access.key_update(request)
    body = await read_object(request)
    token = key_token(required(body, "key"))
    changes = validate("key", body, partial=True)
    entity = await update(request, "key", token, {**changes, **_expiry(changes, now_ms())})
    return json_response(present("key", entity))


ROTATION_FIELDS = ("key", "new_key", "grace_period", "new_master_key")


async def key_regenerate(request: web.Request) -> web.Response:
    """A new secret for a key: the old one stops (after ``grace_period``, if given), while
    the key's limits, spend and ledger history carry over, because its counters are kept
    under its ``key_id``, which does not change. Other fields change it as /key/update."""
    await access.admin(request)
    body = await read_object(request)
    store = request.app[STORE]
    in_path = request.match_info.get("key_id")
    token = key_token(id_of("key", in_path) if in_path else required(body, "key"))
    fields = validate("key", body, partial=True, model=RegenerateKeyRequest)
    rotation = {name: fields.pop(name, None) for name in ROTATION_FIELDS}
    old = await load(store, "key", token)
    await check_references(request, "key", fields)
    plain = rotation["new_key"] or new_key()
    if not plain.startswith("sk-"):
        raise EntityError(400, "new_key must start with sk-, as every virtual key does", "new_key")
    now = now_ms()
    entity = {
        **old,
        **fields,
        **_expiry(fields, now),
        "token": hash_key(plain),
        "key_id": scope_id("key", token, old),
        "key_name": preview(plain),
        "updated_at": now,
    }
    await store.create("key", entity["token"], entity)  # 409 if new_key is in use
    if rotation["grace_period"]:
        grace = expiry_ms(parse_duration(rotation["grace_period"]), now)
        ending = min(grace, old.get("expires_at") or grace)
        await update(request, "key", token, {"expires_at": ending, "key_id": entity["key_id"]})
    else:
        # Not delete(): that closes the scope, which the new secret shares.
        await store.delete("key", token)
    return json_response({**present("key", entity), "key": plain})


async def key_info(request: web.Request) -> web.Response:
    """A key's record and spend; with no ``key``, the calling key's own (as LiteLLM)."""
    caller = await access.key_info(request)
    if not request.query.get("key") and not caller.master and caller.key is not None:
        token = caller.key["token"]
    else:
        token = key_token(query(request, "key"))
    entity = await load(request.app[STORE], "key", token)
    info = await entity_info(request, "key", token, entity)
    return json_response({"key": token, "info": present("key", info)})


async def key_delete(request: web.Request) -> web.Response:
    await access.key_delete(request)
    keys = ids_of(await read_object(request), "keys")
    tokens = [key_token(k) for k in keys]
    for token in tokens:
        await load(request.app[STORE], "key", token)
    await delete(request, "key", tokens)
    return json_response({"deleted_keys": keys})


def set_blocked(kind: str, blocked: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        await access.admin(request)
        body = await read_object(request)
        ids = [key_token(required(body, "key"))] if kind == "key" else ids_of(body, "user_ids")
        entities = [await update(request, kind, i, {"blocked": blocked}) for i in ids]
        for entity_id, entity in zip(ids, entities, strict=True):
            await gate(request, kind, scope_id(kind, entity_id, entity), blocked)
        return json_response(
            present(kind, entities[0])
            if kind == "key"
            else {"blocked_users": ids}
            if blocked
            else {"unblocked_users": ids}
        )

    return handler


MAX_KEY_PAGE = 100  # keys per /key/list page, as LiteLLM allows


async def key_list(request: web.Request) -> web.Response:
    """LiteLLM's /key/list: a page of key hashes (or, with ``return_full_object``, of keys),
    filtered by ``user_id``, ``team_id``, ``key_alias`` or ``key_hash``; a caller who is not
    an admin or a viewer sees its own user's keys only."""
    caller = await access.key_list(request)
    store = request.app[STORE]
    page = whole(request, "page", 1, MAX_PAGE)
    size = whole(request, "size", 10, MAX_KEY_PAGE)
    full = truth(request, "return_full_object")
    wanted = {
        n: query(request, n) for n in ("user_id", "team_id", "key_alias") if request.query.get(n)
    }
    if request.query.get("key_hash"):
        wanted["token"] = key_token(query(request, "key_hash"))
    mine = access.listed_user(caller)
    if mine is not None:
        keys = await store.naming("key", "user_id", mine)
    elif "user_id" in wanted or "team_id" in wanted:
        owner = "user_id" if "user_id" in wanted else "team_id"
        keys = await store.naming("key", owner, wanted[owner])
    elif "token" in wanted:
        keys = [k for k in [await store.get("key", wanted["token"])] if k]
    elif full or wanted:
        keys = await store.all("key")
    else:
        keys = [{"token": token} for token in await store.ids("key")]
    keys = [k for k in keys if all(k.get(n) == v for n, v in wanted.items())]
    keys.sort(key=lambda k: k["token"])
    shown = keys[(page - 1) * size : page * size]
    return json_response(
        {
            "keys": [present("key", k) for k in shown] if full else [k["token"] for k in shown],
            "total_count": len(keys),
            "current_page": page,
            "total_pages": -(-len(keys) // size),
        }
    )
