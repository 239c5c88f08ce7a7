"""Hostile client values: proxy bodies are checked before admission (a 400 naming the field,
valid OpenAI bodies untouched), and log lines cut what clients send (issue 13, items 2, 5, 6)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from ratelimiter.errors import EntityError
from ratelimiter.gateway.bodies import check_body
from ratelimiter.gateway.logs import JsonFormatter, info_line

MODEL = {"model": "gpt-4o"}
CHAT = {**MODEL, "messages": [{"role": "user", "content": "hi"}]}
BIG = 2**53

# (kind, body, the field the 400 must name)
HOSTILE: list[tuple[str, Any, str | None]] = [
    ("chat", [1, 2], None),
    ("chat", "x", None),
    ("chat", 5, None),
    ("chat", None, None),
    ("chat", {"messages": []}, "model"),
    ("chat", {"model": 5, "messages": []}, "model"),
    ("chat", {"model": "", "messages": []}, "model"),
    ("chat", {"model": "m" * 1000, "messages": []}, "model"),
    ("chat", MODEL, "messages"),
    ("chat", {**MODEL, "messages": {"role": "user"}}, "messages"),
    ("chat", {**MODEL, "messages": [None]}, "messages[0]"),
    ("chat", {**MODEL, "messages": [1]}, "messages[0]"),
    ("chat", {**MODEL, "messages": ["str"]}, "messages[0]"),
    ("chat", {**MODEL, "messages": [{"content": "hi"}]}, "messages[0].role"),
    ("chat", {**MODEL, "messages": [{"role": 5}]}, "messages[0].role"),
    (
        "chat",
        {**CHAT, "messages": [*CHAT["messages"], {"role": "user", "content": 5}]},
        "messages[1].content",
    ),
    ("chat", {**MODEL, "messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
    (
        "chat",
        {**MODEL, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
        "messages[0].content[0].type",
    ),
    (
        "chat",
        {**MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages[0].content[0].text",
    ),
    ("chat", {**MODEL, "messages": [{"role": "user", "name": 5}]}, "messages[0].name"),
    (
        "chat",
        {**MODEL, "messages": [{"role": "assistant", "tool_calls": "x"}]},
        "messages[0].tool_calls",
    ),
    (
        "chat",
        {**MODEL, "messages": [{"role": "assistant", "tool_calls": [1]}]},
        "messages[0].tool_calls[0]",
    ),
    (
        "chat",
        {**MODEL, "messages": [{"role": "assistant", "function_call": "f"}]},
        "messages[0].function_call",
    ),
    ("chat", {**CHAT, "tools": {"type": "function"}}, "tools"),
    ("chat", {**CHAT, "tools": [1]}, "tools[0]"),
    ("chat", {**CHAT, "functions": "f"}, "functions"),
    ("chat", {**CHAT, "response_format": "json"}, "response_format"),
    ("chat", {**CHAT, "stream": "yes"}, "stream"),
    ("chat", {**CHAT, "stream": 1}, "stream"),
    ("chat", {**CHAT, "stream": True, "stream_options": "x"}, "stream_options"),
    ("chat", {**CHAT, "stream": True, "stream_options": [1]}, "stream_options"),
    ("chat", {**CHAT, "stream": True, "stream_options": 5}, "stream_options"),
    ("chat", {**CHAT, "stream": True, "stream_options": True}, "stream_options"),
    (
        "chat",
        {**CHAT, "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    ("chat", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": -1}, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": 1.5}, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": "10"}, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": BIG}, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": 2**31 + 1}, "max_tokens"),
    ("chat", {**CHAT, "max_completion_tokens": BIG}, "max_completion_tokens"),
    ("chat", {**CHAT, "n": BIG}, "n"),
    ("chat", {**CHAT, "n": 0}, "n"),
    ("chat", {**CHAT, "n": 129}, "n"),
    ("chat", {**CHAT, "user": 5}, "user"),
    ("chat", {**CHAT, "user": "u" * 1_000_000}, "user"),
    ("chat", {**CHAT, "user": "u" * 257}, "user"),
    # a NUL in an id we key Redis on was a 500 once the customer had been stored
    ("chat", {**CHAT, "user": "a\x00b"}, "user"),
    ("chat", {**CHAT, "model": "m\x00"}, "model"),
    ("completion", MODEL, "prompt"),
    ("completion", {**MODEL, "prompt": 5}, "prompt"),
    ("completion", {**MODEL, "prompt": {"text": "x"}}, "prompt"),
    ("completion", {**MODEL, "prompt": ["a", None]}, "prompt[1]"),
    ("completion", {**MODEL, "prompt": [1.5]}, "prompt[0]"),
    ("completion", {**MODEL, "prompt": [-1]}, "prompt[0]"),
    ("completion", {**MODEL, "prompt": [[1, 2**31]]}, "prompt[0][1]"),
    ("completion", {**MODEL, "prompt": [["x"]]}, "prompt[0][0]"),
    ("completion", {**MODEL, "prompt": "x", "suffix": 5}, "suffix"),
    ("completion", {**MODEL, "prompt": "x", "best_of": 21}, "best_of"),
    ("completion", {**MODEL, "prompt": "x", "max_tokens": BIG}, "max_tokens"),
    ("completion", {**MODEL, "prompt": "x", "n": BIG}, "n"),
    (
        "completion",
        {**MODEL, "prompt": "x", "stream": True, "stream_options": "x"},
        "stream_options",
    ),
    ("embedding", MODEL, "input"),
    ("embedding", {**MODEL, "input": 5}, "input"),
    ("embedding", {**MODEL, "input": [None]}, "input[0]"),
    ("embedding", {**MODEL, "input": [{"text": "x"}]}, "input[0]"),
    ("embedding", {**MODEL, "input": "x", "user": "u" * 1_000_000}, "user"),
    ("embedding", {**MODEL, "input": "x", "stream": "x"}, "stream"),
    ("embedding", {**MODEL, "input": "x", "stream_options": [1]}, "stream_options"),
]


@pytest.mark.parametrize(("kind", "body", "param"), HOSTILE)
def test_a_hostile_body_is_a_400_naming_its_field(kind: str, body: Any, param: str | None) -> None:
    with pytest.raises(EntityError) as raised:
        check_body(body, kind)
    error = raised.value
    assert error.status == 400
    if param is not None:
        assert error.param == param
        assert str(error).startswith(param)
    assert len(str(error)) < 300  # never echoes a huge value back


def test_the_end_user_limit_is_stated() -> None:
    with pytest.raises(EntityError, match=r"user must be at most 256 characters .*, got 1000000"):
        check_body({**CHAT, "user": "u" * 1_000_000}, "chat")


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
VALID: list[tuple[str, dict[str, Any]]] = [
    ("chat", CHAT),
    ("chat", {**MODEL, "messages": []}),  # the upstream decides that it is too short
    (
        "chat",
        {
            **MODEL,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "system", "content": [{"type": "text", "text": "be kind"}]},
                {
                    "role": "user",
                    "name": "ann",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                        },
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                        {"type": "file", "file": {"file_id": "file-1"}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                {"role": "assistant", "content": "", "refusal": "no", "audio": {"id": "a1"}},
                {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                {"role": "function", "name": "f", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": False,
            "functions": [{"name": "g"}],
            "function_call": "auto",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": True},
            },
            "max_completion_tokens": 2**31,
            "n": 128,
            "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
            "user": "ann@example.com",
            "temperature": 0.2,
            "seed": 7,
            "stop": ["\n"],
            "logit_bias": {"50256": -100},
            "metadata": {"k": "v"},
            "store": True,
            "reasoning_effort": "low",
            "modalities": ["text"],
            "prediction": {"type": "content", "content": "x"},
            "service_tier": "auto",
            "web_search_options": {},
            "a_field_openai_adds_next_year": {"x": [1]},
        },
    ),
    (
        "chat",
        {
            **CHAT,
            "max_tokens": None,
            "n": None,
            "stream": None,
            "stream_options": None,
            "tools": None,
            "response_format": None,
            "user": None,
        },
    ),
    ("chat", {**CHAT, "user": "", "stream": False, "stream_options": {"include_usage": None}}),
    ("chat", {**CHAT, "user": "u" * 256}),
    ("chat", {**CHAT, "user": "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"}),
    ("completion", {**MODEL, "prompt": "say hi", "suffix": "bye", "best_of": 3, "echo": True}),
    ("completion", {**MODEL, "prompt": ["a", "b"], "max_tokens": 5, "n": 2, "logprobs": 2}),
    ("completion", {**MODEL, "prompt": [1, 2, 3]}),
    ("completion", {**MODEL, "prompt": [[1, 2], [3], []]}),
    ("completion", {**MODEL, "prompt": ""}),
    ("embedding", {**MODEL, "input": "text", "dimensions": 256, "encoding_format": "float"}),
    ("embedding", {**MODEL, "input": ["a", "b"], "user": "ann"}),
    ("embedding", {**MODEL, "input": [0, 2**31 - 1]}),
    ("embedding", {**MODEL, "input": [[1, 2], [3]]}),
]


@pytest.mark.parametrize(("kind", "body"), VALID)
def test_valid_openai_bodies_pass_untouched(kind: str, body: dict[str, Any]) -> None:
    before = orjson.dumps(body)
    assert check_body(body, kind) is body
    assert orjson.dumps(body) == before


def log_line(message: str, *args: object, **extra: object) -> dict[str, Any]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test_bodies.cut")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message, *args, extra=extra)
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert len(line) < 3_000, len(line)
    return orjson.loads(line)


def test_log_lines_cut_client_values() -> None:
    huge = "u" * 1_000_000
    entry = log_line(
        "proxied %s for %s",
        "req-1",
        huge,
        end_user=huge,
        model="gpt-4o",
        charged={"tokens": 14, "tags": [huge]},
        status=200,
    )
    cut = f"{'u' * 200}...[999800 more characters cut]"
    assert entry["end_user"] == cut
    assert entry["charged"] == {"tokens": 14, "tags": [cut]}
    assert entry["message"] == f"proxied req-1 for {cut}"
    assert (entry["model"], entry["status"]) == ("gpt-4o", 200)  # short values stay whole


def test_log_lines_keep_short_messages_and_cut_long_ones() -> None:
    assert log_line("hello %(who)s", {"who": "ann"})["message"] == "hello ann"
    assert log_line("x" * 5_000)["message"].endswith("...[4000 more characters cut]")


@contextlib.contextmanager
def json_lines_to(stream: io.StringIO) -> Iterator[None]:
    """The root logger set up as configure_logging does, writing JSON lines to ``stream``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_the_request_line_is_the_line_the_formatter_writes() -> None:
    """info_line writes the proxy's line without a LogRecord when the one root handler is
    the JSON one: the same fields, cut the same way."""
    huge = "u" * 1_000_000
    fields = {
        "request_id": "req-1",
        "end_user": huge,
        "charged": {"tokens": 14, "spend": 7},
        "status": 200,
        "stream": False,
        "client_request_id": None,
        "duration_ms": 1.5,
    }
    stream = io.StringIO()
    logger = logging.getLogger("test_bodies.line")
    with json_lines_to(stream):
        info_line(logger, "proxied", fields)
        logger.info("proxied", extra=fields)
    direct, formatted = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", direct.pop("ts"))
    formatted.pop("ts")
    assert direct == formatted
    assert direct["end_user"] == f"{'u' * 200}...[999800 more characters cut]"


async def test_request_lines_of_one_loop_turn_go_out_in_one_write() -> None:
    class Counting(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = Counting()
    with json_lines_to(stream):
        for n in range(3):
            info_line(logging.getLogger("test_bodies.batch"), "proxied", {"n": n})
        assert stream.getvalue() == ""
        await asyncio.sleep(0)
    assert [orjson.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]
    assert stream.writes == 1


def test_the_request_line_is_a_record_for_any_other_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        info_line(logging.getLogger("test_bodies.record"), "proxied", {"status": 201})
    (record,) = [r for r in caplog.records if r.name == "test_bodies.record"]
    assert record.getMessage() == "proxied" and record.status == 201  # type: ignore[attr-defined]
