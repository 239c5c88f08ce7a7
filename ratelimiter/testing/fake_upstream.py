"""A fake OpenAI-compatible upstream: try the sidecar with no provider account; the tests and
benchmarks use it too.

``ratelimiter fake-upstream [--port 8000] [--latency-ms 0] [--error-rate 0]`` serves
``/v1/chat/completions`` (plain and SSE streaming, with the usage chunk when
``stream_options.include_usage`` is set), ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models``. Replies are deterministic: the completion is ``max_tokens`` words (default 16)
and usage counts one token per word of output and ceil(characters / 4) of input.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

__all__ = ["FakeUpstream", "create_fake_upstream"]

DEFAULT_COMPLETION_TOKENS = 16
WORD = "lorem"


@dataclass
class FakeUpstream:
    """Behaviour knobs, changeable while it runs (tests flip them)."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    chunk_delay_ms: float = 0.0
    seed: int | None = None
    requests: int = 0
    cancelled: int = 0

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)


FAKE = web.AppKey("fake", FakeUpstream)


def _prompt_tokens(body: dict[str, Any], field: str) -> int:
    """ceil(characters / 4) of the route's own input field, whatever else the body carries
    and whatever shape it has (the sidecar passes fields it does not read through)."""
    raw = body.get(field)
    if field == "messages":
        messages = raw if isinstance(raw, list) else []
        text = "".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    else:
        text = (
            raw
            if isinstance(raw, str)
            else " ".join(map(str, raw if isinstance(raw, list) else ()))
        )
    return max(1, -(-len(text) // 4))


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "upstream_error", "param": None, "code": None}},
        status=status,
    )


async def _prelude(request: web.Request) -> tuple[FakeUpstream, dict[str, Any]] | web.Response:
    fake = request.app[FAKE]
    fake.requests += 1
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON")
    if fake.latency_ms:
        await asyncio.sleep(fake.latency_ms / 1000)
    if fake.error_rate and fake.random.random() < fake.error_rate:
        return _error(500, "the fake upstream failed on purpose")
    return fake, body


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def chat(request: web.Request) -> web.StreamResponse:
    started = await _prelude(request)
    if isinstance(started, web.Response):
        return started
    fake, body = started
    n_words = (
        body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_COMPLETION_TOKENS
    )
    prompt, rid, created = (
        _prompt_tokens(body, "messages"),
        f"chatcmpl-{uuid.uuid4().hex}",
        int(time.time()),
    )
    model = body.get("model", "fake")
    if not body.get("stream"):
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "length" if "max_tokens" in body else "stop",
                        "message": {"role": "assistant", "content": " ".join([WORD] * n_words)},
                    }
                ],
                "usage": _usage(prompt, n_words),
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    try:
        for i in range(n_words):
            delta = {"content": (" " if i else "") + WORD}
            if i == 0:
                delta["role"] = "assistant"
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if fake.chunk_delay_ms:
                await asyncio.sleep(fake.chunk_delay_ms / 1000)
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(b"data: " + orjson.dumps(last) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {**base, "choices": [], "usage": _usage(prompt, n_words)}
            await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        fake.cancelled += 1
        raise
    return response


async def completions(request: web.Request) -> web.Response:
    started = await _prelude(request)
    if isinstance(started, web.Response):
        return started
    _, body = started
    n_words = body.get("max_tokens") or DEFAULT_COMPLETION_TOKENS
    return web.json_response(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "text": " ".join([WORD] * n_words),
                    "finish_reason": "length",
                    "logprobs": None,
                }
            ],
            "usage": _usage(_prompt_tokens(body, "prompt"), n_words),
        }
    )


async def embeddings(request: web.Request) -> web.Response:
    started = await _prelude(request)
    if isinstance(started, web.Response):
        return started
    _, body = started
    inputs = body.get("input") or [""]
    inputs = inputs if isinstance(inputs, list) else [inputs]
    prompt = _prompt_tokens(body, "input")
    return web.json_response(
        {
            "object": "list",
            "model": body.get("model", "fake"),
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                for i in range(len(inputs))
            ],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "ratelimiter"}],
        }
    )


def create_fake_upstream(fake: FakeUpstream | None = None) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[FAKE] = fake or FakeUpstream()
    for prefix in ("", "/v1"):
        app.router.add_post(f"{prefix}/chat/completions", chat)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_get(f"{prefix}/models", models)
    return app
