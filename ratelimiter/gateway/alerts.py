"""Alerts: crossing ``soft_budget``, each of ``budget_alert_thresholds`` (fractions of
``max_budget``) and exhausting ``max_budget`` emit an event, once per budget period and
threshold across all sidecars, with a forecast of when the budget runs out at its period's
rate; the ledger sink falling behind by more than
``ledger_sink_lag_alert`` seconds emits one when it starts and one when it is over. Each is a
log line and a webhook POST, with a one-line ``text`` that Slack's incoming webhooks show.

Nothing here runs on the request path: settled requests hand their scopes to a queue; a
checker task reads the budgets (one peek) and claims each crossing with SET NX, so exactly one
sidecar reports it; a watcher reads the shipper's lag as it wrote it to Redis; a sender task
POSTs the events with retries and back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from ..engine import Engine
from ..engine.durations import period_bounds
from ..engine.limits import Budget
from ..ledger.sink import Lag, read_lag
from ..pricing import dollars, nano
from .config import Settings
from .http import ENGINE, SETTINGS
from .policy import Scope, scope_budgets

__all__ = ["ALERTS", "Alerts", "add_alerts"]

log = logging.getLogger("ratelimiter.alerts")

QUEUE_SIZE = 10_000
BATCH_S = 0.2
ATTEMPTS = 6


class Alerts:
    """Budget alerts, checked off the request path.

    Settled requests only mark their scopes dirty; a checker wakes at most every ``BATCH_S``
    and peeks each dirty scope's budgets once. Under load that is one Redis call per batch,
    not one per request, and an alert is at most ``BATCH_S`` late.
    """

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self.dirty: dict[tuple[str, str], Scope] = {}
        self.exhausted: dict[str, Budget] = {}
        self.wake = asyncio.Event()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)

    def observe(self, scopes: tuple[Scope, ...]) -> None:
        """Called after a request is settled; never waits."""
        for scope in scopes:
            self.dirty[scope.kind, scope.id] = scope  # the latest fields win
        self.wake.set()

    def refused(self, budget: Budget) -> None:
        """A request was refused by ``budget``: it is exhausted for this period."""
        self.exhausted[budget.key] = budget
        self.wake.set()

    async def check(self, scopes: Iterable[Scope], exhausted: Iterable[Budget] = ()) -> None:
        now = await self.engine.now_ms()
        exhausted = list(exhausted)
        if exhausted:
            states = await self.engine.peek(exhausted)
            for budget, state in zip(exhausted, states, strict=True):
                used = budget.capacity - state.remaining
                await self._report("budget_exceeded", budget, budget.capacity, used, now)
        prefix = self.settings.key_prefix
        watched = [(scope, budget) for scope in scopes for budget in scope_budgets(scope, prefix)]
        if not watched:
            return
        states = await self.engine.peek([budget for _, budget in watched])
        for (scope, budget), state in zip(watched, states, strict=True):
            used = budget.capacity - state.remaining
            soft = scope.fields.get("soft_budget")
            if soft is not None and budget.name.endswith(":budget") and used >= nano(soft):
                await self._report("soft_budget_crossed", budget, nano(soft), used, now)
            for fraction in self.settings.budget_alert_thresholds:
                level = math.ceil(budget.capacity * fraction)
                if budget.capacity > 0 and used >= level and fraction < 1:
                    await self._report("budget_threshold_crossed", budget, level, used, now)
            if state.remaining == 0:
                await self._report("budget_exceeded", budget, budget.capacity, used, now)

    async def _report(self, kind: str, budget: Budget, threshold: int, used: int, now: int) -> None:
        """Emit once per budget period and threshold, whichever sidecar sees it first (SET NX)."""
        start, end = period_bounds(budget.period, now, self.engine.tz)  # type: ignore[arg-type]
        marker = f"{budget.key}:{start}:alert:{kind}"
        if kind == "budget_threshold_crossed":
            marker += f":{threshold}"
        if not await self.engine.redis.set(marker, 1, nx=True, px=end - now + 86_400_000):
            return
        scope, _, scope_id = budget.key.partition("{")[2].partition("}")[0].partition(":")
        share = used / budget.capacity if budget.capacity else 1.0
        what = {
            "budget_exceeded": "exhausted",
            "soft_budget_crossed": "passed its soft budget",
        }.get(kind, f"passed {threshold / budget.capacity:.0%}" if budget.capacity else "")
        runs_out = _runs_out_at(used, budget.capacity, start, end, now)
        forecast = f"; at this period's rate it runs out on {_utc(runs_out)}" if runs_out else ""
        self.emit(
            {
                "text": (
                    f"{scope} {scope_id}: {budget.name} {what}, ${dollars(used):.6g} of "
                    f"${dollars(budget.capacity):.6g} ({share:.0%}) this {budget.period} "
                    f"period{forecast}"
                ),
                "event": kind,
                "scope": scope,
                "id": scope_id,
                "budget": budget.name,
                "budget_duration": str(budget.period),
                "threshold": dollars(threshold),
                "spend": dollars(used),
                "spend_share": round(share, 4),
                "max_budget": dollars(budget.capacity),
                "period_start_ms": start,
                "period_end_ms": end,
                "runs_out_at_ms": runs_out,
            }
        )

    def emit(self, event: dict[str, Any]) -> None:
        log.warning("alert: %s", event["text"], extra={"alert": event})
        if self.settings.alert_webhook_url:
            with contextlib.suppress(asyncio.QueueFull):
                self.events.put_nowait(event)

    async def run_checks(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(BATCH_S)
            self.wake.clear()
            scopes, self.dirty = self.dirty, {}
            exhausted, self.exhausted = self.exhausted, {}
            try:
                await self.check(scopes.values(), exhausted.values())
            except Exception as exc:
                log.warning("budget alert check failed: %s", exc)

    async def watch_sink_lag(self) -> None:
        """The ledger sink's lag against ``ledger_sink_lag_alert``: the first sidecar to see it
        pass the threshold claims the incident (SET NX) and reports it; the first to see it
        back under deletes the claim and reports that. A claim outlives no incident by more
        than a day."""
        threshold = self.settings.ledger_sink_lag_alert_s
        marker = f"{self.settings.key_prefix}alert:ledger_sink_lagging"
        while True:
            await asyncio.sleep(self.settings.collect_interval_s)
            try:
                lag = await read_lag(self.engine)
                if lag is None:
                    continue
                if lag.seconds > threshold:
                    if await self.engine.redis.set(marker, 1, nx=True, px=86_400_000):
                        self.emit(_lag_event("ledger_sink_lagging", lag, threshold))
                elif await self.engine.redis.delete(marker):
                    self.emit(_lag_event("ledger_sink_recovered", lag, threshold))
            except Exception as exc:
                log.warning("ledger sink lag check failed: %s", exc)

    async def run_sender(self, session: aiohttp.ClientSession) -> None:
        url = self.settings.alert_webhook_url
        while True:
            event = await self.events.get()
            for attempt in range(ATTEMPTS):
                try:
                    async with session.post(url, json=event) as response:
                        if response.status < 300:
                            break
                        reason = f"status {response.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    reason = type(exc).__name__
                await asyncio.sleep(min(0.2 * 2**attempt, 10))
            else:
                log.error(
                    "alert webhook failed %d times (%s); event dropped: %s",
                    ATTEMPTS,
                    reason,
                    event["event"],
                    extra={"alert": event},
                )


# A budget that never resets spans 1970 to 2070: a rate over that says nothing.
FORECAST_MAX_PERIOD_MS = 400 * 86_400_000


def _runs_out_at(used: int, capacity: int, start: int, end: int, now: int) -> int | None:
    """When the budget runs out if spending goes on at this period's rate so far (its own
    period, not the calendar month); None if it lasts the period, is already spent, or the
    period is too long for a rate to mean anything."""
    elapsed = now - start
    if used <= 0 or used >= capacity or elapsed <= 0 or end - start > FORECAST_MAX_PERIOD_MS:
        return None
    at = start + capacity * elapsed // used
    return at if at < end else None


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _lag_event(kind: str, lag: Lag, threshold: float) -> dict[str, Any]:
    if kind == "ledger_sink_lagging":
        text = (
            f"ledger sink behind by {lag.seconds:.0f} s ({lag.entries} entries waiting in "
            f"Redis; alert at {threshold:g} s)" + (f": {lag.error}" if lag.error else "")
        )
    else:
        text = f"ledger sink caught up: {lag.entries} entries waiting, {lag.seconds:.0f} s behind"
    return {
        "text": text,
        "event": kind,
        "lag_entries": lag.entries,
        "lag_seconds": lag.seconds,
        "threshold_seconds": threshold,
        "error": lag.error,
    }


ALERTS = web.AppKey("alerts", Alerts)


async def _alerts(app: web.Application) -> AsyncIterator[None]:
    alerts = app[ALERTS] = Alerts(app[ENGINE], app[SETTINGS])
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    tasks = [
        asyncio.create_task(alerts.run_checks()),
        asyncio.create_task(alerts.run_sender(session)),
    ]
    if app[SETTINGS].ledger_sink:
        tasks.append(asyncio.create_task(alerts.watch_sink_lag()))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=2)
    await session.close()


def add_alerts(app: web.Application) -> None:
    app.cleanup_ctx.append(_alerts)
