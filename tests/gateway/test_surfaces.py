"""Anthropic's Messages and OpenAI's Responses through the one request path, driven by the
official ``anthropic`` and ``openai`` SDKs over real HTTP, real Redis and the fake upstream
(issue 18): usage with cache reads and writes and reasoning tokens, charged at genai-prices'
or the config's cache-aware prices; streams, a client leaving mid-stream, upstream errors,
refusals in each API's own envelope and headers; the ledger equal to the counters."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from ratelimiter import Engine
from ratelimiter.gateway import policy
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.reconcile import check
from ratelimiter.testing.fake_upstream import FakeUpstream

from ..conftest import MASTER_KEY, Admin, running_sidecar, running_upstream

SYSTEM = "s" * 400  # 100 tokens
ASK = [{"role": "user", "content": "x" * 40}]  # 10 tokens
# genai-prices' Claude Sonnet 4.5 (dollars per token)
SONNET = {"input": 3e-6, "output": 15e-6, "read": 0.3e-6, "write": 3.75e-6, "write_1h": 6e-6}


@dataclass
class Surfaces:
    base: str
    admin: Admin
    fake: FakeUpstream
    engine: Engine
    settings: Settings
    closers: list

    def claude(self, key: str, retries: int = 0, bearer: bool = False) -> anthropic.AsyncAnthropic:
        auth = {"auth_token": key} if bearer else {"api_key": key}
        client = anthropic.AsyncAnthropic(base_url=self.base, max_retries=retries, **auth)
        self.closers.append(client)
        return client

    def openai(self, key: str, retries: int = 0) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=retries)
        self.closers.append(client)
        return client

    async def key(self, **fields: object) -> str:
        return (await self.admin.post("/key/generate", fields))["key"]

    async def spend(self, key: str) -> float:
        return (await self.admin.get("/key/info", key=key))["info"]["spend"]

    async def balanced(self) -> None:
        assert await check(self.engine, self.settings) == []


@pytest.fixture
async def surfaces(ns: str, redis_url: str) -> AsyncIterator[Surfaces]:
    fake = FakeUpstream(seed=3)
    async with running_upstream(fake) as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            default_max_tokens=16,
            upstream_timeout_s=2,
            models=(
                Deployment(
                    "claude", "anthropic/claude-sonnet-4-5", api_base=upstream, api_key="sk-ant-up"
                ),
                Deployment(
                    "claude-own",
                    "anthropic/claude-haiku-4-5",
                    api_base=upstream,
                    input_cost_per_token=1e-6,
                    output_cost_per_token=2e-6,
                    cache_read_input_token_cost=0.1e-6,
                    cache_creation_input_token_cost=1.25e-6,
                    index=1,
                ),
                Deployment("gpt", "openai/gpt-4o", api_base=upstream, api_key="sk-up", index=2),
                Deployment("o3-mini", "openai/o3-mini", api_base=upstream, index=3),
            ),
        )
        async with (
            running_sidecar(settings, redis_url) as base,
            aiohttp.ClientSession() as session,
            await Engine.connect(redis_url, prefix=settings.key_prefix) as engine,
        ):
            stack = Surfaces(base, Admin(session, base), fake, engine, settings, [])
            yield stack
            for client in stack.closers:
                await client.close()


def sonnet(usage: dict[str, int]) -> float:
    return (
        usage.get("input", 0) * SONNET["input"]
        + usage.get("output", 0) * SONNET["output"]
        + usage.get("read", 0) * SONNET["read"]
        + usage.get("write", 0) * SONNET["write"]
        + usage.get("write_1h", 0) * SONNET["write_1h"]
    )


# -- Anthropic Messages ------------------------------------------------------------------


async def test_messages_with_the_anthropic_sdk_charge_cache_writes_and_reads(
    surfaces: Surfaces,
) -> None:
    key = await surfaces.key(max_budget=1)
    client = surfaces.claude(key)
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    raw = await client.messages.with_raw_response.create(
        model="claude", max_tokens=5, system=system, messages=ASK
    )
    first = await raw.parse()
    assert first.content[0].text == "lorem lorem lorem lorem lorem"
    assert first.usage.cache_creation_input_tokens == 100
    assert first.usage.input_tokens == 10
    # Anthropic's own headers, RFC 3339 resets; our id
    assert raw.headers["request-id"].startswith("req-")
    # the upstream got its own key as x-api-key, and the client's anthropic-version
    sent = surfaces.fake.last_headers or {}
    assert sent["x-api-key"] == "sk-ant-up" and sent["anthropic-version"]
    assert key not in str(sent)
    spent = sonnet({"input": 10, "write": 100, "output": 5})
    assert await surfaces.spend(key) == pytest.approx(spent)
    second = await client.messages.create(model="claude", max_tokens=5, system=system, messages=ASK)
    assert second.usage.cache_read_input_tokens == 100
    spent += sonnet({"input": 10, "read": 100, "output": 5})
    assert await surfaces.spend(key) == pytest.approx(spent)
    await surfaces.balanced()


async def test_a_one_hour_cache_write_and_config_prices(surfaces: Surfaces) -> None:
    key = await surfaces.key(max_budget=10)
    client = surfaces.claude(key)
    block = {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    await client.messages.create(model="claude", max_tokens=1, system=[block], messages=ASK)
    assert await surfaces.spend(key) == pytest.approx(
        sonnet({"input": 10, "write_1h": 100, "output": 1})
    )
    own = await surfaces.key(max_budget=10)
    other = surfaces.claude(own)
    marked = [{**block, "text": "t" * 400, "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):
        await other.messages.create(model="claude-own", max_tokens=2, system=marked, messages=ASK)
    # config prices: write 1.25e-6, then read 0.1e-6; input 1e-6, output 2e-6
    expected = (10 * 1e-6 + 100 * 1.25e-6 + 2 * 2e-6) + (10 * 1e-6 + 100 * 0.1e-6 + 2 * 2e-6)
    assert await surfaces.spend(own) == pytest.approx(expected)


async def test_streamed_messages_are_charged_from_anthropics_events(surfaces: Surfaces) -> None:
    key = await surfaces.key(rpm_limit=10, tpm_limit=100_000, max_budget=10)
    client = surfaces.claude(key, bearer=True)  # Claude Code's ANTHROPIC_AUTH_TOKEN
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    async with client.messages.stream(
        model="claude", max_tokens=7, system=system, messages=ASK
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == " ".join(["lorem"] * 7)
    assert final.usage.output_tokens == 7 and final.usage.cache_creation_input_tokens == 100
    assert await surfaces.spend(key) == pytest.approx(
        sonnet({"input": 10, "write": 100, "output": 7})
    )
    # headers before the first streamed byte, in Anthropic's family
    async with surfaces.admin.session.post(
        f"{surfaces.base}/anthropic/v1/messages",
        json={"model": "claude", "max_tokens": 3, "messages": ASK, "stream": True},
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
    ) as response:
        assert response.status == 200
        assert response.headers["anthropic-ratelimit-requests-limit"] == "10"
        assert int(response.headers["anthropic-ratelimit-requests-remaining"]) == 8
        assert response.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
        assert "x-ratelimit-limit-requests" not in response.headers
        body = await response.text()
    assert "event: message_stop" in body
    await surfaces.balanced()


async def test_a_client_leaving_a_messages_stream_pays_what_was_streamed(
    surfaces: Surfaces,
) -> None:
    key = await surfaces.key(max_parallel_requests=1, max_budget=1)
    surfaces.fake.chunk_delay_ms = 50
    async with surfaces.admin.session.post(
        f"{surfaces.base}/v1/messages",
        json={"model": "claude", "max_tokens": 400, "messages": ASK, "stream": True},
        headers={"x-api-key": key},
    ) as response:
        assert response.status == 200
        seen = b""
        while b"content_block_delta" not in seen:
            seen += await response.content.readline()
    client = surfaces.claude(key)
    for _ in range(100):  # the lease comes back once the sidecar notices
        try:
            await client.messages.create(model="claude", max_tokens=1, messages=ASK)
            break
        except anthropic.RateLimitError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the lease of the abandoned stream was not freed")
    for _ in range(40):
        if surfaces.fake.cancelled:
            break
        await asyncio.sleep(0.05)
    assert surfaces.fake.cancelled == 1
    # input from message_start, output at least what was streamed, far below the 400 held
    left = await surfaces.spend(key) - sonnet({"input": 10, "output": 1})
    assert sonnet({"input": 10, "output": 1}) <= left < sonnet({"input": 10, "output": 60})
    await surfaces.balanced()


async def test_messages_refusals_are_anthropic_errors(surfaces: Surfaces) -> None:
    key = await surfaces.key(rpm_limit=1)
    client = surfaces.claude(key)
    await client.messages.create(model="claude", max_tokens=1, messages=ASK)
    with pytest.raises(anthropic.RateLimitError) as raised:
        await client.messages.create(model="claude", max_tokens=1, messages=ASK)
    body = raised.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("Rate limit exceeded for api_key")
    headers = raised.value.response.headers
    assert 0 < int(headers["retry-after"]) <= 61
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    # a spent budget: x-should-retry false, so the SDK does not retry it (max_retries=3)
    poor = await surfaces.key(max_budget=0.000001)
    retrying = surfaces.claude(poor, retries=3)
    before = surfaces.fake.requests
    started = time.monotonic()
    with pytest.raises(anthropic.RateLimitError) as budget:
        await retrying.messages.create(model="claude", max_tokens=100, messages=ASK)
    assert time.monotonic() - started < 1
    assert budget.value.response.headers["x-should-retry"] == "false"
    assert budget.value.body["error"]["message"].startswith("Budget has been exceeded!")
    assert surfaces.fake.requests == before
    assert await surfaces.spend(poor) == 0  # refused requests consume nothing
    # errors before admission are Anthropic's too
    with pytest.raises(anthropic.AuthenticationError) as bad:
        await surfaces.claude("sk-nope").messages.create(model="claude", max_tokens=1, messages=ASK)
    assert bad.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError) as missing:
        await client.messages.create(model="gpt", max_tokens=1, messages=ASK)
    assert "OpenAI-format upstream" in missing.value.body["error"]["message"]
    await surfaces.balanced()


class Seen:
    """The statuses an SDK's HTTP client got, every retry included."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.waits: list[float] = []  # retry-after-ms of each refusal, in seconds

    async def __call__(self, response: Any) -> None:  # the SDK's own httpx response
        self.statuses.append(response.status_code)
        if "retry-after-ms" in response.headers:
            self.waits.append(int(response.headers["retry-after-ms"]) / 1000)


