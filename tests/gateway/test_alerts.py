"""Budget alerts: one webhook event per crossing per period, retried, never on the request path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import openai
import pytest
from aiohttp import web

from ratelimiter.engine.embedded import free_port
from ratelimiter.gateway.config import Deployment, Settings

from ..conftest import MASTER_KEY, MESSAGES, Admin, running_sidecar, running_upstream


@dataclass
class Receiver:
    url: str = ""
    events: list[dict] = field(default_factory=list)
    calls: int = 0
    fail_first: int = 0
    hang_s: float = 0.0


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()

    async def hook(request: web.Request) -> web.Response:
        state.calls += 1
        if state.hang_s:
            await asyncio.sleep(state.hang_s)
        if state.calls <= state.fail_first:
            return web.Response(status=503)
        state.events.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state.url = f"http://127.0.0.1:{port}/hook"
    yield state
    await runner.cleanup()


def alerting(
    ns: str, receiver: Receiver, upstream: str, thresholds: tuple[float, ...] = ()
) -> Settings:
    """A sidecar that sends its alerts to ``receiver``; model ``m`` at $1/$2 per million."""
    return Settings(
        master_key=MASTER_KEY,
        key_prefix=f"t:{ns}:",
        alert_webhook_url=receiver.url,
        budget_alert_thresholds=thresholds,
        models=(
            Deployment(
                "m",
                "openai/m",
                api_base=upstream,
                input_cost_per_token=1e-6,
                output_cost_per_token=2e-6,
            ),
        ),
    )


@pytest.fixture
async def sidecar(receiver: Receiver, ns: str, redis_url: str) -> AsyncIterator[tuple[str, Admin]]:
    async with running_upstream() as upstream:
        settings = alerting(ns, receiver, upstream)
        async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as session:
            yield base, Admin(session, base)


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_one_event_per_crossing_retried_until_delivered(
    sidecar: tuple[str, Admin], receiver: Receiver
) -> None:
    base, admin = sidecar
    receiver.fail_first = 2  # the first deliveries fail: back-off and retry
    key = (
        await admin.post(
            "/key/generate", {"max_budget": 0.0001, "soft_budget": 0.00003, "key_alias": "alerted"}
        )
    )["key"]
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    refused = 0
    for _ in range(12):  # each costs 18e-6: soft crossed at the 2nd, refused from the 6th on
        try:
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
        except openai.RateLimitError:
            refused += 1
    await client.close()
    assert refused >= 5
    await wait_for(lambda: len(receiver.events) >= 2)
    await asyncio.sleep(0.5)  # nothing more comes
    kinds = sorted(e["event"] for e in receiver.events)
    assert kinds == ["budget_exceeded", "soft_budget_crossed"]
    soft = next(e for e in receiver.events if e["event"] == "soft_budget_crossed")
    assert (soft["scope"], soft["threshold"], soft["max_budget"]) == ("key", 3e-05, 0.0001)
    assert soft["spend"] >= 3e-05
    assert receiver.calls == len(receiver.events) + 2


async def test_a_hanging_receiver_does_not_slow_requests(
    sidecar: tuple[str, Admin], receiver: Receiver
) -> None:
    base, admin = sidecar
    receiver.hang_s = 30
    key = (await admin.post("/key/generate", {"max_budget": 1, "soft_budget": 0.000001}))["key"]
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    started = time.monotonic()
    for _ in range(5):
        await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
    await client.close()
    await wait_for(lambda: receiver.calls >= 1)  # the alert is being delivered, slowly
    assert time.monotonic() - started < 3  # while requests went at full speed


async def test_a_lagging_ledger_sink_alerts_once_and_once_more_when_caught_up(
    receiver: Receiver, ns: str, redis_url: str
) -> None:
    """Two sidecars, their sink's PostgreSQL down: one ``ledger_sink_lagging`` event when the
    oldest waiting entry is older than the threshold, one ``ledger_sink_recovered`` once the
    database is up and the backlog shipped, each with Slack's ``text``."""
    from ..postgres import PostgresServer

    database = PostgresServer()  # made, not started: the sink's address refuses connections
    try:
        async with running_upstream() as upstream:
            settings = Settings(
                master_key=MASTER_KEY,
                key_prefix=f"t:{ns}:",
                alert_webhook_url=receiver.url,
                models=(Deployment("m", "openai/m", api_base=upstream),),
                ledger_sink=database.url,
                ledger_sink_schema=f"lag_{ns}",
                collect_interval_s=0.2,
                ledger_sink_lag_alert_s=1.0,
            )
            async with (
                running_sidecar(settings, redis_url) as a,
                running_sidecar(settings, redis_url),
            ):
                client = openai.AsyncOpenAI(base_url=f"{a}/v1", api_key=MASTER_KEY, max_retries=0)
                for _ in range(3):
                    await client.chat.completions.create(model="m", messages=MESSAGES)
                await client.close()

                def events(kind: str) -> list[dict]:
                    return [e for e in receiver.events if e["event"] == kind]

                await wait_for(lambda: events("ledger_sink_lagging"), timeout=20)
                await asyncio.sleep(1.0)  # more rounds of both sidecars: still one event
                (lagging,) = events("ledger_sink_lagging")
                assert lagging["lag_entries"] == 3 and lagging["lag_seconds"] > 1.0
                assert lagging["threshold_seconds"] == 1.0 and lagging["error"]
                assert lagging["text"].startswith("ledger sink behind by ")
                database.start()
                await wait_for(lambda: events("ledger_sink_recovered"), timeout=20)
                await asyncio.sleep(1.0)
                (recovered,) = events("ledger_sink_recovered")
                assert recovered["lag_entries"] == 0 and "caught up" in recovered["text"]
                assert len(events("ledger_sink_lagging")) == 1
    finally:
        database.remove()


