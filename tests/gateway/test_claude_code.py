"""Claude Code itself through the sidecar (issue 18): the real CLI from npm
(``@anthropic-ai/claude-code``), pointed at the sidecar the way Anthropic's gateway guide and
LiteLLM's Claude Code tutorial say (``ANTHROPIC_BASE_URL``, a virtual key as
``ANTHROPIC_AUTH_TOKEN`` or ``ANTHROPIC_API_KEY``, the customer in ``ANTHROPIC_CUSTOM_HEADERS``),
with the fake Anthropic upstream behind it. Claude Code prices its own calls; the sidecar must
charge exactly that, and a spent budget must stop it at once instead of retrying."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratelimiter import Engine
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.reconcile import check
from ratelimiter.testing.fake_upstream import FakeUpstream

from ..conftest import MASTER_KEY, Admin, running_sidecar, running_upstream

CLAUDE = os.environ.get("CLAUDE_CODE_BIN") or shutil.which("claude")
pytestmark = pytest.mark.skipif(
    CLAUDE is None, reason="Claude Code is not installed (npm install -g @anthropic-ai/claude-code)"
)

# A model Claude Code knows the price of (Sonnet 4.5's, as genai-prices has it), so its own
# figure of what it spent can be set against the sidecar's.
MODEL = "claude-sonnet-4-5"
ANSWER_WORDS = 6
RUN_TIMEOUT_S = 180


@dataclass
class Gateway:
    base: str
    admin: Admin
    fake: FakeUpstream
    engine: Engine
    settings: Settings


@pytest.fixture
async def gateway(ns: str, redis_url: str) -> AsyncIterator[Gateway]:
    fake = FakeUpstream(seed=7, answer_words=ANSWER_WORDS)
    async with running_upstream(fake) as upstream:
        deployment = Deployment(MODEL, f"anthropic/{MODEL}", api_base=upstream, api_key="sk-ant-up")
        settings = Settings(master_key=MASTER_KEY, key_prefix=f"t:{ns}:", models=(deployment,))
        async with (
            running_sidecar(settings, redis_url) as base,
            aiohttp.ClientSession() as session,
            await Engine.connect(redis_url, prefix=settings.key_prefix) as engine,
        ):
            yield Gateway(base, Admin(session, base), fake, engine, settings)


async def claude_code(
    base: str, key: str, home: Path, *, bearer: bool, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """``claude -p`` in print mode with JSON output, as a script or CI job runs it; its
    home is private and it sends nothing but model calls."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base,
        "ANTHROPIC_MODEL": MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        ("ANTHROPIC_AUTH_TOKEN" if bearer else "ANTHROPIC_API_KEY"): key,
    }
    if headers:
        env["ANTHROPIC_CUSTOM_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in headers.items())
    assert CLAUDE is not None
    process = await asyncio.create_subprocess_exec(
        CLAUDE, "-p", "say hi", "--output-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=home,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert lines, f"Claude Code printed no result (exit {process.returncode}): {err.decode()}"
    return json.loads(lines[-1])


async def messages_served(gateway: Gateway, status: int) -> float:
    async with gateway.admin.session.get(gateway.base + "/metrics") as response:
        text = await response.text()
    pattern = rf'ratelimiter_requests_total\{{route="/v1/messages",status="{status}"\}} (\S+)'
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


async def test_claude_code_answers_and_is_charged_what_it_counts_itself(
    gateway: Gateway, tmp_path: Path
) -> None:
    key = (await gateway.admin.post("/key/generate", {"max_budget": 5, "rpm_limit": 30}))["key"]
    result = await claude_code(
        gateway.base, key, tmp_path, bearer=True, headers={"x-litellm-customer-id": "alice"}
    )
    assert result["is_error"] is False, result
    assert result["result"] == " ".join(["lorem"] * ANSWER_WORDS)
    spent = result["total_cost_usd"]
    assert spent > 0
    info = await gateway.admin.get("/key/info", key=key)
    assert info["info"]["spend"] == pytest.approx(spent, rel=1e-9, abs=1e-12)
    customer = await gateway.admin.get("/customer/info", end_user_id="alice")
    assert customer["spend"] == pytest.approx(spent, rel=1e-9, abs=1e-12)
    assert await messages_served(gateway, 200) == gateway.fake.requests >= 1
    assert await check(gateway.engine, gateway.settings) == []


async def test_a_spent_budget_stops_claude_code_without_retries(
    gateway: Gateway, tmp_path: Path
) -> None:
    """Claude Code asks for 32,000 output tokens a call; a key that cannot afford one is
    refused with LiteLLM's words and ``x-should-retry: false``, so it gives up at once (its
    SDK would otherwise retry a 429 several times, honouring any retry-after)."""
    key = (await gateway.admin.post("/key/generate", {"max_budget": 0.01}))["key"]
    result = await claude_code(gateway.base, key, tmp_path, bearer=False)
    assert result["is_error"] is True, result
    assert "Budget has been exceeded" in result["result"], result
    assert gateway.fake.requests == 0
    assert await messages_served(gateway, 429) == 1
    info = await gateway.admin.get("/key/info", key=key)
    assert info["info"]["spend"] == 0