@pytest.fixture
def short_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """rpm/tpm windows of 2 s, so a refusal's retry-after is about a second."""
    monkeypatch.setattr(policy, "RATE_WINDOW", "2s")


@pytest.mark.usefixtures("short_windows")
async def test_the_anthropic_sdk_honours_retry_after_and_not_a_spent_budget(
    surfaces: Surfaces,
) -> None:
    key = await surfaces.key(rpm_limit=1)
    await surfaces.claude(key).messages.create(model="claude", max_tokens=1, messages=ASK)
    seen = Seen()
    http = anthropic.DefaultAsyncHttpxClient(event_hooks={"response": [seen]})
    client = anthropic.AsyncAnthropic(
        base_url=surfaces.base, api_key=key, max_retries=3, http_client=http
    )
    surfaces.closers.append(client)
    before = surfaces.fake.requests
    started = time.monotonic()
    answer = await client.messages.create(model="claude", max_tokens=1, messages=ASK)
    took = time.monotonic() - started
    assert answer.usage.output_tokens == 1
    # refused, waited what retry-after said (about a second), then admitted: never early,
    # since coming back before the window has room would be refused again
    assert seen.statuses[0] == 429 and seen.statuses[-1] == 200
    assert 0 < seen.waits[0] <= 2.1  # the 2 s window and at most one bucket more
    assert took >= seen.waits[0] * 0.9
    assert len(seen.statuses) <= 3
    assert surfaces.fake.requests == before + 1
    # a spent budget says x-should-retry: false, so the SDK does not retry it
    poor = await surfaces.key(max_budget=0.000001)
    seen = Seen()
    http = anthropic.DefaultAsyncHttpxClient(event_hooks={"response": [seen]})
    client = anthropic.AsyncAnthropic(
        base_url=surfaces.base, api_key=poor, max_retries=3, http_client=http
    )
    surfaces.closers.append(client)
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.create(model="claude", max_tokens=100, messages=ASK)
    assert seen.statuses == [429]
    await surfaces.balanced()


