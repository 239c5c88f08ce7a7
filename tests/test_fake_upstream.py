"""The fake upstream speaks OpenAI's API well enough for the official client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from ratelimiter.testing.fake_upstream import FakeUpstream

from .conftest import running_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[openai.AsyncOpenAI, FakeUpstream]]:
    fake = FakeUpstream(seed=1)
    async with running_upstream(fake) as base:
        client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        yield client, fake
        await client.close()


async def test_chat_plain_and_streaming(upstream: tuple[openai.AsyncOpenAI, FakeUpstream]) -> None:
    client, _ = upstream
    messages = [{"role": "user", "content": "x" * 40}]
    reply = await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    assert reply.choices[0].message.content == "lorem lorem lorem lorem lorem"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (10, 5)
    stream = await client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "lorem lorem lorem"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 13


async def test_completions_embeddings_models(
    upstream: tuple[openai.AsyncOpenAI, FakeUpstream],
) -> None:
    client, _ = upstream
    assert (
        await client.completions.create(model="m", prompt="hi", max_tokens=2)
    ).usage.total_tokens == 3
    embedded = await client.embeddings.create(model="e", input=["a", "b"])
    assert len(embedded.data) == 2 and embedded.usage.prompt_tokens == 1
    assert [m.id async for m in client.models.list()] == ["fake"]


async def test_errors_on_purpose(upstream: tuple[openai.AsyncOpenAI, FakeUpstream]) -> None:
    client, fake = upstream
    fake.error_rate = 1.0
    with pytest.raises(openai.InternalServerError, match="failed on purpose"):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
