"""`ratelimiter ledger export` and `ledger check`, run as users run them."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest

from ratelimiter.engine.durations import parse_duration, period_bounds
from ratelimiter.ledger import Ledger
from ratelimiter.ledger.export import CSV_FIELDS, read_export

from ..conftest import MESSAGES, Stack


def ledger_cli(
    tmp_path: Path, redis_url: str, prefix: str, *args: str
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(f"ratelimiter_settings:\n  key_prefix: '{prefix}'\n")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ratelimiter.cli",
            "--log-format",
            "text",
            "ledger",
            *args,
            "--config",
            str(config),
        ],
        env={**os.environ, "REDIS_URL": redis_url, "RATELIMITER_MASTER_KEY": "sk-ledger-cli-4f1a9"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def traffic(stack: Stack, key: str) -> None:
    client = stack.client(key)
    for i in range(5):
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=i + 1, user=f"u{i % 2}"
        )
    stack.fake.error_rate = 1.0
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stack.fake.error_rate = 0.0


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_export_round_trips_every_field_and_trims_only_when_acknowledged(
    stack: Stack,
    tmp_path: Path,
    redis_url: str,
    fmt: str,
) -> None:
    await traffic(stack, await stack.key(max_budget=1))
    today = datetime.now(UTC).date().isoformat()
    now = int(datetime.now(UTC).timestamp() * 1000)
    stored = [e async for e in Ledger(stack.engine).entries(now - 3_600_000, now + 60_000)]
    assert len(stored) == 6
    out = tmp_path / f"export.{fmt}"
    args = ("export", "--since", today, "--format", fmt, "--out", str(out))
    result = await asyncio.to_thread(
        ledger_cli, tmp_path, redis_url, stack.settings.key_prefix, *args
    )
    assert result.returncode == 0, result.stderr
    assert "exported 6 entries" in result.stderr
    assert read_export(out.read_text(), fmt) == stored  # every field, exactly
    again = [e async for e in Ledger(stack.engine).entries(now - 3_600_000, now + 60_000)]
    assert again == stored  # not acknowledged: nothing trimmed
    result = await asyncio.to_thread(
        ledger_cli, tmp_path, redis_url, stack.settings.key_prefix, *args, "--ack"
    )
    assert result.returncode == 0, result.stderr
    assert [e async for e in Ledger(stack.engine).entries(now - 3_600_000, now + 60_000)] == []
    assert len(read_export(out.read_text(), fmt)) == 6


async def test_csv_has_a_column_per_field_and_money_in_dollars(
    stack: Stack, tmp_path: Path, redis_url: str
) -> None:
    key = await stack.key(max_budget=1, key_alias="finance")
    await stack.client(key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=4, user="cust-9"
    )
    out = tmp_path / "export.csv"
    today = datetime.now(UTC).date().isoformat()
    args = ("export", "--since", today, "--format", "csv", "--out", str(out))
    result = await asyncio.to_thread(
        ledger_cli, tmp_path, redis_url, stack.settings.key_prefix, *args
    )
    assert result.returncode == 0, result.stderr
    (row,) = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(row) == list(CSV_FIELDS)
    assert (row["key_alias"], row["end_user"], row["model"]) == ("finance", "cust-9", "gpt-4o")
    assert (row["prompt_tokens"], row["completion_tokens"], row["tokens"]) == ("10", "4", "14")
    assert row["spend"] == "0.000018000"  # 10 x $1e-6 + 4 x $2e-6, exactly
    assert row["status"] == "settled" and row["started"].endswith("+00:00")
    assert row["extra"] == ""  # nothing left over: no JSON in a spreadsheet


async def test_check_finds_no_difference_then_the_one_planted(
    stack: Stack,
    tmp_path: Path,
    redis_url: str,
) -> None:
    key = await stack.key(max_budget=1, budget_duration="monthly")
    await traffic(stack, key)
    prefix = stack.settings.key_prefix
    result = await asyncio.to_thread(ledger_cli, tmp_path, redis_url, prefix, "check")
    assert (result.returncode, result.stdout.strip()) == (0, "ledger and counters agree")
    token = hashlib.sha256(key.encode()).hexdigest()
    start, _ = period_bounds(parse_duration("1mo"), await stack.engine.now_ms(), stack.engine.tz)
    await stack.engine.redis.hincrby(f"{prefix}{{key:{token}}}:spend:1mo:{start}", "u", 5)
    result = await asyncio.to_thread(ledger_cli, tmp_path, redis_url, prefix, "check")
    assert result.returncode == 1
    assert f"key:budget key:{token}" in result.stdout and "1 difference(s)" in result.stdout


def test_ack_is_refused_while_a_sink_ships(tmp_path: Path, redis_url: str, ns: str) -> None:
    """With a sink, entries leave Redis once PostgreSQL has them; --ack would trim those it
    has not shipped yet, so it is refused, and nothing is trimmed."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"ratelimiter_settings:\n  key_prefix: 't:{ns}:'\n"
        "  ledger_sink: postgresql://rl@127.0.0.1:9/ledger\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "ratelimiter.cli", "ledger", "export", "--since", "2020-01-01",
         "--ack", "--config", str(config)],
        env={**os.environ, "REDIS_URL": redis_url, "RATELIMITER_MASTER_KEY": "sk-ledger-cli-4f1a9"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "--ack with a ledger sink configured would trim entries" in done.stderr
    assert "Traceback" not in done.stderr