@pytest.mark.usefixtures("short_windows")
async def test_the_openai_sdk_honours_retry_after_on_responses(surfaces: Surfaces) -> None:
    key = await surfaces.key(rpm_limit=1)
    await surfaces.openai(key).responses.create(model="gpt", input="x", max_output_tokens=1)
    seen = Seen()
    http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [seen]})
    client = openai.AsyncOpenAI(
        base_url=f"{surfaces.base}/v1", api_key=key, max_retries=3, http_client=http
    )
    surfaces.closers.append(client)
    started = time.monotonic()
    answer = await client.responses.create(model="gpt", input="x", max_output_tokens=1)
    took = time.monotonic() - started
    assert answer.usage.output_tokens == 1
    assert seen.statuses[0] == 429 and seen.statuses[-1] == 200
    assert 0 < seen.waits[0] <= 2.1 and took >= seen.waits[0] * 0.9
    poor = await surfaces.key(max_budget=0.000001)
    seen = Seen()
    http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [seen]})
    client = openai.AsyncOpenAI(
        base_url=f"{surfaces.base}/v1", api_key=poor, max_retries=3, http_client=http
    )
    surfaces.closers.append(client)
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="gpt", input="x", max_output_tokens=100)
    assert seen.statuses == [429]
    await surfaces.balanced()


