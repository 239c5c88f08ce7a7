"""Spend reports from the ledger, in LiteLLM's shapes: /spend/logs, /global/spend,
/global/spend/report, /global/spend/keys, /global/spend/teams, /global/spend/models and
/global/spend/end_users.

Totals per day (keys, teams, models, the proxy) come from the daily rollups, which cost what
the days hold; /spend/logs and the breakdowns that cross dimensions (a team's spend per model
and key, one key's end users) read the entries themselves: those still in Redis and, with a
ledger sink, those shipped to PostgreSQL (``ledger.history``), so they see the whole history the
database keeps; without one, what ``ratelimiter ledger export --ack`` has not trimmed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from ...engine.durations import shown
from ...errors import EntityError
from ...ledger import Entry, Ledger, utc_ms
from ...ledger.history import history
from ...ledger.spendlog import spend_log
from ...pricing import dollars
from ...responses import json_response
from ..http import ENGINE, SETTINGS, SINK, STORE
from ..models import check_request
from . import access
from .common import MAX_PAGE, key_token, read_object, scope_id, whole

MAX_PAGE_SIZE = 1_000  # /spend/logs rows per page
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9999, 12, 30)  # LAST_DAY + 1 still exists


# /global/spend/report's group_by, LiteLLM's three and our names for them.
GROUPS = {
    "team": "team",
    "organization": "organization",
    "customer": "customer",
    "end_user": "customer",
    "api_key": "api_key",
    "key": "api_key",
    "tag": "tag",  # ours: a request counts under each of its tags
}
TOP_END_USERS = 100  # /global/spend/end_users, as LiteLLM
MAX_LIMIT = 1_000_000  # /global/spend/keys and /models
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


async def _ledger_key(request: web.Request, given: str) -> str:
    """The id the ledger knows a key by, from its plain secret or its hash: its ``key_id``,
    which stays the same when /key/regenerate gives the key a new secret."""
    token = key_token(given)
    key = await request.app[STORE].get("key", token)
    return scope_id("key", token, key) if key else token


def _dates(request: web.Request) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    start = _date(request, "start_date", today - timedelta(days=30))
    end = _date(request, "end_date", today)
    if end < start or (end - start).days > 366:
        raise EntityError(
            400, "end_date must be on or after start_date, at most 366 days on", "end_date"
        )
    return start, end


def _summarize(request: web.Request, start: date | None, end: date | None) -> bool:
    """LiteLLM's ``summarize``: with both dates given, spend per day unless it is false."""
    raw = request.query.get("summarize")
    if raw is not None and raw.lower() not in ("true", "false", "1", "0"):
        raise EntityError(400, f"summarize must be true or false, got {shown(raw)}", "summarize")
    asked = raw is None or raw.lower() in ("true", "1")
    return asked and start is not None and end is not None


def _by_day(entries: list[Entry], start: date, end: date) -> list[dict[str, Any]]:
    """LiteLLM's summary: per day, the spend, and the spend per key (by its hash), user and
    model; every day up to end_date is listed once the first day with spend is."""
    days: dict[date, dict[str, Any]] = {}
    for entry in entries:
        day = datetime.fromtimestamp(entry.started_ms / 1000, UTC).date()
        row = days.setdefault(day, {"spend": 0.0, "users": {}, "models": {}})
        spend, meta = dollars(entry.charged.get("spend", 0)), entry.meta
        row["spend"] += spend
        key = meta.get("key_hash")
        if key:
            row[key] = row.get(key, 0.0) + spend
        user, model = meta.get("user_id") or "", meta.get("model") or ""  # JSON keys
        row["users"][user] = row["users"].get(user, 0.0) + spend
        row["models"][model] = row["models"].get(model, 0.0) + spend
    out = [{**row, "startTime": day.isoformat()} for day, row in sorted(days.items())]
    if days:
        day = max(days) + timedelta(days=1)
        while day <= end:
            out.append({"startTime": day.isoformat(), "spend": 0, "users": {}, "models": {}})
            day += timedelta(days=1)
    return out


