"""A fake OpenAI-compatible upstream: try the sidecar with no provider account; the tests and
benchmarks use it too.

``ratelimiter fake-upstream [--port 8000] [--latency-ms 0] [--error-rate 0]`` serves
``/v1/chat/completions`` (plain and SSE streaming, with the usage chunk when
``stream_options.include_usage`` is set), ``/v1/completions``, ``/v1/embeddings``,
``/v1/models``, OpenAI's Responses API (``/v1/responses``: create, plain and streamed, then
retrieve, delete, input items) and Anthropic's Messages API (``/v1/messages``, plain and
streamed with Anthropic's events, and ``/v1/messages/count_tokens``). Replies are
deterministic: the completion is ``max_tokens`` words (default 16) and usage counts one token
per word of output and ceil(characters / 4) of input.

Caches behave like the providers' so cache accounting can be tested: a Messages request whose
blocks carry ``cache_control`` writes the prompt up to its last marked block (a 5-minute write,
or a 1-hour one for ``"ttl": "1h"``) and reads it when the same prefix comes again, reported
in ``cache_creation_input_tokens`` / ``cache_read_input_tokens`` outside ``input_tokens``; a
Responses request repeated with the same input reads all but its last token from the cache
(``input_tokens_details.cached_tokens``, inside ``input_tokens``). A Responses request with
``reasoning`` reasons for ``REASONING_TOKENS`` tokens (``output_tokens_details``).
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
    error_usage: dict[str, Any] | None = None  # usage an error answer reports, as it is
    chunk_delay_ms: float = 0.0
    seed: int | None = None
    # Messages: answer at most this many words, ending the turn ("end_turn") like a model
    # that has said what it had to; None answers max_tokens words and stops on the limit
    answer_words: int | None = None
    requests: int = 0
    cancelled: int = 0
    last_headers: dict[str, str] | None = None
    last_body: Any = None  # what the last request sent, as the upstream read it

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        self.cached: set[str] = set()  # prompt prefixes in the fake's cache
        self.stored: dict[str, dict[str, Any]] = {}  # Responses kept for retrieval


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


def _error(status: int, message: str, usage: dict[str, Any] | None = None) -> web.Response:
    payload: dict[str, Any] = {
        "error": {"message": message, "type": "upstream_error", "param": None, "code": None}
    }
    if usage is not None:
        payload["usage"] = usage
    return web.json_response(payload, status=status)


async def _prelude(request: web.Request) -> tuple[FakeUpstream, dict[str, Any]] | web.Response:
    fake = request.app[FAKE]
    fake.requests += 1
    fake.last_headers = dict(request.headers)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON")
    fake.last_body = body
    if fake.latency_ms:
        await asyncio.sleep(fake.latency_ms / 1000)
    if fake.error_rate and fake.random.random() < fake.error_rate:
        return _error(500, "the fake upstream failed on purpose", fake.error_usage)
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


REASONING_TOKENS = 8


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _text_of(value: Any) -> str:
    """The text of message contents and blocks, whatever their shape."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return "".join(_text_of(value.get(k)) for k in ("text", "content", "input", "output"))
    return ""


def _tokens(text: str) -> int:
    return -(-len(text) // 4)


def _anthropic_usage(fake: FakeUpstream, body: dict[str, Any]) -> dict[str, Any]:
    """Input usage with Anthropic's cache: the prefix up to the last block with cache_control
    is written on first sight and read after."""
    blocks: list[Any] = []
    system = body.get("system")
    blocks += system if isinstance(system, list) else [{"text": system or ""}]
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        blocks += content if isinstance(content, list) else [{"text": content or ""}]
    marked = [i for i, b in enumerate(blocks) if isinstance(b, dict) and b.get("cache_control")]
    total = max(1, _tokens(_text_of(blocks)))
    usage: dict[str, Any] = {
        "input_tokens": total,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
    }
    if marked:
        last = marked[-1]
        prefix = _text_of(blocks[: last + 1])
        cached = min(_tokens(prefix), total)
        hour = (blocks[last]["cache_control"] or {}).get("ttl") == "1h"
        if prefix in fake.cached:
            usage["cache_read_input_tokens"] = cached
        else:
            fake.cached.add(prefix)
            usage["cache_creation_input_tokens"] = cached
            usage["cache_creation"][
                "ephemeral_1h_input_tokens" if hour else "ephemeral_5m_input_tokens"
            ] = cached
        usage["input_tokens"] = total - cached
    return usage


async def messages(request: web.Request) -> web.StreamResponse:
    started = await _prelude(request)
    if isinstance(started, web.Response):
        return _anthropic_envelope(started)
    fake, body = started
    if not isinstance(body.get("max_tokens"), int):
        return web.json_response(
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
            },
            status=400,
        )
    n_words = body["max_tokens"]
    stop = "max_tokens"
    if fake.answer_words is not None and fake.answer_words < n_words:
        n_words, stop = fake.answer_words, "end_turn"
    usage = _anthropic_usage(fake, body)
    message = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake"),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    text = " ".join([WORD] * n_words)
    if not body.get("stream"):
        message.update(
            content=[{"type": "text", "text": text}],
            stop_reason=stop,
            usage={**usage, "output_tokens": n_words},
        )
        return web.json_response(message)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        await response.write(_sse("message_start", {"type": "message_start", "message": message}))
        block = {"type": "text", "text": ""}
        await response.write(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
        )
        await response.write(_sse("ping", {"type": "ping"}))
        for i in range(n_words):
            delta = {"type": "text_delta", "text": (" " if i else "") + WORD}
            event = {"type": "content_block_delta", "index": 0, "delta": delta}
            await response.write(_sse("content_block_delta", event))
            if fake.chunk_delay_ms:
                await asyncio.sleep(fake.chunk_delay_ms / 1000)
        await response.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        done = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": n_words},
        }
        await response.write(_sse("message_delta", done))
        await response.write(_sse("message_stop", {"type": "message_stop"}))
    except (ConnectionResetError, asyncio.CancelledError):
        fake.cancelled += 1
        raise
    return response