async def test_messages_upstream_error_releases_and_count_tokens(surfaces: Surfaces) -> None:
    key = await surfaces.key(max_budget=1)
    client = surfaces.claude(key)
    surfaces.fake.error_rate = 1.0
    with pytest.raises(anthropic.InternalServerError) as failed:
        await client.messages.create(model="claude", max_tokens=3, messages=ASK)
    assert failed.value.body["type"] == "error"
    surfaces.fake.error_rate = 0.0
    assert await surfaces.spend(key) == 0
    counted = await client.messages.count_tokens(model="claude", messages=ASK, system=SYSTEM)
    assert counted.input_tokens == 110  # the upstream's own count, passed through
    assert await surfaces.spend(key) == 0  # counting is free
    async with surfaces.admin.session.post(
        f"{surfaces.base}/v1/messages/count_tokens",
        json={"model": "gpt", "messages": ASK},
        headers={"x-api-key": key},
    ) as response:
        assert response.status == 501
        payload = await response.json()
    assert payload["type"] == "error"
    assert "no token-counting endpoint" in payload["error"]["message"]
    await surfaces.balanced()


async def test_count_tokens_takes_a_request_and_nothing_else(surfaces: Surfaces) -> None:
    """Anthropic bills no tokens for counting but limits its requests: here a count takes a
    place in the caller's request windows and parallel limits, and nothing of its token
    windows or budgets; its ledger entry is $0."""
    key = await surfaces.key(rpm_limit=2, tpm_limit=50, max_budget=0.000001)
    client = surfaces.claude(key)
    raw = await client.messages.with_raw_response.count_tokens(
        model="claude", messages=ASK, system=SYSTEM
    )
    assert (await raw.parse()).input_tokens == 110  # more than the tpm_limit: not held
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert "anthropic-ratelimit-tokens-remaining" not in raw.headers  # not met at all
    await client.messages.count_tokens(model="claude", messages=ASK)
    with pytest.raises(anthropic.RateLimitError) as raised:
        await client.messages.count_tokens(model="claude", messages=ASK)
    assert raised.value.body["error"]["message"].startswith("Rate limit exceeded for api_key")
    assert int(raised.value.response.headers["retry-after"]) > 0
    assert await surfaces.spend(key) == 0
    # blocked keys are refused a count too
    blocked = await surfaces.key()
    await surfaces.admin.post("/key/block", {"key": blocked})
    with pytest.raises(anthropic.PermissionDeniedError):
        await surfaces.claude(blocked).messages.count_tokens(model="claude", messages=ASK)
    logs = await surfaces.admin.get("/spend/logs", api_key=key)
    assert [entry["call_type"] for entry in logs] == ["count_tokens"] * 2
    await surfaces.balanced()


# -- OpenAI Responses ---------------------------------------------------------------------


