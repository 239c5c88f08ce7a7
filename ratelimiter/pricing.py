"""Token and cost estimates made before a request is sent, and actual costs after.

The prompt estimate counts everything a provider bills as input: every message (its role, name,
text parts, tool calls and legacy function call), tool and function definitions, the
``response_format`` schema, a completion's ``prompt`` and ``suffix`` and an embedding's
``input``. Text counts as characters / 4 by default, as OpenAI's own rate limiter does; mode
``bytes`` counts one token per UTF-8 byte, an upper bound since every BPE token is at least one
byte. Token arrays (``prompt``/``input`` given as token ids) count one token per id, exactly.
Fixed overheads follow OpenAI's cookbook: 3 tokens a message, 3 to prime the reply, and 19 per
tool or function definition (7 to open it, 12 to close the list). See ``IMAGE_TOKENS`` for
images. Parts of other types (audio, files) count as their JSON text, which is usually more than
they bill; a file sent by id counts only its JSON, so it can be under-counted.

The completion is ``max_tokens`` (or ``max_completion_tokens``, else a configured default) times
``n`` (or ``best_of``, when larger): the most it can be, so a budget holds at least what the
request can spend.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson

from .engine.limits import MAX_AMOUNT
from .errors import EntityError, UnknownModel

__all__ = [
    "IMAGE_TOKENS",
    "NANO",
    "PRICES",
    "PROMPT_ESTIMATES",
    "Price",
    "choice_chars",
    "dollars",
    "estimate_tokens",
    "estimated_cost",
    "model_price",
    "model_provider",
    "nano",
    "prompt_tokens",
    "register_model",
    "response_cost",
    "text_cost",
    "text_tokens",
]

Price = tuple[float, float]  # dollars per input token, per output token

PROMPT_ESTIMATES = ("chars", "bytes")

IMAGE_TOKENS = 1445
"""Tokens counted for each image part, whatever its size or ``detail``: the most one image
costs on GPT-4o. A ``high`` detail image is scaled to fit 2048 x 2048, then its shortest side to
768 px, and billed 85 tokens plus 170 per 512 px tile; the largest case, 768 x 2048, is 2 x 4
tiles: 85 + 170 x 8 = 1445 (a ``low`` detail image is 85). Models that bill an image as more
tokens at a lower price (``gpt-4o-mini`` counts about 33 times as many) are under-counted."""

MESSAGE_TOKENS = 3  # <|start|>, the separator after the role, <|end|>
REPLY_TOKENS = 3  # the assistant turn every reply is primed with
TOOL_TOKENS = 19  # 7 to open a definition and 12 to close the list, counted for each one

# Public list prices of well-known models (dollars per token), used when a deployment sets
# none. Operators with other prices set input_cost_per_token / output_cost_per_token.
PRICES: dict[str, Price] = {
    "gpt-4o": (2.5e-6, 10e-6),
    "gpt-4o-mini": (0.15e-6, 0.6e-6),
    "gpt-4.1": (2e-6, 8e-6),
    "gpt-4.1-mini": (0.4e-6, 1.6e-6),
    "gpt-4.1-nano": (0.1e-6, 0.4e-6),
    "o3-mini": (1.1e-6, 4.4e-6),
    "gpt-3.5-turbo": (0.5e-6, 1.5e-6),
    "gpt-4": (30e-6, 60e-6),
    "gpt-4-turbo": (10e-6, 30e-6),
    "text-embedding-3-small": (0.02e-6, 0.0),
    "text-embedding-3-large": (0.13e-6, 0.0),
    "text-embedding-ada-002": (0.1e-6, 0.0),
    "claude-3-5-sonnet": (3e-6, 15e-6),
    "claude-3-5-haiku": (0.8e-6, 4e-6),
}


NANO = 1_000_000_000  # money is integer nano-dollars inside; floats only at the API edge


def nano(dollars: float) -> int:
    """Dollars at the API edge to integer nano-dollars inside."""
    return round(dollars * NANO)


def dollars(amount: int) -> float:
    return amount / NANO


def register_model(prices: dict[str, dict[str, float]]) -> None:
    """Prices for models the table lacks, in LiteLLM's shape:
    ``{"my-model": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}``."""
    for name, entry in prices.items():
        PRICES[name] = (
            float(entry.get("input_cost_per_token") or 0.0),
            float(entry.get("output_cost_per_token") or 0.0),
        )


# The provider of each family of the table's models, by name prefix (what serves ``openai/*``).
PROVIDERS = {
    "gpt-": "openai",
    "o1": "openai",
    "o3": "openai",
    "o4": "openai",
    "text-embedding-": "openai",
    "claude-": "anthropic",
}


def model_provider(model: str) -> str | None:
    """The provider of a model of the price table (``gpt-4o``: openai), or None."""
    base = model.split("/", 1)[-1]
    return next((p for prefix, p in PROVIDERS.items() if base.startswith(prefix)), None)


def model_price(model: str) -> Price | None:
    """The price of a model by name, with or without its provider (``openai/gpt-4o``), and
    of a dated snapshot (``gpt-4o-2024-08-06``) by its family's price."""
    for name in (model, model.split("/", 1)[-1]):
        if name in PRICES:
            return PRICES[name]
    base = model.split("/", 1)[-1]
    family = max((n for n in PRICES if base.startswith(n + "-")), key=len, default=None)
    return PRICES[family] if family else None


