"""Virtual keys: /key/generate, update, info, delete, block, unblock and list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ...engine.durations import expiry_ms, parse_duration
from ...responses import json_response
from ..http import STORE, require_master
from ..models import validate
from ..store import hash_key, new_key
from .common import (
    check_references,
    delete,
    entity_info,
    gate,
    ids_of,
    iso,
    key_id,
    key_organization,
    load,
    now_ms,
    query,
    read_object,
    required,
    update,
)


async def create_key(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    store = request.app[STORE]
    fields = validate("key", body)
    await check_references(request, "key", fields)
    await key_organization(store, fields, fields)
    plain = new_key()
    token = hash_key(plain)
    now = now_ms()
    expires = None
    if fields.get("duration"):
        expires = expiry_ms(parse_duration(fields["duration"]), now)
    entity = {**fields, "token": token, "created_at": now, "expires_at": expires}
    await store.create("key", token, entity)
    return {**entity, "key": plain, "expires": iso(expires)}


async def key_generate(request: web.Request) -> web.Response:
    require_master(request)
    return json_response(await create_key(request, await read_object(request)))


async def key_update(request: web.Request) -> web.Response:
    """A new ``duration`` counts from now, as in LiteLLM: the key expires that long after
    the update."""
    require_master(request)
    body = await read_object(request)
    token = key_id(required(body, "key"))
    changes = validate("key", body, partial=True)
    if changes.get("duration"):
        changes["expires_at"] = expiry_ms(parse_duration(changes["duration"]), now_ms())
    entity = await update(request, "key", token, changes)
    return json_response({**entity, "expires": iso(entity.get("expires_at"))})


async def key_info(request: web.Request) -> web.Response:
    require_master(request)
    token = key_id(query(request, "key"))
    entity = await load(request.app[STORE], "key", token)
    return json_response({"key": token, "info": await entity_info(request, "key", token, entity)})


async def key_delete(request: web.Request) -> web.Response:
    require_master(request)
    keys = ids_of(await read_object(request), "keys")
    tokens = [key_id(k) for k in keys]
    for token in tokens:
        await load(request.app[STORE], "key", token)
    await delete(request, "key", tokens)
    return json_response({"deleted_keys": keys})


def set_blocked(kind: str, blocked: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        body = await read_object(request)
        ids = [key_id(required(body, "key"))] if kind == "key" else ids_of(body, "user_ids")
        entities = [await update(request, kind, i, {"blocked": blocked}) for i in ids]
        for entity_id in ids:
            await gate(request, kind, entity_id, blocked)
        return json_response(
            entities[0]
            if kind == "key"
            else {"blocked_users": ids}
            if blocked
            else {"unblocked_users": ids}
        )

    return handler


async def key_list(request: web.Request) -> web.Response:
    require_master(request)
    keys = await request.app[STORE].ids("key")
    return json_response({"keys": keys, "total_count": len(keys)})
