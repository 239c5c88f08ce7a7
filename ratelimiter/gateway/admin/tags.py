"""Tags with budgets, in LiteLLM's shapes: /tag/new, /tag/info, /tag/update, /tag/delete,
/tag/list, and /spend/tags.

A tag is an entity like a team: its limits (``max_budget`` over ``budget_duration``,
``soft_budget``, ``rpm_limit``, ``tpm_limit``, ``max_parallel_requests``, ``model_max_budget``,
or those of the budget ``budget_id`` names) apply to every request that carries it, as the
scope ``{tag:<name>}`` (resolver.py). Its spend is the ledger's dimension ``tag:<name>``,
which every request carrying the tag is rolled up under, entity or not. ``description``,
``models`` and ``model_info`` are stored and shown, not enforced (LiteLLM routes by them).
Writes need an admin (the master key or a proxy_admin); reads a proxy_admin_viewer too."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...errors import EntityError
from ...ledger import Entry, Ledger
from ...pricing import dollars
from ...responses import json_response
from ..http import ENGINE, STORE
from ..models import check_request, validate
from ..policy import LIMIT_FIELDS
from ..resolver import Caller
from . import access
from .common import check_references, entity_info, now_ms, present, read_object, set_spend
from .common import take_spend as _take_spend
from .spend import _dates, _entries

__all__ = ["spend_tags", "tag_delete", "tag_info", "tag_list", "tag_new", "tag_update"]

# LiteLLM's description of a tag seen in requests that is not an entity
DYNAMIC = (
    "This is just a spend tag that was passed dynamically in a request. It does not control "
    "any LLM models."
)


def _not_found(name: str) -> EntityError:
    return EntityError(404, f"Tag {name} not found", "name")


async def _load(request: web.Request, name: str) -> dict[str, Any]:
    tag = await request.app[STORE].get("tag", name)
    if tag is None:
        raise _not_found(name)
    return tag


async def _shown(request: web.Request, tag: dict[str, Any]) -> dict[str, Any]:
    """A tag as LiteLLM's info shows it (its limits flat and under ``litellm_budget_table``),
    with its lifetime ``spend`` and, per budget window, what is spent and when it resets."""
    info = present("tag", await entity_info(request, "tag", tag["name"], tag))
    limits = {name: info.get(name) for name in LIMIT_FIELDS}
    has_budget = info.get("budget_id") or any(v is not None for v in limits.values())
    return {
        "description": None,
        "models": [],
        "model_info": {},
        "created_by": None,
        **info,
        "litellm_budget_table": (
            {"budget_id": info.get("budget_id"), **limits} if has_budget else None
        ),
    }


async def _written(request: web.Request, tag: dict[str, Any], spend: float | None) -> None:
    if tag.get("budget_id"):
        await check_references(request, "tag", {"budget_id": tag["budget_id"]})
    if spend is not None:
        await set_spend(request, "tag", tag["name"], tag, spend)


async def tag_new(request: web.Request) -> web.Response:
    caller = await access.admin(request)
    tag = validate("tag", await read_object(request))
    spend = _take_spend(tag)
    if tag.get("budget_id"):
        await check_references(request, "tag", {"budget_id": tag["budget_id"]})
    now = now_ms()
    tag |= {"created_at": now, "updated_at": now, "created_by": _who(caller)}
    try:
        await request.app[STORE].create("tag", tag["name"], tag)
    except EntityError as exc:
        if exc.status == 409:  # LiteLLM's words and status
            raise EntityError(400, f"Tag {tag['name']} already exists", "name") from None
        raise
    await _written(request, tag, spend)
    return json_response(
        {"message": f"Tag {tag['name']} created successfully", "tag": await _shown(request, tag)}
    )


def _who(caller: Caller) -> str | None:
    if caller.master:
        return "admin"
    return (caller.user or {}).get("user_id")


async def tag_update(request: web.Request) -> web.Response:
    await access.admin(request)
    body = await read_object(request)
    changes = validate("tag", body, partial=True)
    spend = _take_spend(changes)
    name = body["name"]
    tag = {**await _load(request, name), **changes, "updated_at": now_ms()}
    if changes.get("budget_id"):
        await check_references(request, "tag", {"budget_id": changes["budget_id"]})
    await request.app[STORE].put("tag", name, tag)
    await _written(request, tag, spend)
    return json_response(
        {"message": f"Tag {name} updated successfully", "tag": await _shown(request, tag)}
    )


async def tag_info(request: web.Request) -> web.Response:
    """LiteLLM's answer: {name: tag} for each name asked; a 404 naming those not found."""
    await access.view(request)
    names = check_request("/tag/info", await read_object(request)).names  # type: ignore[attr-defined]
    store = request.app[STORE]
    found = {name: await store.get("tag", name) for name in dict.fromkeys(names)}
    missing = [name for name, tag in found.items() if tag is None]
    if missing:
        raise EntityError(404, f"Tags not found: {missing}", "names")
    return json_response({name: await _shown(request, tag) for name, tag in found.items() if tag})


