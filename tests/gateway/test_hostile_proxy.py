"""Hostile and broken traffic through the proxy: a client choosing ids, an upstream answering
garbage, clients leaving early. Every request is counted against its own key, every exit
after admission settles or releases exactly once, and no answer is a 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from ratelimiter import RedisServer
from ratelimiter.engine.embedded import free_port

from ..conftest import (
    MASTER_KEY,
    MESSAGES,
    Stack,
    one_model,
    running_sidecar,
    running_upstream,
    serving,
)

CHAT = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4}


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


async def post(
    stack: Stack, key: str, body: Any = None, **headers: str
) -> tuple[int, dict[str, Any], Any]:
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions", json=body or CHAT, headers=auth(key, **headers)
    ) as response:
        return response.status, response.headers.copy(), await response.json(content_type=None)


async def ledger_of(stack: Stack, key: str) -> list[dict[str, Any]]:
    status, logs = await stack.admin.call("GET", "/spend/logs", api_key=key)
    assert status == 200, logs
    return logs


async def test_a_client_request_id_is_never_the_reservation_id(stack: Stack) -> None:
    """The reproduction from the review: one slow stream holds its key's only parallel slot
    under a chosen id; twenty requests reusing that id, from its key and from a key with no
    budget, must each meet their own key's limits."""
    victim = await stack.key(max_parallel_requests=1, rpm_limit=2, max_budget=0.05)
    thief = await stack.key(max_budget=0)
    stack.fake.chunk_delay_ms = 40
    shared = {"x-request-id": "shared-id-1"}
    stream = stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        json={**CHAT, "max_tokens": 20, "stream": True},
        headers=auth(victim, **shared),
    )
    async with stream as held:
        assert held.status == 200
        assert held.headers["x-client-request-id"] == "shared-id-1"
        assert held.headers["x-request-id"].startswith("req-")
        await held.content.readline()
        same_key = await asyncio.gather(*(post(stack, victim, **shared) for _ in range(20)))
        cross_key = await asyncio.gather(*(post(stack, thief, **shared) for _ in range(5)))
        await held.read()
    assert {(s, h["rate_limit_type"]) for s, h, _ in same_key} == {(429, "max_parallel_requests")}
    assert {(s, b["error"]["type"]) for s, _, b in cross_key} == {(429, "budget_exceeded")}
    ours = {h["x-request-id"] for _, h, _ in same_key + cross_key}
    assert len(ours) == 25 and held.headers["x-request-id"] not in ours
    stack.fake.chunk_delay_ms = 0
    # After the stream settled, the id is still only a correlation value: no 500, a new hold.
    status, headers, _ = await post(stack, victim, **shared)
    assert status == 200 and headers["x-client-request-id"] == "shared-id-1"
    entries = await ledger_of(stack, victim)
    assert len(entries) == 2 and {e["status"] for e in entries} == {"success"}
    assert sum(e["spend"] for e in entries) == pytest.approx(
        (10 * 1e-6 + 20 * 2e-6) + (10 * 1e-6 + 4 * 2e-6)
    )
    assert await ledger_of(stack, thief) == []


async def test_an_overlong_client_request_id_is_a_400(stack: Stack) -> None:
    key = await stack.key(rpm_limit=1)
    status, headers, body = await post(stack, key, **{"x-request-id": "x" * 201})
    assert status == 400 and body["error"]["param"] == "x-request-id"
    assert headers["x-request-id"].startswith("req-")
    assert (await post(stack, key))[0] == 200  # the refused one took nothing


class Garbage:
    """An OpenAI-shaped upstream that answers 200 with broken payloads, over real HTTP."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 0.0
        self.cookies: list[dict[str, str]] = []  # what each request carried

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.cookies.append(dict(request.cookies))
        await asyncio.sleep(self.delay_s)
        text = "word " * 10  # 50 characters: 13 tokens by chars / 4
        usage: Any = {
            "usage_abc": {"prompt_tokens": "abc", "completion_tokens": "abc"},
            "usage_negative": {"prompt_tokens": -5, "completion_tokens": -1},
            "usage_huge": {"prompt_tokens": 10**18, "completion_tokens": 10**18},
            "no_usage": None,
            "bad_sse": None,
        }.get(self.mode, {"prompt_tokens": 3, "completion_tokens": 4})
        if not body.get("stream"):
            if self.mode == "not_json":
                return web.Response(text="<html>" + text + "</html>", status=200)
            answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
            if usage is not None:
                answer["usage"] = usage
            answered = web.json_response(answer)
            if self.mode == "cookie":
                answered.set_cookie("session", "of-the-first-caller")
            return answered
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.mode == "split":
            for at in range(0, len(SPLIT_STREAM), 7):  # lines cut anywhere, many per write
                await response.write(SPLIT_STREAM[at : at + 7])
            return response
        if self.mode == "overlong":
            for at in range(0, len(OVERLONG_STREAM), 65536):
                await response.write(OVERLONG_STREAM[at : at + 65536])
            return response
        if self.mode == "text":
            await response.write(TEXT_STREAM)
            return response
        delta = {"choices": [{"index": 0, "delta": {"content": text}}]}
        await response.write(b"data: " + orjson.dumps(delta) + b"\n\n")
        if self.mode == "bad_sse":
            await response.write(b'data: {"choices": [{"delta": {"content": "unterminated\n\n')
        await response.write(b'data: {"choices": "not a list"}\n\n')
        if usage is not None:
            await response.write(
                b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n"
            )
        await response.write(b"data: [DONE]\n\n")
        return response


async def test_a_cookie_an_upstream_sets_is_not_sent_with_later_requests(
    garbage: tuple[Garbage, str, str],
) -> None:
    """The sidecar's upstream session serves every key: an upstream's cookie must not ride on
    the next caller's request."""
    upstream, base, key = garbage
    upstream.mode = "cookie"
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                f"{base}/v1/chat/completions", json=body, headers=auth(key)
            ) as response:
                assert response.status == 200
    assert upstream.cookies == [{}, {}]