def _anthropic_envelope(response: web.Response) -> web.Response:
    message = orjson.loads(response.body)["error"]["message"]  # type: ignore[arg-type]
    kind = "api_error" if response.status >= 500 else "invalid_request_error"
    return web.json_response(
        {"type": "error", "error": {"type": kind, "message": message}}, status=response.status
    )


async def count_tokens(request: web.Request) -> web.Response:
    started = await _prelude(request)
    if isinstance(started, web.Response):
        return _anthropic_envelope(started)
    _, body = started
    usage = _anthropic_usage(FakeUpstream(), body)  # counting reads and writes no cache
    return web.json_response({"input_tokens": usage["input_tokens"]})


def _response_object(body: dict[str, Any], rid: str, status: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": body.get("model", "fake"),
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": {},
        "temperature": 1.0,
        "top_p": 1.0,
        "usage": None,
    }


async def responses(request: web.Request) -> web.StreamResponse:
    started = await _prelude(request)
    if isinstance(started, web.Response):
        return started
    fake, body = started
    n_words = body.get("max_output_tokens") or DEFAULT_COMPLETION_TOKENS
    reasoning = REASONING_TOKENS if body.get("reasoning") else 0
    n_words = max(n_words - reasoning, 1)
    prompt_text = _text_of(body.get("instructions")) + _text_of(body.get("input"))
    prompt = max(1, _tokens(prompt_text))
    cached = prompt - 1 if prompt_text in fake.cached else 0
    fake.cached.add(prompt_text)
    rid = f"resp_{uuid.uuid4().hex}"
    text = " ".join([WORD] * n_words)
    item = {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex[:16]}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": n_words + reasoning,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + n_words + reasoning,
    }
    final = {**_response_object(body, rid, "completed"), "output": [item], "usage": usage}
    if body.get("store", True):
        fake.stored[rid] = {"response": final, "input": body.get("input")}
    if not body.get("stream"):
        return web.json_response(final)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    seq = iter(range(1_000_000))

    async def send(kind: str, **fields: Any) -> None:
        await response.write(_sse(kind, {"type": kind, "sequence_number": next(seq), **fields}))

    try:
        await send("response.created", response=_response_object(body, rid, "in_progress"))
        await send(
            "response.output_item.added",
            output_index=0,
            item={**item, "content": [], "status": "in_progress"},
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        await send(
            "response.content_part.added",
            item_id=item["id"],
            output_index=0,
            content_index=0,
            part=part,
        )
        for i in range(n_words):
            await send(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=0,
                content_index=0,
                delta=(" " if i else "") + WORD,
            )
            if fake.chunk_delay_ms:
                await asyncio.sleep(fake.chunk_delay_ms / 1000)
        await send(
            "response.output_text.done",
            item_id=item["id"],
            output_index=0,
            content_index=0,
            text=text,
        )
        await send("response.output_item.done", output_index=0, item=item)
        await send("response.completed", response=final)
    except (ConnectionResetError, asyncio.CancelledError):
        fake.cancelled += 1
        raise
    return response


async def stored_response(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    fake.last_headers = dict(request.headers)
    rid = request.match_info["rid"]
    if rid not in fake.stored:
        return _error(404, f"Response with id '{rid}' not found.")
    if request.method == "DELETE":
        del fake.stored[rid]
        return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})
    if request.path.endswith("/input_items"):
        given = fake.stored[rid]["input"]
        items = (
            [{"type": "message", "role": "user", "content": given}]
            if isinstance(given, str)
            else given
        )
        return web.json_response({"object": "list", "data": items, "has_more": False})
    return web.json_response(fake.stored[rid]["response"])


def create_fake_upstream(fake: FakeUpstream | None = None) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[FAKE] = fake or FakeUpstream()
    for prefix in ("", "/v1"):
        app.router.add_post(f"{prefix}/chat/completions", chat)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_get(f"{prefix}/models", models)
        app.router.add_post(f"{prefix}/messages", messages)
        app.router.add_post(f"{prefix}/messages/count_tokens", count_tokens)
        app.router.add_post(f"{prefix}/responses", responses)
        app.router.add_get(f"{prefix}/responses/{{rid}}", stored_response)
        app.router.add_delete(f"{prefix}/responses/{{rid}}", stored_response)
        app.router.add_get(f"{prefix}/responses/{{rid}}/input_items", stored_response)
    return app
