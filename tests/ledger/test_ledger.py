"""The spend ledger: one entry per finished request, written with the settlement; rollups;
spend routes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from datetime import UTC, datetime

import openai
import pytest

from ratelimiter.ledger import Ledger, day_number

from ..conftest import MESSAGES, Stack


async def test_every_request_has_exactly_one_entry(stack: Stack) -> None:
    key = await stack.key(key_alias="ci", max_budget=1)
    client = stack.client(key)
    ok = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=4, user="alice"
    )
    stack.fake.error_rate = 1.0
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stack.fake.error_rate = 0.0
    logs = await stack.admin.get("/spend/logs", api_key=key)
    assert isinstance(logs, list) and len(logs) == 2  # LiteLLM's shape: a list of rows
    failed, success = logs  # newest first
    token = hashlib.sha256(key.encode()).hexdigest()
    assert success["sidecar_request_id"] == ok.headers["x-request-id"]
    assert success["request_id"] == ok.parse().id  # the upstream's chatcmpl-… id
    assert (success["status"], success["api_key"], success["key_alias"]) == ("success", token, "ci")
    assert (success["end_user"], success["model"], success["deployment"]) == (
        "alice",
        "gpt-4o",
        "gpt-4o#0",
    )
    assert (success["prompt_tokens"], success["completion_tokens"], success["total_tokens"]) == (
        10,
        4,
        14,
    )
    assert success["spend"] == pytest.approx(10e-6 + 4 * 2e-6)
    # estimated: 10 tokens of content + 1 of role + 3 per message + 3 for the reply
    assert success["estimated_spend"] == pytest.approx(17e-6 + 4 * 2e-6)
    assert (failed["status"], failed["spend"]) == ("failure", 0.0)
    (by_request,) = await stack.admin.get("/spend/logs", request_id=success["request_id"])
    assert by_request == success
    (by_ours,) = await stack.admin.get("/spend/logs", request_id=ok.headers["x-request-id"])
    assert by_ours == success
    assert failed["request_id"] == failed["sidecar_request_id"]  # no answer, no upstream id
    assert await stack.admin.get("/spend/logs", end_user="bob") == []


async def test_ledger_agrees_with_the_counters_under_concurrency(stack: Stack) -> None:
    key = await stack.key(max_budget=1)
    client = stack.client(key)
    stack.fake.error_rate = 0.3

    async def one(i: int) -> None:
        with contextlib.suppress(openai.APIStatusError):
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=1 + i % 7, stream=i % 2 == 0
            )

    await asyncio.gather(*(one(i) for i in range(60)))
    stack.fake.error_rate = 0.0
    token = hashlib.sha256(key.encode()).hexdigest()
    ledger = Ledger(stack.engine)
    today = datetime.now(UTC)
    now_ms = int(today.timestamp() * 1000)
    entries = [
        e
        async for e in ledger.entries(now_ms - 3_600_000, now_ms + 60_000)
        if e.meta.get("key_hash") == token
    ]
    assert len(entries) == 60 and len({e.request_id for e in entries}) == 60
    spent = sum(e.charged.get("spend", 0) for e in entries)
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["spend"] == pytest.approx(spent / 1e9, abs=1e-12)
    rollup = (await ledger.rollup(day_number(now_ms)))[f"key:{token}"]
    assert rollup["requests"] == 60 and rollup["spend"] == spent
    assert rollup.get("released", 0) == sum(e.status == "released" for e in entries)


async def test_global_spend_and_report(stack: Stack) -> None:
    key = await stack.key()
    await stack.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    total = (await stack.admin.get("/global/spend"))["spend"]
    assert total >= 18e-6
    report = await stack.admin.get("/global/spend/report", group_by="team")
    today = datetime.now(UTC).date().isoformat()
    (day,) = [d for d in report if d["group_by_day"] == today]
    (team,) = [t for t in day["teams"] if t["team_name"] == "Unassigned Team"]
    token = hashlib.sha256(key.encode()).hexdigest()
    (usage,) = [m for m in team["metadata"] if m["api_key"] == token]
    assert usage["model"] == "gpt-4o" and usage["spend"] >= 18e-6 and usage["total_tokens"] > 0
    status, body = await stack.admin.call("GET", "/global/spend/report", group_by="planet")
    assert status == 400 and "group_by must be one of" in body["error"]["message"]


async def test_the_master_key_is_recorded_too(stack: Stack) -> None:
    client = stack.client(stack.settings.master_key)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    logs = await stack.admin.get("/spend/logs", model="gpt-4o")
    assert any(row["api_key"] is None and row["status"] == "success" for row in logs)
