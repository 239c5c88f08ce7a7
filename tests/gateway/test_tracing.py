"""OpenTelemetry traces (issue 20, item 5): one span per proxied request through the running
sidecar, read back from the SDK's in-memory exporter: GenAI's semantic-convention attributes,
the rate limiter's decision, estimate and charge, a refusal's limit, the caller's trace as the
parent; and nothing at all unless configured."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import anthropic
import openai
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

from ratelimiter import Engine
from ratelimiter.gateway.app import create_app
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.tracing import TRACER_PROVIDER, _provider

from ..conftest import MASTER_KEY, MESSAGES, Admin, running_upstream, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class Traced:
    base: str
    admin: Admin
    spans: InMemorySpanExporter


@pytest.fixture
async def traced(ns: str, redis_url: str) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with running_upstream() as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            models=(
                Deployment(
                    "m", "openai/m", api_base=upstream, input_cost_per_token=1e-6,
                    output_cost_per_token=2e-6,
                ),
                Deployment("claude", "anthropic/claude-sonnet-4-5", api_base=upstream, index=1),
            ),
        )  # fmt: skip
        engine = await Engine.connect(redis_url, prefix=settings.key_prefix)
        app = create_app(settings, engine)
        app[TRACER_PROVIDER] = provider
        async with serving(app) as base, aiohttp.ClientSession() as session:
            yield Traced(base, Admin(session, base), exporter)
    provider.shutdown()


async def test_an_admitted_request_is_one_span_with_genai_and_our_attributes(
    traced: Traced,
) -> None:
    key = (await traced.admin.post("/key/generate", {"max_budget": 1}))["key"]
    client = openai.AsyncOpenAI(
        base_url=f"{traced.base}/v1",
        api_key=key,
        max_retries=0,
        default_headers={"traceparent": PARENT},
    )
    answer = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
    await client.close()
    (span,) = traced.spans.get_finished_spans()
    assert span.name == "chat m" and span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID  # the caller's trace
    a = span.attributes
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"]) == ("chat", "openai")
    assert a["gen_ai.request.model"] == "m" and a["gen_ai.request.max_tokens"] == 5
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["gen_ai.response.id"] == answer.id
    assert a["ratelimiter.decision"] == "admitted" and "refused_by" not in str(a)
    assert "key" in a["ratelimiter.scopes"]  # the scopes whose limits it met
    assert a["ratelimiter.estimate.output_tokens"] == 5
    spent = (await traced.admin.get("/key/info", key=key))["info"]["spend"]
    assert a["ratelimiter.charged.spend_usd"] == pytest.approx(spent)
    assert a["ratelimiter.estimate.spend_usd"] >= spent > 0
    assert a["ratelimiter.redis.admission_ms"] > 0
    assert a["http.response.status_code"] == 200


async def test_a_refusal_names_its_limit(traced: Traced) -> None:
    key = (await traced.admin.post("/key/generate", {"rpm_limit": 1}))["key"]
    client = openai.AsyncOpenAI(base_url=f"{traced.base}/v1", api_key=key, max_retries=0)
    await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    await client.close()
    admitted, refused = traced.spans.get_finished_spans()
    assert admitted.attributes["ratelimiter.decision"] == "admitted"
    a = refused.attributes
    assert (a["ratelimiter.decision"], a["ratelimiter.refused_by"]) == ("refused", "key:requests")
    assert a["ratelimiter.refusal_reason"] and a["error.type"] == "429"
    assert a["http.response.status_code"] == 429 and "ratelimiter.charged.spend_usd" not in a


async def test_an_anthropic_stream_is_traced_to_its_end(traced: Traced) -> None:
    key = (await traced.admin.post("/key/generate", {}))["key"]
    client = anthropic.AsyncAnthropic(base_url=traced.base, api_key=key, max_retries=0)
    async with client.messages.stream(model="claude", max_tokens=6, messages=MESSAGES) as stream:
        message = await stream.get_final_message()
    await client.close()
    (span,) = traced.spans.get_finished_spans()
    a = span.attributes
    assert span.name == "chat claude" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.usage.output_tokens"] == message.usage.output_tokens == 6
    assert a["gen_ai.response.id"] == message.id


def test_nothing_is_traced_unless_configured() -> None:
    assert _provider({}) is None  # no endpoint, no provider set by the process
    assert _provider({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}) is None
    found = _provider({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert found is not None
    provider, owned = found
    assert owned and isinstance(provider, TracerProvider)
    provider.shutdown()