def text_tokens(content: Any) -> int:
    """Tokens of a message content (text or a list of parts), counted as chars / 4."""
    return -(-len(_text(content)) // 4)


def cost_nano(price: Price | None, prompt_tokens: int, completion_tokens: int) -> int:
    if price is None:
        return 0
    return round((prompt_tokens * price[0] + completion_tokens * price[1]) * NANO)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...] and token lists
        return "".join(
            _text(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


# What a request bills as input: text to measure (str), or tokens already counted (int).
Piece = str | int


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:  # a library caller's value JSON cannot hold (an int > 2**64)
        return str(value)


def _part(part: Any) -> Iterator[Piece]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        yield part["text"]
    elif kind in ("image_url", "input_image"):
        yield IMAGE_TOKENS
    else:  # audio, files, shapes we do not know: their JSON, more than they bill
        yield part if isinstance(part, str) else _json(part)


def _call(call: Any) -> Piece:
    """A tool call or legacy function call: its name and arguments (or a custom tool's input)."""
    inner = (call.get("function") or call.get("custom")) if isinstance(call, dict) else None
    target = inner if isinstance(inner, dict) else call
    if isinstance(target, dict) and set(target) <= {"name", "arguments", "input"}:
        return "".join(str(v) for v in target.values())
    return _json(call)


def _message(message: Any) -> Iterator[Piece]:
    if not isinstance(message, dict):
        yield _json(message)
        return
    yield MESSAGE_TOKENS
    for field in ("role", "name", "refusal"):
        if isinstance(message.get(field), str):
            yield message[field]
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            yield from _part(part)
    elif content is not None:
        yield content if isinstance(content, str) else _json(content)
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        yield _call(call)
    if message.get("function_call") is not None:
        yield _call(message["function_call"])


def _prompt(prompt: Any) -> Iterator[Piece]:
    """A prompt or an embedding input: a string, a token array, or a list of either."""
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, int) and not isinstance(prompt, bool):
        yield 1  # one token id
    elif isinstance(prompt, list):
        for item in prompt:
            yield from _prompt(item)
    elif prompt is not None:
        yield _json(prompt)


def _billed(body: dict[str, Any]) -> Iterator[Piece]:
    messages = body.get("messages")
    if isinstance(messages, list):
        yield REPLY_TOKENS
        for message in messages:
            yield from _message(message)
    for field in ("tools", "functions"):
        definitions = body.get(field)
        if isinstance(definitions, list):
            yield TOOL_TOKENS * len(definitions)
        if definitions is not None:
            yield _json(definitions)
    if body.get("response_format") is not None:
        yield _json(body["response_format"])
    for field in ("prompt", "suffix", "input"):
        yield from _prompt(body.get(field))


def _size(text: str, mode: str) -> int:
    return len(text) if mode == "chars" or text.isascii() else len(text.encode())


def prompt_tokens(body: dict[str, Any], mode: str = "chars") -> int:
    """Tokens a request bills as input, estimated: text as characters / 4 (``chars``) or as
    one token per UTF-8 byte (``bytes``, an upper bound), token ids and images as counted."""
    if mode not in PROMPT_ESTIMATES:
        raise ValueError(f"prompt estimate mode must be one of {PROMPT_ESTIMATES}, got {mode!r}")
    size = counted = 0
    for piece in _billed(body):
        if isinstance(piece, str):
            size += _size(piece, mode)
        else:
            counted += piece
    return (-(-size // 4) if mode == "chars" else size) + counted


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def estimate_tokens(
    body: dict[str, Any], default_max_tokens: int, *, embedding: bool, mode: str = "chars"
) -> tuple[int, int]:
    """(prompt tokens, most completion tokens) for a request body."""
    prompt = prompt_tokens(body, mode)
    if embedding:
        return prompt, 0
    most = (
        _whole(body.get("max_completion_tokens"))
        or _whole(body.get("max_tokens"))
        or default_max_tokens
    )
    # best_of generates that many candidates server-side, each billed
    choices = max(_whole(body.get("n")) or 1, _whole(body.get("best_of")) or 1)
    return prompt, most * choices


def estimated_cost(price: Price | None, prompt: int, most: int) -> int:
    """Nano-dollars a request can cost at most, checked to fit the engine: past 2**53-1
    nano-dollars (about $9.0M) it is a 400 that says what to lower."""
    if price is None:
        return 0
    most_dollars = prompt * price[0] + most * price[1]
    if math.isfinite(most_dollars) and most_dollars * NANO <= MAX_AMOUNT:
        return round(most_dollars * NANO)
    ceiling = MAX_AMOUNT / NANO
    left = ceiling - prompt * price[0]
    fix = (
        f"lower max_tokens (or max_completion_tokens) x n to at most {math.floor(left / price[1])}"
        if left > 0 and price[1] > 0
        else "shorten the prompt"
    )
    raise EntityError(
        400,
        f"this request could cost up to ${most_dollars:,.2f} ({prompt} prompt tokens and up to "
        f"{most} completion tokens), more than the ${ceiling:,.2f} a budget can hold: {fix}",
        "max_tokens",
    )


def text_cost(model: str, input_text: str, output_text: str) -> float:
    price = model_price(model)
    if price is None:
        raise UnknownModel(model)
    return text_tokens(input_text) * price[0] + text_tokens(output_text) * price[1]


def response_cost(completion: Any) -> tuple[str, float]:
    """(model, dollars) of a chat completion: a dict, an OpenAI SDK object or our
    ``ModelResponse``; priced from its usage, else from its text."""
    data = completion.model_dump() if hasattr(completion, "model_dump") else dict(completion)
    model = data.get("model")
    if not isinstance(model, str):
        raise ValueError("the completion object has no 'model': pass a chat completion response")
    price = model_price(model)
    if price is None:
        raise UnknownModel(model)
    usage = data.get("usage") or {}
    if not hasattr(usage, "get"):
        usage = usage.model_dump() if hasattr(usage, "model_dump") else vars(usage)
    prompt, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if completion_tokens is None:
        choices = data.get("choices")
        chars = sum(choice_chars(c) for c in choices) if isinstance(choices, list) else 0
        completion_tokens = -(-chars // 4)
    return model, (prompt or 0) * price[0] + completion_tokens * price[1]


def choice_chars(choice: Any) -> int:
    """Characters a provider generated in one choice of an answer or of a streamed chunk:
    completion text, message or delta content and refusal, tool-call and function-call
    arguments; whatever the shape (an upstream's answer is not trusted)."""
    if not isinstance(choice, dict):
        return 0
    total = _chars(choice.get("text"))
    for part in (choice.get("message"), choice.get("delta")):
        if not isinstance(part, dict):
            continue
        total += _chars(part.get("content")) + _chars(part.get("refusal"))
        calls = part.get("tool_calls")
        functions = (
            [c.get("function") for c in calls if isinstance(c, dict)]
            if isinstance(calls, list)
            else []
        )
        for function in [*functions, part.get("function_call")]:
            if isinstance(function, dict):
                total += _chars(function.get("name")) + _chars(function.get("arguments"))
    return total


def _chars(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0