async def test_responses_create_stream_retrieve_delete(surfaces: Surfaces) -> None:
    key = await surfaces.key(max_budget=1)
    client = surfaces.openai(key)
    created = await client.responses.create(model="gpt", input="x" * 40, max_output_tokens=4)
    assert created.output_text == "lorem lorem lorem lorem"
    assert created.usage.input_tokens == 10
    # gpt-4o from genai-prices: $2.5/M input, $1.25/M cached, $10/M output
    spent = 10 * 2.5e-6 + 4 * 10e-6
    assert await surfaces.spend(key) == pytest.approx(spent)
    again = await client.responses.create(model="gpt", input="x" * 40, max_output_tokens=4)
    assert again.usage.input_tokens_details.cached_tokens == 9
    spent += 1 * 2.5e-6 + 9 * 1.25e-6 + 4 * 10e-6
    assert await surfaces.spend(key) == pytest.approx(spent)
    stream = await client.responses.create(
        model="gpt", input="y" * 40, max_output_tokens=3, stream=True
    )
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    spent += 10 * 2.5e-6 + 3 * 10e-6
    assert await surfaces.spend(key) == pytest.approx(spent)
    fetched = await client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    items = await client.responses.input_items.list(created.id)
    assert items.data
    # another key cannot reach it
    with pytest.raises(openai.NotFoundError):
        await surfaces.openai(await surfaces.key()).responses.retrieve(created.id)
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    streamed_id = events[0].response.id
    assert (await client.responses.retrieve(streamed_id)).status == "completed"
    await surfaces.balanced()


async def test_responses_reasoning_tokens_and_refusals(surfaces: Surfaces) -> None:
    key = await surfaces.key(rpm_limit=1, max_budget=10)
    client = surfaces.openai(key)
    answer = await client.responses.create(
        model="o3-mini", input="x" * 40, max_output_tokens=12, reasoning={"effort": "low"}
    )
    assert answer.usage.output_tokens_details.reasoning_tokens == 8
    # o3-mini: $1.1/M input, $4.4/M output, reasoning billed as output
    assert await surfaces.spend(key) == pytest.approx(10 * 1.1e-6 + 12 * 4.4e-6)
    with pytest.raises(openai.RateLimitError) as raised:
        await client.responses.create(model="o3-mini", input="x", max_output_tokens=2)
    assert raised.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.BadRequestError, match="background"):
        await surfaces.openai(await surfaces.key()).responses.create(
            model="gpt", input="x", background=True
        )
    with pytest.raises(openai.BadRequestError, match="Anthropic-format"):
        await surfaces.openai(await surfaces.key()).responses.create(model="claude", input="x")
    await surfaces.balanced()


async def test_a_continued_response_holds_the_turns_it_carries(surfaces: Surfaces) -> None:
    """previous_response_id: the upstream bills the earlier turns again as input, so the
    estimate holds them too (the stored response's recorded input and output)."""
    key = await surfaces.key(tpm_limit=1000, max_budget=1)
    client = surfaces.openai(key)
    first = await client.responses.create(model="gpt", input="x" * 40, max_output_tokens=4)
    assert first.usage.total_tokens == 14
    raw = await client.responses.with_raw_response.create(
        model="gpt", input="y" * 40, max_output_tokens=4, previous_response_id=first.id
    )
    second = raw.parse()
    # held: 14 carried + 10 of new input + 4 of output, next to the 14 the first took
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 14 - (14 + 10 + 4))
    # a third turn carries the second's whole input and output
    raw = await client.responses.with_raw_response.create(
        model="gpt", input="z" * 40, max_output_tokens=4, previous_response_id=second.id
    )
    carried = second.usage.input_tokens + second.usage.output_tokens
    used = 14 + second.usage.total_tokens
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - used - (carried + 14))
    # a response this key did not make through us has no known size: refused, not guessed
    other = surfaces.openai(await surfaces.key())
    for unknown in (first.id, "resp_made_elsewhere"):
        with pytest.raises(openai.BadRequestError, match="previous_response_id") as refused:
            await other.responses.create(
                model="gpt", input="x", max_output_tokens=1, previous_response_id=unknown
            )
        assert refused.value.body["param"] == "previous_response_id"
    await surfaces.balanced()


