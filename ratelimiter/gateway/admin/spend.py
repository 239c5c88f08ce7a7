"""Spend reports from the ledger: /spend/logs, /global/spend and /global/spend/report."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from ...engine.durations import shown
from ...errors import EntityError
from ...ledger import Entry, Ledger, utc_ms
from ...pricing import dollars
from ...responses import json_response
from ..http import ENGINE, SETTINGS
from ..store import hash_key
from . import access
from .common import iso

MAX_PAGE = 1_000_000  # /spend/logs pages
MAX_PAGE_SIZE = 1_000  # /spend/logs rows per page
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9999, 12, 30)  # LAST_DAY + 1 still exists


GROUPS = {
    "key": "key",
    "api_key": "key",
    "user": "user",
    "team": "team",
    "organization": "organization",
    "customer": "customer",
    "end_user": "customer",
    "model": "model",
}
LOG_FILTERS = {
    "api_key": "key_hash",
    "user_id": "user_id",
    "team_id": "team_id",
    "organization_id": "organization_id",
    "end_user": "end_user",
    "model": "model",
}


def _date(request: web.Request, name: str, default: date) -> date:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        day = None
    if day is None or not FIRST_DAY <= day <= LAST_DAY:
        raise EntityError(
            400,
            f"{name} must be a date like 2026-11-24 from {FIRST_DAY} to {LAST_DAY}, "
            f"got {shown(raw)}",
            name,
        )
    return day


def _whole(request: web.Request, name: str, default: int, most: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # isdigit() before int(): int() of thousands of digits is slow, and refused past 4,300.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(most))) or not (
        1 <= int(raw) <= most
    ):
        raise EntityError(
            400, f"{name} must be a whole number from 1 to {most}, got {shown(raw)}", name
        )
    return int(raw)


def _dates(request: web.Request) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    start = _date(request, "start_date", today - timedelta(days=30))
    end = _date(request, "end_date", today)
    if end < start or (end - start).days > 366:
        raise EntityError(
            400, "end_date must be on or after start_date, at most 366 days on", "end_date"
        )
    return start, end


def _log(entry: Entry) -> dict[str, Any]:
    meta, info = entry.meta, entry.info
    return {
        "request_id": entry.request_id,
        "api_key": meta.get("key_hash"),
        "key_alias": meta.get("key_alias"),
        "user": meta.get("user_id"),
        "team_id": meta.get("team_id"),
        "organization_id": meta.get("organization_id"),
        "end_user": meta.get("end_user"),
        "model": meta.get("model"),
        "deployment": meta.get("deployment"),
        "call_type": meta.get("route"),
        "startTime": iso(entry.started_ms),
        "endTime": iso(entry.finished_ms),
        "duration_ms": entry.finished_ms - entry.started_ms,
        "prompt_tokens": info.get("prompt_tokens", 0),
        "completion_tokens": info.get("completion_tokens", 0),
        "total_tokens": entry.charged.get("tokens", 0),
        "spend": dollars(entry.charged.get("spend", 0)),
        "estimated_spend": dollars(entry.reserved.get("spend", 0)),
        "status": {"settled": "success", "released": "failure"}.get(entry.status, entry.status),
    }


async def spend_logs(request: web.Request) -> web.Response:
    own = await access.spend_logs(request)
    start, end = _dates(request)
    wanted = {meta: request.query[q] for q, meta in LOG_FILTERS.items() if request.query.get(q)}
    wanted.update(own)
    if wanted.get("key_hash", "").startswith("sk-"):  # a plain key: look it up by its hash
        wanted["key_hash"] = hash_key(wanted["key_hash"])
    request_id = request.query.get("request_id")
    page = _whole(request, "page", 1, MAX_PAGE)
    size = _whole(request, "page_size", 50, MAX_PAGE_SIZE)
    ledger = Ledger(request.app[ENGINE])
    matched = []
    async for entry in ledger.entries(utc_ms(start), utc_ms(end + timedelta(days=1))):
        if request_id and entry.request_id != request_id:
            continue
        if all(entry.meta.get(k) == v for k, v in wanted.items()):
            matched.append(entry)
    matched.sort(key=lambda e: e.finished_ms, reverse=True)
    rows = [_log(e) for e in matched[(page - 1) * size : page * size]]
    return json_response({"data": rows, "total": len(matched), "page": page, "page_size": size})


async def global_spend(request: web.Request) -> web.Response:
    await access.view(request)
    settings = request.app[SETTINGS]
    start, end = _dates(request)
    days = await Ledger(request.app[ENGINE]).rollups(start, end)
    total = sum(d.get("proxy:all", {}).get("spend", 0) for d in days.values())
    return json_response(
        {
            "spend": dollars(total),
            "max_budget": settings.max_budget,
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
        }
    )


async def global_spend_report(request: web.Request) -> web.Response:
    await access.view(request)
    group = request.query.get("group_by", "team")
    if group not in GROUPS:
        raise EntityError(
            400, f"group_by must be one of {', '.join(GROUPS)}, got {group!r}", "group_by"
        )
    start, end = _dates(request)
    prefix = GROUPS[group] + ":"
    report = []
    for day, dims in (await Ledger(request.app[ENGINE]).rollups(start, end)).items():
        for dim, totals in sorted(dims.items()):
            if dim.startswith(prefix):
                report.append(
                    {
                        "group_by_day": day.isoformat(),
                        group: dim[len(prefix) :],
                        "spend": dollars(totals.get("spend", 0)),
                        "total_tokens": totals.get("tokens", 0),
                        "requests": totals.get("requests", 0),
                        "failures": totals.get("released", 0) + totals.get("expired", 0),
                    }
                )
    return json_response(report)