# A stream written 7 bytes at a time: comments, event lines, a line that is not JSON, and
# the usage event (which the client did not ask for) between two content events.
SPLIT_USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n'
SPLIT_STREAM = (
    b": keep-alive\n\n"
    b'data: {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "ab"}}]}\n\n'
    b"event: note\ndata: not json\n\n" + SPLIT_USAGE + b"\n"
    b'data: {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "cd"}}]}\n\n'
    b"data: [DONE]\n\n"
)


async def streamed_and_charged(base: str, key: str) -> tuple[bytes, dict[str, Any]]:
    """One streamed chat request's bytes as the client got them, and its ledger entry."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/chat/completions", json=body, headers=auth(key)
        ) as response:
            assert response.status == 200
            streamed = await response.read()
        async with session.get(
            f"{base}/spend/logs", params={"api_key": key}, headers=auth(MASTER_KEY)
        ) as response:
            (entry,) = await response.json()
    return streamed, entry


async def test_a_stream_cut_anywhere_reaches_the_client_whole_but_the_usage_it_did_not_ask(
    garbage: tuple[Garbage, str, str],
) -> None:
    """SSE lines split across the upstream's writes are passed on byte for byte, less the
    usage event the client did not ask for, and the stream is charged from that usage."""
    upstream, base, key = garbage
    upstream.mode = "split"
    streamed, entry = await streamed_and_charged(base, key)
    assert streamed == SPLIT_STREAM.replace(SPLIT_USAGE, b"")
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 4)


# A data line of 3 MiB with no newline until its end, between two content events.
OVERLONG = b"data: " + b"y" * (3 << 20)
OVERLONG_STREAM = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "ab"}}]}\n\n'
    + OVERLONG
    + b'\n\ndata: {"choices": [{"index": 0, "delta": {"content": "cd"}}]}\n\ndata: [DONE]\n\n'
)


async def test_an_upstream_line_past_the_bound_is_passed_on_unread_and_charged(
    garbage: tuple[Garbage, str, str],
) -> None:
    """A line longer than MAX_SSE_LINE is not held whole in memory: it reaches the client as
    it came, is charged as generated text, and the events after it are read again."""
    upstream, base, key = garbage
    upstream.mode = "overlong"
    streamed, entry = await streamed_and_charged(base, key)
    assert streamed == OVERLONG_STREAM
    # no usage event: the output is the characters generated / 4, the line's and "abcd"
    assert entry["completion_tokens"] == -(-(len(OVERLONG) + 1 + 4) // 4)


# Words streamed as data lines that are no JSON object, and no usage event.
TEXT_LINES = (b"plain words the client reads", b'["a", "list"]', b'"a string"')
TEXT_STREAM = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "ab"}}]}\n\n'
    + b"".join(b"data: " + line + b"\r\n\r\n" for line in TEXT_LINES)
    + b"data: [DONE]\n\n"
)


async def test_data_lines_that_are_no_json_object_are_charged_as_text(
    garbage: tuple[Garbage, str, str],
) -> None:
    """Text the upstream streamed in data lines the sidecar cannot read as events reaches the
    client as it came and is charged as generated text; OpenAI's closing [DONE] is not."""
    upstream, base, key = garbage
    upstream.mode = "text"
    streamed, entry = await streamed_and_charged(base, key)
    assert streamed == TEXT_STREAM
    generated = len(b"ab") + sum(len(line) for line in TEXT_LINES)
    assert entry["completion_tokens"] == -(-generated // 4)


@pytest.fixture
async def garbage(ns: str, redis_url: str) -> AsyncIterator[tuple[Garbage, str, str]]:
    """The sidecar in front of a broken upstream; yields (upstream, sidecar URL, a key with
    one parallel slot, so a leaked lease shows as a 429 on the next request)."""
    upstream = Garbage()
    async with (
        serving(upstream.app()) as up,
        running_sidecar(one_model(ns, f"{up}/v1"), redis_url) as base,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(
            f"{base}/key/generate",
            json={"max_parallel_requests": 1},
            headers=auth(MASTER_KEY),
        ) as response:
            key = (await response.json())["key"]
        yield upstream, base, key


MODES = ["usage_abc", "usage_negative", "usage_huge", "no_usage", "bad_sse", "not_json"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
async def test_a_broken_upstream_answer_reaches_the_client_and_is_charged_from_its_text(
    garbage: tuple[Garbage, str, str], redis_url: str, ns: str, mode: str, stream: bool
) -> None:
    upstream, base, key = garbage
    if (mode == "not_json" and stream) or (mode == "bad_sse" and not stream):
        pytest.skip("only one way to answer it")
    upstream.mode = mode
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "stream": stream}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the second finds the parallel slot free again
            async with session.post(
                f"{base}/v1/chat/completions", json=body, headers=auth(key)
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
        async with session.get(
            f"{base}/spend/logs", params={"api_key": key}, headers=auth(MASTER_KEY)
        ) as response:
            entries = await response.json()
    assert len(entries) == 2 and {e["status"] for e in entries} == {"success"}
    for entry in entries:
        # The prompt as estimated, and at least the 50 characters of text it generated.
        assert entry["prompt_tokens"] >= 10 and entry["completion_tokens"] >= 13, entry
        assert entry["spend"] == pytest.approx(entry["prompt_tokens"] * 1e-6)


async def test_an_answer_without_usage_is_charged_its_completion(
    garbage: tuple[Garbage, str, str],
) -> None:
    """Item 7: a non-streamed answer without usage was charged no completion tokens."""
    upstream, base, key = garbage
    upstream.mode = "no_usage"
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/chat/completions", json=body, headers=auth(key)
        ) as response:
            assert response.status == 200
        async with session.get(
            f"{base}/spend/logs", params={"api_key": key}, headers=auth(MASTER_KEY)
        ) as response:
            (entry,) = await response.json()
    assert entry["completion_tokens"] == 13  # 50 characters of text / 4


async def test_a_client_gone_before_the_first_byte_is_charged_the_prompt(
    garbage: tuple[Garbage, str, str],
) -> None:
    """The upstream had the prompt: that is billed even though nobody read the answer, and
    the parallel slot comes back."""
    upstream, base, key = garbage
    upstream.delay_s = 0.5
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "stream": True}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.2):
                await session.post(f"{base}/v1/chat/completions", json=body, headers=auth(key))
    upstream.delay_s = 0
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            async with session.get(
                f"{base}/spend/logs", params={"api_key": key}, headers=auth(MASTER_KEY)
            ) as response:
                entries = await response.json()
            if entries:
                break
            await asyncio.sleep(0.1)
        (entry,) = entries
        assert entry["status"] == "success" and entry["prompt_tokens"] >= 100
        assert entry["spend"] == pytest.approx(entry["prompt_tokens"] * 1e-6)
        async with session.post(
            f"{base}/v1/chat/completions", json={**body, "stream": False}, headers=auth(key)
        ) as response:
            assert response.status == 200  # the lease was released