async def test_a_responses_upstream_error_releases_its_hold(surfaces: Surfaces) -> None:
    """An upstream error on /v1/responses: the SDK's own error type, the hold and the lease
    released, nothing charged; an error that reports usage is charged that usage, no more."""
    key = await surfaces.key(max_parallel_requests=1, tpm_limit=1000, max_budget=1)
    client = surfaces.openai(key)
    surfaces.fake.error_rate = 1.0
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as failed:
            await client.responses.create(
                model="gpt", input="x" * 40, max_output_tokens=400, stream=stream
            )
        assert "failed on purpose" in failed.value.message
    assert await surfaces.spend(key) == 0
    # it reported what it used before it failed: that is charged, not the 400 held
    surfaces.fake.error_usage = {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model="gpt", input="x" * 40, max_output_tokens=400)
    assert await surfaces.spend(key) == pytest.approx(10 * 2.5e-6 + 2 * 10e-6)
    surfaces.fake.error_rate, surfaces.fake.error_usage = 0.0, None
    # the lease came back and the token window holds only the 12 reported
    raw = await client.responses.with_raw_response.create(
        model="gpt", input="x" * 40, max_output_tokens=4
    )
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 12 - 14)
    await surfaces.balanced()


async def test_a_client_leaving_a_responses_stream_frees_its_lease(surfaces: Surfaces) -> None:
    key = await surfaces.key(max_parallel_requests=1, max_budget=1)
    surfaces.fake.chunk_delay_ms = 50
    async with surfaces.admin.session.post(
        f"{surfaces.base}/v1/responses",
        json={"model": "gpt", "input": "x" * 40, "max_output_tokens": 400, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200
        seen = b""
        while b"output_text.delta" not in seen:
            seen += await response.content.readline()
    client = surfaces.openai(key)
    for _ in range(100):
        try:
            await client.responses.create(model="gpt", input="x" * 40, max_output_tokens=1)
            break
        except openai.RateLimitError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the lease of the abandoned stream was not freed")
    # the cut stream: its prompt estimate and what was streamed, not the 400 held
    spent = await surfaces.spend(key)
    assert spent < 2 * 10 * 2.5e-6 + 60 * 10e-6
    await surfaces.balanced()


# -- cache-aware token windows -----------------------------------------------------------


@pytest.mark.parametrize(("counts", "third_admitted"), [("all", False), ("uncached", True)])
async def test_what_token_windows_count_of_cache_reads(
    surfaces: Surfaces, redis_url: str, counts: str, third_admitted: bool
) -> None:
    """Two calls that write then read a 100-token cached system prompt (115 tokens each):
    counting everything leaves 30 of 260, too little for a third (about 119 held); leaving
    cache reads out (as providers' own limits do) counted the second as 15."""
    settings = dataclasses.replace(surfaces.settings, tpm_counts=counts)
    async with running_sidecar(settings, redis_url) as base:
        admin = Admin(surfaces.admin.session, base)
        key = (await admin.post("/key/generate", {"tpm_limit": 260}))["key"]
        client = anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0)
        system = [{"type": "text", "text": "c" * 400, "cache_control": {"type": "ephemeral"}}]
        for _ in range(2):
            await client.messages.create(model="claude", max_tokens=5, system=system, messages=ASK)
        try:
            await client.messages.create(model="claude", max_tokens=5, system=system, messages=ASK)
            admitted = True
        except anthropic.RateLimitError:
            admitted = False
        await client.close()
    assert admitted is third_admitted


async def test_input_and_output_token_windows(surfaces: Surfaces) -> None:
    key = await surfaces.key(output_tpm_limit=10, input_tpm_limit=1000)
    client = surfaces.claude(key)
    raw = await client.messages.with_raw_response.create(model="claude", max_tokens=8, messages=ASK)
    assert raw.headers["anthropic-ratelimit-output-tokens-limit"] == "10"
    assert raw.headers["anthropic-ratelimit-input-tokens-limit"] == "1000"
    with pytest.raises(anthropic.RateLimitError) as raised:
        await client.messages.create(model="claude", max_tokens=8, messages=ASK)
    message = raised.value.body["error"]["message"]
    assert "Limit type: tokens" in message and "10 output tokens per minute" in message
    assert "The largest max_tokens that fits now is 2" in message
    await client.messages.create(model="claude", max_tokens=2, messages=ASK)


async def test_end_user_and_response_ids_are_bounded_on_every_surface(
    surfaces: Surfaces,
) -> None:
    """The end user of a Responses request (``safety_identifier``) or of a count (its
    ``metadata.user_id``), and a ``previous_response_id``, become Redis keys and ledger
    fields: each is refused past 256 characters or with a control character."""
    key = await surfaces.key(max_budget=1)
    headers = {"Authorization": f"Bearer {key}"}
    cases = [
        ("/v1/responses", {"model": "gpt", "input": "hi", "safety_identifier": "a\x00b"}),
        ("/v1/responses", {"model": "gpt", "input": "hi", "safety_identifier": "u" * 300}),
        ("/v1/responses", {"model": "gpt", "input": "hi", "previous_response_id": "r" * 300}),
        ("/v1/responses", {"model": "gpt", "input": "hi", "previous_response_id": "r\nx"}),
        (
            "/v1/messages/count_tokens",
            {"model": "claude", "messages": ASK, "metadata": {"user_id": "x" * 300}},
        ),
    ]
    for path, body in cases:
        async with surfaces.admin.session.post(
            surfaces.base + path, json=body, headers=headers
        ) as response:
            assert response.status == 400, (path, body, await response.text())
    await surfaces.balanced()


async def test_the_end_user_comes_from_litellms_headers_first(
    surfaces: Surfaces, redis_url: str
) -> None:
    """LiteLLM's order on every surface: ``x-litellm-customer-id``, ``x-litellm-end-user-id``,
    the headers the config names, then the body's own field; a header's value is bounded
    like the body's and refused before anything is taken."""
    settings = dataclasses.replace(surfaces.settings, end_user_headers=("x-owui-user-email",))
    chat = {"model": "gpt", "messages": ASK, "max_tokens": 2, "user": "body-user"}
    message = {"model": "claude", "messages": ASK, "max_tokens": 2}
    cases = [
        ("/v1/chat/completions", chat, {"x-litellm-end-user-id": "eu"}, "eu"),
        (
            "/v1/chat/completions",
            chat,
            {"x-litellm-end-user-id": "eu", "x-litellm-customer-id": "cust"},
            "cust",
        ),
        ("/v1/chat/completions", chat, {"x-litellm-end-user-id": ""}, "body-user"),
        (
            "/v1/messages",
            {**message, "metadata": {"user_id": "meta"}},
            {"x-owui-user-email": "ann@example.com"},
            "ann@example.com",
        ),
        ("/v1/messages", {**message, "metadata": {"user_id": "meta"}}, {}, "meta"),
        ("/v1/responses", {"model": "gpt", "input": "hi", "safety_identifier": "sid"}, {}, "sid"),
    ]
    key = await surfaces.key(max_budget=1)
    async with running_sidecar(settings, redis_url) as base:
        session = surfaces.admin.session
        for path, body, extra, expected in cases:
            headers = {"Authorization": f"Bearer {key}", **extra}
            async with session.post(base + path, json=body, headers=headers) as response:
                assert response.status == 200, (path, extra, await response.text())
            logs = await surfaces.admin.get("/spend/logs", end_user=expected)
            assert len(logs) >= 1 and {row["end_user"] for row in logs} == {expected}, expected
        before = surfaces.fake.requests
        headers = {"Authorization": f"Bearer {key}", "x-litellm-customer-id": "c" * 300}
        async with session.post(base + "/v1/chat/completions", json=chat, headers=headers) as r:
            assert r.status == 400
            error = (await r.json())["error"]
        assert error["param"] == "x-litellm-customer-id" and "256" in error["message"]
        assert surfaces.fake.requests == before
    await surfaces.balanced()


async def test_a_conversation_is_held_as_a_request_that_does_not_bound_itself(
    surfaces: Surfaces, redis_url: str
) -> None:
    """Its earlier turns are billed as input of a size unknown here, so it holds what is left
    of its limits (it passes a budget only alone, by its own excess); strict enforcement,
    which promises no budget is ever passed, refuses it with a reason."""
    key = await surfaces.key(max_budget=0.005)
    client = surfaces.openai(key)
    ask = {"model": "gpt", "input": "hi", "max_output_tokens": 1000}  # up to $0.01: too dear
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(**ask)
    answer = await client.responses.create(**ask, conversation="conv_1")
    assert answer.usage.output_tokens == 1000  # admitted with what was left, and charged all
    assert await surfaces.spend(key) > 0.005
    with pytest.raises(openai.RateLimitError):  # the budget is spent: no second one
        await client.responses.create(**ask, conversation="conv_1")
    strict = dataclasses.replace(surfaces.settings, budget_enforcement="strict")
    async with running_sidecar(strict, redis_url) as base:
        other = openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key=await surfaces.key(), max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await other.responses.create(model="gpt", input="hi", conversation="conv_1")
        await other.close()
    assert refused.value.body["param"] == "conversation"
    await surfaces.balanced()