async def _entries(request: web.Request, start: date, end: date, keep: Any = None) -> list[Entry]:
    """The entries finished from ``start`` to ``end`` (whole UTC days) that ``keep``: those in
    Redis and, with a sink, those shipped to PostgreSQL, each once."""
    ledger, sink = Ledger(request.app[ENGINE]), request.app.get(SINK)
    found = []
    async for entry in history(ledger, sink, utc_ms(start), utc_ms(end + timedelta(days=1))):
        if keep is None or keep(entry):
            found.append(entry)
    return found


async def spend_logs(request: web.Request) -> web.Response:
    """A list, as LiteLLM's /spend/logs: the entries matching every filter, newest first
    (``page``/``page_size`` page through them, 1,000 rows by default); with both dates and
    ``summarize`` not false, LiteLLM's spend per day instead. ``request_id`` finds an entry by
    the upstream's id of its answer or by the sidecar's id."""
    own = await access.spend_logs(request)
    start, end = _dates(request)
    given = [request.query.get(name) for name in ("start_date", "end_date")]
    summarize = _summarize(request, *given)
    wanted = {meta: request.query[q] for q, meta in LOG_FILTERS.items() if request.query.get(q)}
    wanted.update(own)
    if "key_hash" in wanted:
        wanted["key_hash"] = await _ledger_key(request, wanted["key_hash"])
    request_id = request.query.get("request_id")
    page = whole(request, "page", 1, MAX_PAGE)
    size = whole(request, "page_size", MAX_PAGE_SIZE, MAX_PAGE_SIZE)

    def keep(entry: Entry) -> bool:
        if request_id and request_id not in (entry.request_id, entry.info.get("response_id")):
            return False
        return all(entry.meta.get(k) == v for k, v in wanted.items())

    matched = await _entries(request, start, end, keep)
    if summarize:
        return json_response(_by_day(matched, start, end))
    matched.sort(key=lambda e: e.finished_ms, reverse=True)
    return json_response([spend_log(e) for e in matched[(page - 1) * size : page * size]])


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


def _tally(rows: dict[Any, dict[str, Any]], key: Any, **amounts: float) -> dict[str, Any]:
    row = rows.setdefault(key, dict.fromkeys(amounts, 0))
    for name, amount in amounts.items():
        row[name] += amount
    return row


async def global_spend_report(request: web.Request) -> web.Response:
    """LiteLLM's report. ``group_by=team`` (the default) and ``customer``: per day, each team
    (by alias; ``Unassigned Team`` for keys of none) or customer with its total and its spend
    per model and key; ``tag`` (ours) the same per tag, a request under each of its tags.
    ``group_by=api_key``, or ``api_key``/``internal_user_id`` given: per key, its cost and
    tokens per model over the range. ``team_id``/``customer_id`` narrow any of them."""
    await access.view(request)
    group = request.query.get("group_by", "team")
    if group not in GROUPS:
        raise EntityError(
            400,
            f"group_by must be one of team, customer, api_key, tag, got {shown(group)}",
            "group_by",
        )
    group = GROUPS[group]
    start, end = _dates(request)
    filters = {
        meta: request.query[q]
        for q, meta in (
            ("api_key", "key_hash"),
            ("internal_user_id", "user_id"),
            ("team_id", "team_id"),
            ("customer_id", "end_user"),
        )
        if request.query.get(q)
    }
    if "key_hash" in filters:
        filters["key_hash"] = await _ledger_key(request, filters["key_hash"])
    if "key_hash" in filters or "user_id" in filters:
        group = "api_key"
    entries = await _entries(
        request, start, end, lambda e: all(e.meta.get(k) == v for k, v in filters.items())
    )
    if group == "api_key":
        return json_response(_per_key(entries))
    aliases: dict[str, str] = {}
    if group == "team":
        for team in await request.app[STORE].all("team"):
            aliases[team["team_id"]] = team.get("team_alias") or team["team_id"]
    days: dict[str, dict[Any, dict[str, Any]]] = {}
    for entry in entries:
        meta = entry.meta
        day = datetime.fromtimestamp(entry.started_ms / 1000, UTC).date().isoformat()
        if group == "team":
            team_id = meta.get("team_id")
            name = aliases.get(team_id, team_id) if team_id else "Unassigned Team"
            whos: list[Any] = [(name, team_id)]
        elif group == "tag":
            whos = list(meta.get("tags") or [])
        else:
            whos = [meta.get("end_user")]
        spend, tokens = dollars(entry.charged.get("spend", 0)), entry.charged.get("tokens", 0)
        for who in whos:
            row = days.setdefault(day, {}).setdefault(who, {"total_spend": 0.0, "metadata": {}})
            row["total_spend"] += spend
            _tally(
                row["metadata"],
                (meta.get("model"), meta.get("key_hash")),
                spend=spend,
                total_tokens=tokens,
            )
    report = []
    for day, rows in sorted(days.items()):
        items = []
        for who, row in rows.items():
            metadata = [
                {"model": model, "api_key": key, **amounts}
                for (model, key), amounts in row["metadata"].items()
            ]
            if group == "team":
                named = {"team_name": who[0], "team_id": who[1]}
            else:
                named = {"tag" if group == "tag" else "customer": who}
            items.append({**named, "total_spend": row["total_spend"], "metadata": metadata})
        report.append({"group_by_day": day, _REPORT_ROWS[group]: items})
    return json_response(report)