async def test_every_answer_is_counted_and_carries_an_id(stack: Stack) -> None:
    key = await stack.key()
    answers = [
        await post(stack, "sk-wrong"),  # 401
        await post(stack, key, {"model": "nope", "messages": MESSAGES}),  # 404
        await post(stack, key, {"model": "gpt-4o"}),  # 400
    ]
    assert [status for status, _, _ in answers] == [401, 404, 400]
    assert all(h["x-request-id"].startswith("req-") for _, h, _ in answers)
    async with stack.admin.session.get(f"{stack.base}/metrics") as response:
        text = await response.text()
    for status in (401, 404, 400):
        assert f'route="/v1/chat/completions",status="{status}"}} 1.0' in text, status


async def test_unavailable_answers_do_not_name_the_redis_address(tmp_path: Path, ns: str) -> None:
    server = RedisServer(tmp_path, port=free_port(), appendonly=False).start()
    try:
        async with running_upstream() as upstream:
            settings = one_model(ns, upstream)
            async with (
                running_sidecar(settings, server.url) as base,
                aiohttp.ClientSession() as session,
            ):
                server.stop()
                address = f"127.0.0.1:{server.port}"
                async with session.post(
                    f"{base}/v1/chat/completions",
                    json={"model": "m", "messages": MESSAGES},
                    headers=auth(MASTER_KEY),
                ) as response:
                    assert response.status == 503
                    assert address not in await response.text()
                async with session.get(f"{base}/health/readiness") as response:
                    assert response.status == 503
                    assert address not in await response.text()
                async with session.get(
                    f"{base}/health/readiness", headers=auth(MASTER_KEY)
                ) as response:
                    assert address in (await response.json())["detail"]
    finally:
        server.stop()


async def test_a_caller_without_a_valid_key_costs_no_body_parsing(stack: Stack) -> None:
    """Authentication comes first: a large or malformed body from someone with no key is a
    401, not parsed, checked and estimated first (hundreds of ms of CPU for 4 MB)."""
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        data=b'{"model": "gpt-4o", "messages": [null' + b" " * 1_000_000 + b"]}",
        headers={"Authorization": "Bearer sk-nobody", "Content-Type": "application/json"},
    ) as response:
        assert response.status == 401