async def tag_delete(request: web.Request) -> web.Response:
    """The tag's counters stay (a tag made again under the name finds its spend); requests
    carrying it are labels from then on."""
    await access.admin(request)
    name = check_request("/tag/delete", await read_object(request)).name  # type: ignore[attr-defined]
    await _load(request, name)
    await request.app[STORE].delete("tag", name)
    return json_response({"message": f"Tag {name} deleted successfully"})


async def _recent_spend(request: web.Request) -> dict[str, int]:
    """Spend (nano-dollars) per tag requests carried from ``start_date`` to ``end_date``
    (LiteLLM's parameters of /tag/list), by default over the last 30 days."""
    start, end = _dates(request)
    days = await Ledger(request.app[ENGINE]).rollups(start, end)
    out: dict[str, int] = {}
    for totals in days.values():
        for dim, amounts in totals.items():
            if dim.startswith("tag:"):
                out[dim[4:]] = out.get(dim[4:], 0) + amounts.get("spend", 0)
    return out


async def tag_list(request: web.Request) -> web.Response:
    """Every tag entity, then (as LiteLLM) each tag requests carried from ``start_date`` to
    ``end_date`` (the last 30 days by default) that is not one, with LiteLLM's description of
    such a tag and its spend in those days."""
    await access.view(request)
    tags = sorted(await request.app[STORE].all("tag"), key=lambda t: t["name"])
    listed = [await _shown(request, tag) for tag in tags]
    known = {tag["name"] for tag in tags}
    recent = await _recent_spend(request)
    dynamic = [
        {"name": name, "description": DYNAMIC, "models": None, "spend": dollars(spend)}
        for name, spend in sorted(recent.items())
        if name not in known
    ]
    return json_response(listed + dynamic)


async def spend_tags(request: web.Request) -> web.Response:
    """LiteLLM's /spend/tags: per tag, the requests that carried it and their spend, from
    ``start_date`` to ``end_date`` (the last 30 days by default), most spent first."""
    await access.view(request)
    start, end = _dates(request)
    rows: dict[str, dict[str, Any]] = {}
    for entry in await _entries(request, start, end, _tagged):
        for tag in entry.meta["tags"]:
            row = rows.setdefault(tag, {"log_count": 0, "total_spend": 0})
            row["log_count"] += 1
            row["total_spend"] += entry.charged.get("spend", 0)
    ranked = sorted(rows.items(), key=lambda kv: (-kv[1]["total_spend"], kv[0]))
    return json_response(
        [
            {
                "individual_request_tag": tag,
                "log_count": row["log_count"],
                "total_spend": dollars(row["total_spend"]),
            }
            for tag, row in ranked
        ]
    )


def _tagged(entry: Entry) -> bool:
    tags = entry.meta.get("tags")
    return isinstance(tags, list) and bool(tags)