_REPORT_ROWS = {"team": "teams", "customer": "customers", "tag": "tags"}


def _per_key(entries: list[Entry]) -> list[dict[str, Any]]:
    keys: dict[Any, dict[Any, dict[str, Any]]] = {}
    for entry in entries:
        _tally(
            keys.setdefault(entry.meta.get("key_hash"), {}),
            entry.meta.get("model"),
            total_cost=dollars(entry.charged.get("spend", 0)),
            total_input_tokens=entry.info.get("prompt_tokens", 0),
            total_output_tokens=entry.info.get("completion_tokens", 0),
        )
    out = []
    for key, models in keys.items():
        details = [{"model": model, **amounts} for model, amounts in models.items()]
        out.append(
            {
                "api_key": key,
                "total_cost": sum(d["total_cost"] for d in details),
                "total_input_tokens": sum(d["total_input_tokens"] for d in details),
                "total_output_tokens": sum(d["total_output_tokens"] for d in details),
                "model_details": details,
            }
        )
    return sorted(out, key=lambda r: r["total_cost"], reverse=True)


async def _last_30_days(request: web.Request, prefix: str) -> dict[str, dict[date, int]]:
    """Spend per day of every dimension starting with ``prefix`` over the last 30 days (as
    LiteLLM's Last30d… views), from the rollups: dimension id -> day -> nano-dollars."""
    today = datetime.now(UTC).date()
    days = await Ledger(request.app[ENGINE]).rollups(today - timedelta(days=30), today)
    out: dict[str, dict[date, int]] = {}
    for day, dims in days.items():
        for dim, totals in dims.items():
            if dim.startswith(prefix) and totals.get("spend"):
                out.setdefault(dim[len(prefix) :], {})[day] = totals["spend"]
    return out


def _top(totals: dict[str, int], limit: int) -> list[tuple[str, int]]:
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


async def global_spend_keys(request: web.Request) -> web.Response:
    """LiteLLM's top keys by spend over the last 30 days: api_key (the hash), key_alias,
    key_name, total_spend; ``limit`` keeps the first n."""
    await access.view(request)
    limit = whole(request, "limit", MAX_LIMIT, MAX_LIMIT)  # none given: every key
    per_key = await _last_30_days(request, "key:")
    rows = []
    store = request.app[STORE]
    for token, nano_spend in _top({k: sum(d.values()) for k, d in per_key.items()}, limit):
        # the rollups name a key by its key_id, which a regenerated key keeps
        key = await store.get("key", token) or next(
            iter(await store.naming("key", "key_id", token)), {}
        )
        rows.append(
            {
                "api_key": token,
                "key_alias": key.get("key_alias"),
                "key_name": key.get("key_name"),
                "total_spend": dollars(nano_spend),
            }
        )
    return json_response(rows)


