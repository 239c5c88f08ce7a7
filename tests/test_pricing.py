"""The estimate counts every billed byte: each kind of input, the bytes upper bound, exact token
arrays, and a cost the engine cannot hold as a 400 (issue 13, item 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from ratelimiter import pricing
from ratelimiter.engine.limits import MAX_AMOUNT
from ratelimiter.errors import EntityError
from ratelimiter.gateway.config import ConfigError, load_config
from ratelimiter.pricing import estimate_tokens

USER = {"role": "user", "content": "hello"}
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "d" * 4000,
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}


def prompt(body: dict[str, Any]) -> int:
    return estimate_tokens(body, 16, embedding=False)[0]


def test_400_kb_of_tools_is_at_least_100k_tokens() -> None:
    body = {"model": "m", "messages": [USER], "tools": [TOOL] * 100}
    assert len(orjson.dumps(body["tools"])) >= 400_000
    assert prompt(body) >= 100_000


# Each row adds one kind of billed input to a small request: the estimate must grow by at least
# the characters / 4 of what was added.
ADDED = "a" * 400  # 100 tokens
KINDS = {
    "text part": {
        "messages": [USER, {"role": "user", "content": [{"type": "text", "text": ADDED}]}]
    },
    "message name": {"messages": [USER, {"role": "user", "name": ADDED, "content": ""}]},
    "tool call arguments": {
        "messages": [
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ADDED}}
                ],
            },
        ]
    },
    "tool call name": {
        "messages": [
            USER,
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": ADDED, "arguments": ""}}],
            },
        ]
    },
    "legacy function_call": {
        "messages": [
            USER,
            {"role": "assistant", "function_call": {"name": "f", "arguments": ADDED}},
        ]
    },
    "tools": {"messages": [USER], "tools": [{"type": "function", "function": {"name": ADDED}}]},
    "functions": {"messages": [USER], "functions": [{"name": "f", "description": ADDED}]},
    "response_format schema": {
        "messages": [USER],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"description": ADDED}},
        },
    },
    "prompt string": {"prompt": ADDED},
    "prompt list": {"prompt": ["a" * 200, "a" * 200]},
    "completion suffix": {"prompt": "", "suffix": ADDED},
}


@pytest.mark.parametrize("added", KINDS.values(), ids=KINDS.keys())
def test_each_kind_of_input_is_counted(added: dict[str, Any]) -> None:
    base = {"model": "m", "messages": [USER]} if "messages" in added else {"model": "m"}
    assert prompt({"model": "m", **added}) >= prompt(base) + 100


def test_an_image_counts_its_documented_estimate() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    two = {"messages": [{"role": "user", "content": [image, image]}]}
    none = {"messages": [{"role": "user", "content": []}]}
    assert prompt(two) - prompt(none) == 2 * pricing.IMAGE_TOKENS == 2 * 1445


def test_audio_and_file_parts_count_their_data() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 4000, "format": "wav"}}
    assert prompt({"messages": [{"role": "user", "content": [audio]}]}) >= 1000


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        ([1, 2, 3], 3),
        ([[1, 2, 3], [4, 5]], 5),
        ([list(range(1000))] * 3, 3000),
    ],
)
@pytest.mark.parametrize("field", ["prompt", "input"])
@pytest.mark.parametrize("mode", ["chars", "bytes"])
def test_token_arrays_count_one_token_per_id(
    value: list[Any], tokens: int, field: str, mode: str
) -> None:
    body = {"model": "m", field: value}
    assert estimate_tokens(body, 16, embedding=field == "input", mode=mode)[0] == tokens


@pytest.mark.parametrize("value", ["a" * 400, ["a" * 200, "a" * 200]], ids=["string", "list"])
def test_embedding_inputs_are_counted(value: str | list[str]) -> None:
    assert estimate_tokens({"model": "m", "input": value}, 16, embedding=True) == (100, 0)


def test_bytes_mode_is_at_least_the_byte_count() -> None:
    text = "naïve 日本語 🚀 " * 50
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        "tools": [TOOL],
    }
    billed = len(text.encode()) + len(orjson.dumps(body["tools"]))
    chars, _ = estimate_tokens(body, 16, embedding=False)
    in_bytes, _ = estimate_tokens(body, 16, embedding=False, mode="bytes")
    assert in_bytes >= billed > chars * 2
    with pytest.raises(ValueError, match="chars"):
        estimate_tokens(body, 16, embedding=False, mode="words")


def test_the_completion_is_the_most_it_can_be() -> None:
    body = {"model": "m", "prompt": "", "max_tokens": 10, "n": 3}
    assert estimate_tokens(body, 16, embedding=False)[1] == 30
    assert estimate_tokens({**body, "best_of": 5}, 16, embedding=False)[1] == 50
    assert estimate_tokens({**body, "max_completion_tokens": 7}, 16, embedding=False)[1] == 21
    assert estimate_tokens({"model": "m", "prompt": ""}, 16, embedding=False)[1] == 16


def test_a_cost_past_the_engine_is_a_400_saying_what_to_lower() -> None:
    price = (1e-6, 60e-6)
    assert pricing.estimated_cost(price, 1000, 100) == 7_000_000  # $0.007
    assert pricing.estimated_cost(None, 10**9, 10**9) == 0
    with pytest.raises(EntityError) as raised:
        pricing.estimated_cost(price, 1000, 2**31 * 128)
    error = raised.value
    assert (error.status, error.param) == (400, "max_tokens")
    fits = int(str(error).rsplit(" ", 1)[-1])
    assert "more than the $9,007,199.25 a budget can hold" in str(error)
    assert pricing.estimated_cost(price, 1000, fits) <= MAX_AMOUNT
    with pytest.raises(EntityError, match="shorten the prompt"):
        pricing.estimated_cost((1.0, 1.0), 10**7, 1)


CONFIG = """
general_settings:
  master_key: sk-9f2c1e7a4b6d8e0f1a3c
ratelimiter_settings:
"""


def load(tmp_path: Path, settings: str) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + settings)
    return load_config(path, env={})


def test_prompt_estimate_setting(tmp_path: Path) -> None:
    assert load(tmp_path, "  default_max_tokens: 8\n").prompt_estimate == "chars"
    assert load(tmp_path, "  prompt_estimate: bytes\n").prompt_estimate == "bytes"
    with pytest.raises(ConfigError, match=r"prompt_estimate: must be chars .* or bytes"):
        load(tmp_path, "  prompt_estimate: tokens\n")


@pytest.mark.parametrize(
    "settings",
    ["  default_max_tokens: 4294967296\n", "  upstream_timeout: .nan\n", "  lease_ttl: .inf\n"],
)
def test_numbers_the_estimate_cannot_use_are_refused(tmp_path: Path, settings: str) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, settings)


def test_generated_characters_of_every_kind_of_choice() -> None:
    from ratelimiter.pricing import choice_chars

    call = {"function": {"name": "f", "arguments": '{"a": 1}'}}
    assert choice_chars({"text": "abcd"}) == 4  # a completion
    assert choice_chars({"message": {"content": "ab", "tool_calls": [call, "junk"]}}) == 11
    assert choice_chars({"delta": {"function_call": {"arguments": "xyz"}}}) == 3
    assert choice_chars({"delta": {"refusal": "no"}}) == 2
    assert choice_chars(5) == choice_chars({"message": 5}) == 0