async def test_budget_thresholds_alert_once_each_with_a_forecast(
    receiver: Receiver, ns: str, redis_url: str
) -> None:
    """``budget_alert_thresholds: [0.5, 0.8]`` on a key's budget: one event at each, then
    the exhaustion, each once however many requests pass them; Slack's ``text`` says how far
    the budget is spent."""
    async with running_upstream() as upstream:
        settings = alerting(ns, receiver, upstream, thresholds=(0.5, 0.8))
        async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as s:
            admin = Admin(s, base)
            key = (await admin.post("/key/generate", {"max_budget": 0.0001}))["key"]
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            for _ in range(8):  # 18e-6 each: 50 % at the 3rd, 80 % at the 5th, spent at the 6th
                with contextlib.suppress(openai.RateLimitError):
                    await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
            await client.close()
            await wait_for(lambda: len(receiver.events) >= 3)
            await asyncio.sleep(0.5)
    crossed = [e for e in receiver.events if e["event"] == "budget_threshold_crossed"]
    assert sorted(e["threshold"] for e in crossed) == [5e-05, 8e-05]
    assert [e["event"] for e in receiver.events].count("budget_exceeded") == 1
    assert len(receiver.events) == 3
    half = min(crossed, key=lambda e: e["threshold"])
    assert half["spend"] >= 5e-05 and half["spend_share"] >= 0.5
    assert half["text"].startswith("key ") and "passed 50%" in half["text"]
    assert "runs_out_at_ms" in half  # None: a budget that never resets has no forecast


def test_the_forecast_is_the_periods_own_rate() -> None:
    from ratelimiter.gateway.alerts import _runs_out_at

    day = 86_400_000
    # a 30-day period, 10 days in, 40 % spent: at that rate all of it is gone on day 25
    assert _runs_out_at(40, 100, 0, 30 * day, 10 * day) == 25 * day
    assert _runs_out_at(20, 100, 0, 30 * day, 10 * day) is None  # lasts the period
    assert _runs_out_at(100, 100, 0, 30 * day, 10 * day) is None  # already spent
    assert _runs_out_at(0, 100, 0, 30 * day, 10 * day) is None
    assert _runs_out_at(90, 100, 0, 100 * 365 * day, 10 * day) is None  # never resets


async def test_tag_and_end_user_budgets_alert_at_their_thresholds(
    receiver: Receiver, ns: str, redis_url: str
) -> None:
    """Thresholds hold for every scope with a budget: a tag's (from ``x-litellm-tags``) and an
    end user's (the body's ``user``) alert at 50 % and when exhausted, each once, with a
    forecast over their own daily period."""
    async with running_upstream() as upstream:
        settings = alerting(ns, receiver, upstream, thresholds=(0.5,))
        async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as s:
            admin = Admin(s, base)
            await admin.post(
                "/tag/new", {"name": "eng", "max_budget": 0.0001, "budget_duration": "1d"}
            )
            await admin.post(
                "/customer/new", {"user_id": "ann", "max_budget": 0.0001, "budget_duration": "1d"}
            )
            key = (await admin.post("/key/generate", {}))["key"]
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            sent_ms = int(time.time() * 1000) - 1000
            # apart, so that each budget is the one that refuses: 18e-6 a request, 50 % at
            # the 3rd, spent at the 6th
            for extra in ({"user": "ann"}, {"extra_headers": {"x-litellm-tags": "eng"}}):
                for _ in range(8):
                    with contextlib.suppress(openai.RateLimitError):
                        await client.chat.completions.create(
                            model="m", messages=MESSAGES, max_tokens=4, **extra
                        )
                    # A request is settled, and its budgets checked for alerts, after its
                    # answer; a read waits for that, so each threshold is seen as crossed when
                    # it is, with a forecast, not once a later request has spent it all.
                    await admin.get("/key/info", key=key)
            await client.close()
            await wait_for(lambda: len(receiver.events) >= 4)
            answered_ms = int(time.time() * 1000) + 1000
            await asyncio.sleep(0.5)
    by_scope = {(e["scope"], e["id"], e["event"]): e for e in receiver.events}
    assert sorted(by_scope) == [
        ("end_user", "ann", "budget_exceeded"),
        ("end_user", "ann", "budget_threshold_crossed"),
        ("tag", "eng", "budget_exceeded"),
        ("tag", "eng", "budget_threshold_crossed"),
    ]
    assert len(receiver.events) == 4
    tag_half = by_scope["tag", "eng", "budget_threshold_crossed"]
    assert tag_half["text"].startswith("tag eng: ") and "passed 50%" in tag_half["text"]
    assert tag_half["budget_duration"] == "1d"
    # The forecast: when the budget runs out at the period's rate so far, if before the period
    # ends. The period is the UTC day, so whether it runs out depends on the hour of the run.
    start, end = tag_half["period_start_ms"], tag_half["period_end_ms"]
    used, capacity = round(tag_half["spend"] * 1e9), round(tag_half["max_budget"] * 1e9)
    earliest, latest = (start + capacity * (t - start) // used for t in (sent_ms, answered_ms))
    if latest < end:
        assert earliest <= tag_half["runs_out_at_ms"] <= latest
        assert "runs out on" in tag_half["text"]
    elif earliest >= end:
        assert tag_half["runs_out_at_ms"] is None