async def global_spend_models(request: web.Request) -> web.Response:
    """LiteLLM's top models by spend over the last 30 days (``limit``, default 10)."""
    await access.view(request)
    limit = whole(request, "limit", 10, MAX_LIMIT)
    per_model = await _last_30_days(request, "model:")
    totals = {m: sum(d.values()) for m, d in per_model.items()}
    return json_response([{"model": m, "total_spend": dollars(n)} for m, n in _top(totals, limit)])


async def global_spend_teams(request: web.Request) -> web.Response:
    """LiteLLM's spend per team and day over the last 30 days: ``daily_spend`` (per day, each
    team's spend under its alias), ``teams`` (the aliases) and ``total_spend_per_team`` (the
    top 10). Spend of keys in no team is ``Unassigned``."""
    await access.view(request)
    per_team = await _last_30_days(request, "team:")
    proxy = (await _last_30_days(request, "proxy:")).get("all", {})
    aliases = {
        t["team_id"]: t.get("team_alias") or t["team_id"]
        for t in await request.app[STORE].all("team")
    }
    by_day: dict[date, dict[str, int]] = {}
    for team_id, days in per_team.items():
        name = aliases.get(team_id, team_id)
        for day, amount in days.items():
            row = by_day.setdefault(day, {})
            row[name] = row.get(name, 0) + amount
    for day, amount in proxy.items():
        rest = amount - sum(by_day.get(day, {}).values())
        if rest > 0:
            by_day.setdefault(day, {})["Unassigned"] = rest
    totals: dict[str, int] = {}
    for row in by_day.values():
        for name, amount in row.items():
            totals[name] = totals.get(name, 0) + amount
    return json_response(
        {
            "daily_spend": [
                {"date": day.isoformat(), **{n: dollars(a) for n, a in row.items()}}
                for day, row in sorted(by_day.items())
            ],
            "teams": sorted(totals),
            "total_spend_per_team": [
                {"team_id": name, "total_spend": dollars(amount)}
                for name, amount in _top(totals, 10)
            ],
        }
    )


async def global_spend_end_users(request: web.Request) -> web.Response:
    """LiteLLM's top 100 end users by spend (POST, body optional: api_key, startTime,
    endTime; default the last 30 days): end_user, total_count, total_spend."""
    await access.view(request)
    body = check_request("/global/spend/end_users", await read_object(request))
    now = datetime.now(UTC)
    since = _aware(body.startTime) or now - timedelta(days=30)  # type: ignore[attr-defined]
    until = _aware(body.endTime) or now  # type: ignore[attr-defined]
    if until < since:
        raise EntityError(400, "endTime must be on or after startTime", "endTime")
    api_key = body.api_key  # type: ignore[attr-defined]
    if api_key:
        api_key = await _ledger_key(request, api_key)
    since_ms, until_ms = int(since.timestamp() * 1000), int(until.timestamp() * 1000)

    def keep(entry: Entry) -> bool:
        return (
            since_ms <= entry.started_ms < until_ms
            and bool(entry.meta.get("end_user"))
            and (not api_key or entry.meta.get("key_hash") == api_key)
        )

    first = max(since.date(), FIRST_DAY)
    last = min(until.date(), LAST_DAY)
    users: dict[Any, dict[str, Any]] = {}
    for entry in await _entries(request, first, last, keep):
        _tally(
            users,
            entry.meta["end_user"],
            total_count=1,
            total_spend=dollars(entry.charged.get("spend", 0)),
        )
    ranked = sorted(users.items(), key=lambda kv: (-kv[1]["total_spend"], kv[0]))
    return json_response([{"end_user": u, **row} for u, row in ranked[:TOP_END_USERS]])


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
