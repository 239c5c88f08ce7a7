"""The proxy path end to end: the official openai client, the sidecar over HTTP, real Redis,
and the fake upstream over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from ratelimiter import Engine
from ratelimiter.gateway.app import create_app
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.http import SETTLING
from ratelimiter.testing.fake_upstream import FakeUpstream

from ..conftest import (
    MASTER_KEY,
    MESSAGES,
    Admin,
    Stack,
    one_model,
    running_sidecar,
    running_upstream,
)


async def test_chat_completions_and_embeddings(stack: Stack) -> None:
    client = stack.client(await stack.key())
    reply = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=4
    )
    chat = reply.parse()
    assert chat.choices[0].message.content == "lorem lorem lorem lorem"
    assert chat.usage is not None and chat.usage.total_tokens == 14
    assert reply.headers["x-request-id"]
    completion = await client.completions.create(model="gpt-4o", prompt="abcd", max_tokens=2)
    assert completion.choices[0].text == "lorem lorem"
    embedded = await client.embeddings.create(model="embed", input=["a", "b"])
    assert len(embedded.data) == 2


async def test_streaming_passes_through_and_settles_usage(stack: Stack) -> None:
    key = await stack.key(max_budget=1)
    client = stack.client(key)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=5, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "lorem lorem lorem lorem lorem"
    )
    assert all(c.usage is None for c in chunks)  # not asked for: the usage chunk is removed
    info = (await stack.admin.get("/key/info", key=key))["info"]
    assert info["spend"] == pytest.approx(10 * 1e-6 + 5 * 2e-6)  # settled from the usage chunk
    asked = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [c async for c in asked][-1].usage is not None


async def test_rpm_refusal_with_exact_retry_after(stack: Stack) -> None:
    client = stack.client(await stack.key(rpm_limit=2))
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    response = raised.value.response
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "Rate limit exceeded for api_key: " in error["message"]
    assert "Limit type: requests. Current limit: 2, Remaining: 0." in error["message"]
    retry_ms = int(response.headers["retry-after-ms"])
    assert 59_000 < retry_ms <= 61_000
    assert response.headers["retry-after"] == str(-(-retry_ms // 1000))
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


async def test_budget_refusal_is_not_retried_by_the_openai_client(stack: Stack) -> None:
    client = stack.client(await stack.key(max_budget=0.00003), retries=3)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    served = stack.fake.requests
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert raised.value.response.json()["error"]["type"] == "budget_exceeded"
    assert stack.fake.requests == served


async def test_upstream_failure_releases_the_reservation(stack: Stack) -> None:
    key = await stack.key(rpm_limit=1)
    client = stack.client(key)
    stack.fake.error_rate = 1.0
    with pytest.raises(openai.InternalServerError, match="failed on purpose"):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stack.fake.error_rate = 0.0
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # rpm slot came back
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model="down", messages=MESSAGES)
    assert raised.value.status_code in (429, 502)


async def test_refused_connection_is_a_502_and_reserves_nothing(stack: Stack) -> None:
    client = stack.client(await stack.key(rpm_limit=5))
    for _ in range(6):  # more than the rpm: each failure gave its slot back
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(model="down", messages=MESSAGES)
        assert raised.value.status_code == 502
        assert "could not be reached" in raised.value.response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"{nope", "application/json", 400, "not valid JSON"),
        (b'{"messages": []}', "application/json", 400, "model is required"),
        (b'{"model": "gpt-5", "messages": []}', "application/json", 404, "'gpt-5' is not served"),
        (
            b'{"model": "gpt-4o", "messages": [], "max_tokens": 0}',
            "application/json",
            400,
            "max_tokens must be a positive whole number",
        ),
        (b'{"model": "gpt-4o"}', "text/plain", 400, "application/json"),
        # Shapes that once failed after admission (500, the lease held until its TTL) or
        # were forwarded unvalidated: refused before anything is reserved.
        (b'{"model": "gpt-4o", "messages": [null]}', "application/json", 400, "messages[0]"),
        (b'{"model": "gpt-4o", "messages": ["s"]}', "application/json", 400, "messages[0]"),
        (
            b'{"model": "gpt-4o", "messages": [], "stream": true, "stream_options": "x"}',
            "application/json",
            400,
            "stream_options",
        ),
        (
            b'{"model": "gpt-4o", "messages": [], "max_tokens": 9007199254740993}',
            "application/json",
            400,
            "max_tokens",
        ),
        (b'{"model": "gpt-4o", "prompt": 5}', "application/json", 400, "messages"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (
            b'{"model": "gpt-4o", "messages": []}' + b" " * (5 * 1024 * 1024),
            "application/json",
            413,
            "larger than",
        ),
    ],
)
async def test_bad_requests_reserve_nothing(
    stack: Stack, body: bytes, content_type: str, status: int, message: str
) -> None:
    key = await stack.key(rpm_limit=1)
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
    ) as response:
        assert response.status == status
        assert message in (await response.json())["error"]["message"]
    await stack.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)


async def test_models_lists_only_what_the_key_may_use(stack: Stack) -> None:
    client = stack.client(await stack.key(models=["embed"]))
    assert [m.id async for m in client.models.list()] == ["embed"]
    with pytest.raises(
        openai.PermissionDeniedError,
        match=r"key not allowed to access model.*Tried to access gpt-4o",
    ):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


async def test_a_client_leaving_mid_stream_frees_its_lease(stack: Stack) -> None:
    key = await stack.key(max_parallel_requests=1, max_budget=1)
    stack.fake.chunk_delay_ms = 50
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 200, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200
        await response.content.readline()
    # the client is gone; the lease comes back once the sidecar notices
    client = stack.client(key)
    for _ in range(100):
        try:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
            break
        except openai.RateLimitError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the lease of the abandoned stream was not freed")
    for _ in range(40):  # and the upstream was told to stop
        if stack.fake.cancelled:
            break
        await asyncio.sleep(0.05)
    assert stack.fake.cancelled == 1
    # charged what was streamed (a few words, estimated from the text), not the 200 reserved
    spend = (await stack.admin.get("/key/info", key=key))["info"]["spend"]
    second = 10 * 1e-6 + 1 * 2e-6
    assert 10 * 1e-6 < spend - second < 10 * 1e-6 + 20 * 2e-6


async def test_an_upstream_timeout_is_a_504_charged_the_prompt_it_had(stack: Stack) -> None:
    """The upstream had the request and may bill it: the prompt is charged, and the request
    counts; only a request that never left (a refused connection, below) is free."""
    key = await stack.key(rpm_limit=2)
    client = stack.client(key)
    stack.fake.latency_ms = 1_000
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.status_code == 504
    assert "did not answer within 0.5s" in raised.value.response.json()["error"]["message"]
    stack.fake.latency_ms = 0
    (entry,) = await stack.admin.get("/spend/logs", api_key=key)
    assert (entry["status"], entry["completion_tokens"]) == ("success", 0)
    assert entry["spend"] == pytest.approx(entry["prompt_tokens"] * 1e-6) and entry["spend"] > 0
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):  # the timed-out request was one of the two
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


async def test_a_slow_answer_keeps_its_parallel_slot(ns: str, redis_url: str) -> None:
    """A non-streamed answer slower than the lease ttl must renew its lease, or a second
    request is let in beside it."""
    fake = FakeUpstream(latency_ms=2_500)
    async with running_upstream(fake) as upstream:
        settings = dataclasses.replace(one_model(ns, upstream), lease_ttl_s=1.0)
        async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as s:
            key = (await Admin(s, base).post("/key/generate", {"max_parallel_requests": 1}))["key"]
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            first = asyncio.create_task(
                client.chat.completions.create(model="m", messages=MESSAGES)
            )
            await asyncio.sleep(1.8)  # past the lease's ttl, the first still waiting
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="m", messages=MESSAGES)
            await first
            await client.close()


async def test_metrics(stack: Stack) -> None:
    client = stack.client(await stack.key(rpm_limit=1))
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    async with stack.admin.session.get(f"{stack.base}/metrics") as response:
        text = await response.text()
    assert 'ratelimiter_admissions_total{outcome="admitted"} 1.0' in text
    assert 'ratelimiter_refusals_total{reason="window_full",scope="key"} 1.0' in text
    assert 'ratelimiter_requests_total{route="/v1/chat/completions",status="429"} 1.0' in text
    assert 'ratelimiter_spend_dollars_total{model="gpt-4o"} 1.8e-05' in text
    assert "ratelimiter_redis_seconds_count 2.0" in text
    assert "ratelimiter_in_flight 0.0" in text


async def test_tpm_and_parallel_refusals(stack: Stack) -> None:
    tokens = stack.client(await stack.key(tpm_limit=30))
    await tokens.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.RateLimitError) as raised:  # 14 used, 17 + 16 more asked
        await tokens.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=16)
    assert "Limit type: tokens." in raised.value.response.json()["error"]["message"]
    assert raised.value.response.headers["x-ratelimit-remaining-tokens"] == "16"

    key = await stack.key(max_parallel_requests=1)
    stack.fake.chunk_delay_ms = 20
    parallel = stack.client(key)
    stream = await parallel.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=20, stream=True
    )
    with pytest.raises(openai.RateLimitError) as raised:
        await parallel.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.response.headers["rate_limit_type"] == "max_parallel_requests"
    assert [c async for c in stream]  # the first stream runs to its end...
    await parallel.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # ...and frees


async def test_a_full_deployment_hands_over_to_the_next(
    stack: Stack, ns: str, redis_url: str
) -> None:
    upstream = stack.settings.models[0].api_base
    settings = Settings(
        master_key=MASTER_KEY,
        key_prefix=f"t:{ns}:fb:",
        models=(
            Deployment("pool", "openai/a", api_base=upstream, rpm=1, index=0),
            Deployment("pool", "openai/b", api_base=upstream, rpm=1, index=1),
        ),
    )
    async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as session:
        key = (await Admin(session, base).post("/key/generate", {}))["key"]
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        served = [
            (await client.chat.completions.create(model="pool", messages=MESSAGES)).model
            for _ in range(2)
        ]
        assert served == ["a", "b"]
        with pytest.raises(
            openai.RateLimitError,
            match=r"Rate limit exceeded for deployment: pool#1\. Limit type: requests",
        ):
            await client.chat.completions.create(model="pool", messages=MESSAGES)
        await client.close()


async def test_the_openai_client_waits_as_long_as_retry_after_says(ns: str, redis_url: str) -> None:
    fake = FakeUpstream(chunk_delay_ms=50)
    async with running_upstream(fake) as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            lease_ttl_s=2.0,
            models=(Deployment("m", "openai/m", api_base=upstream, index=0),),
        )
        async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as session:
            key = (await Admin(session, base).post("/key/generate", {"max_parallel_requests": 1}))[
                "key"
            ]
            holder = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            patient = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=2)
            stream = await holder.chat.completions.create(  # ~1 s, holding the only slot
                model="m", messages=MESSAGES, max_tokens=20, stream=True
            )
            started = time.monotonic()
            drain = asyncio.create_task(asyncio.wait_for(_drain(stream), 10))
            await patient.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
            waited = time.monotonic() - started
            await drain
            # refused once with retry-after ~1.95 s (the lease's expiry) and served on the
            # first retry; the client's own backoff (~0.4 s, then ~0.9 s) would have been
            # refused a second time while the stream still ran
            async with session.get(f"{base}/metrics") as response:
                metrics = await response.text()
            assert 'ratelimiter_refusals_total{reason="no_free_slot",scope="key"} 1.0' in metrics
            assert waited > 1.5
            await holder.close()
            await patient.close()


async def _drain(stream: object) -> None:
    async for _ in stream:  # type: ignore[attr-defined]
        pass


async def test_shutdown_waits_for_the_settlements_made_after_responses(
    settings: Settings, redis_url: str
) -> None:
    """Settlements run after their responses; a graceful shutdown finishes them all before
    the engine closes."""
    engine = await Engine.connect(redis_url, prefix=settings.key_prefix)
    app = create_app(settings, engine)
    runner = web.AppRunner(app)
    await runner.setup()
    made: list[bool] = []

    async def settlement() -> None:
        await asyncio.sleep(0.2)
        made.append(await engine.redis.ping())  # Redis is still reachable through the engine

    app[SETTLING].start(settlement())
    await runner.cleanup()
    assert len(made) == 1
