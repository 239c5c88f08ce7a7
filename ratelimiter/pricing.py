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

import functools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from .engine.limits import MAX_AMOUNT
from .errors import EntityError, UnknownModel

__all__ = [
    "IMAGE_TOKENS",
    "NANO",
    "PRICES",
    "PRICE_FIELDS",
    "PROMPT_ESTIMATES",
    "Price",
    "Usage",
    "choice_chars",
    "content_pieces",
    "dollars",
    "estimate_tokens",
    "estimated_cost",
    "measure",
    "model_price",
    "model_provider",
    "nano",
    "price_of",
    "prompt_tokens",
    "provider_models",
    "read_usage",
    "register_model",
    "response_cost",
    "text_cost",
    "text_tokens",
]


class Price(NamedTuple):
    """Dollars per token of each bucket a provider bills. ``cache_read`` and ``cache_write``
    (a 5-minute write; ``cache_write_1h`` a 1-hour one) default to the input rate when
    unknown. ``table``: genai-prices' own price of the model, kept when it is tiered (Claude's
    long-context rates, for one), so that a cost follows its tiers; None for a flat price."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None
    table: Any = None

    def cost(self, usage: Usage) -> int:
        """Nano-dollars of ``usage`` at this price (never raises; may exceed MAX_AMOUNT)."""
        if self.table is not None:
            return _table_cost(self.table, usage)
        read = self.input if self.cache_read is None else self.cache_read
        write = self.input if self.cache_write is None else self.cache_write
        write_1h = write if self.cache_write_1h is None else self.cache_write_1h
        dollars = (
            usage.input * self.input
            + usage.output * self.output
            + usage.cache_read * read
            + (usage.cache_write - usage.cache_write_1h) * write
            + usage.cache_write_1h * write_1h
        )
        return round(dollars * NANO) if math.isfinite(dollars) else MAX_AMOUNT + 1

    @property
    def most_per_prompt_token(self) -> float:
        """The dearest rate a prompt token can be billed at (a cache write can cost more than
        plain input): what an estimate that may write the cache holds per prompt token."""
        rates = (self.input, self.cache_write or 0.0, self.cache_write_1h or 0.0)
        return max(rates)


class Usage(NamedTuple):
    """Tokens of one request as providers bill them. ``input`` is uncached input only (as
    Anthropic reports ``input_tokens``); ``cache_read`` and ``cache_write`` are their own
    buckets (``cache_write_1h`` is the part of ``cache_write`` kept for an hour); ``output``
    includes ``reasoning`` (as OpenAI reports it), which is kept for the ledger only."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0

    @property
    def prompt(self) -> int:
        """Every input token, cached or not."""
        return self.input + self.cache_read + self.cache_write

    @property
    def total(self) -> int:
        return self.prompt + self.output


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

# Prices registered at run time (register_model, LiteLLM's shape), ahead of genai-prices.
PRICES: dict[str, Price] = {}


NANO = 1_000_000_000  # money is integer nano-dollars inside; floats only at the API edge


def nano(dollars: float) -> int:
    """Dollars at the API edge to integer nano-dollars inside."""
    return round(dollars * NANO)


def dollars(amount: int) -> float:
    return amount / NANO


def _rate(entry: Mapping[str, Any], name: str) -> float | None:
    value = entry.get(name)
    return None if value is None else float(value)


def price_of(entry: Mapping[str, Any], fallback: Price | None = None) -> Price | None:
    """A price in LiteLLM's names (``input_cost_per_token``, ``output_cost_per_token``,
    ``cache_read_input_token_cost``, ``cache_creation_input_token_cost``, and
    ``cache_creation_input_token_cost_above_1hr``), or None when it sets none of them. What it
    does not set comes from ``fallback`` (the maintained price of the same model), else 0 for
    output and the input rate for the cache buckets. A price set here is flat: the fallback's
    tiers do not apply."""
    rates = {name: _rate(entry, field) for field, name in _LITELLM_FIELDS.items()}
    if all(v is None for v in rates.values()):
        return None
    base = fallback._replace(table=None) if fallback is not None else None
    merged = {
        name: (value if value is not None else (getattr(base, name) if base else None))
        for name, value in rates.items()
    }
    return Price(
        input=merged["input"] or 0.0,
        output=merged["output"] or 0.0,
        cache_read=merged["cache_read"],
        cache_write=merged["cache_write"],
        cache_write_1h=merged["cache_write_1h"],
    )


_LITELLM_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
}
PRICE_FIELDS = tuple(_LITELLM_FIELDS)


def register_model(prices: dict[str, dict[str, float]]) -> None:
    """Prices for models genai-prices lacks (or to replace its price), in LiteLLM's shape:
    ``{"my-model": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}``."""
    for name, entry in prices.items():
        price = price_of(entry) or Price(0.0, 0.0)
        PRICES[name] = price


def model_provider(model: str) -> str | None:
    """The provider genai-prices names for a model (``gpt-4o``: openai), or None."""
    found = _maintained(model)
    return found[0] if found else None


def model_price(model: str) -> Price | None:
    """The price of a model by name, with or without its provider (``openai/gpt-4o``): a
    registered one first, else genai-prices' current price (bundled data, no network)."""
    for name in (model, model.split("/", 1)[-1]):
        if name in PRICES:
            return PRICES[name]
    found = _maintained(model)
    return found[1] if found else None


def provider_models(provider: str) -> list[str]:
    """Plain model names genai-prices knows for a provider (what a ``provider/*`` wildcard
    lists), sorted; patterns and fine-tune prefixes are left out."""
    from genai_prices import data_snapshot

    for known in data_snapshot.get_snapshot().providers:
        if known.id == provider:
            return sorted(m.id for m in known.models if _PLAIN.fullmatch(m.id))
    return []


_PLAIN = re.compile(r"[a-z0-9][a-z0-9.\-]*[a-z0-9]")


@functools.lru_cache(maxsize=4096)
def _maintained(model: str) -> tuple[str, Price] | None:
    """(provider id, price) from genai-prices, whose lookup matches dated snapshots and
    aliases; ``provider/model`` names the provider."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    provider, slash, name = model.partition("/")
    attempts = [(name, provider), (name, None)] if slash else [(model, None)]
    for ref, provider_id in attempts:
        try:
            found, info = snapshot.find_provider_model(ref, None, provider_id, None)
        except LookupError:
            continue
        table = info.get_prices(datetime.now(UTC))
        return found.id, _from_table(table)
    return None


def _from_table(table: Any) -> Price:
    def base(name: str) -> float | None:
        value = getattr(table, name, None)
        if value is None:
            return None
        value = getattr(value, "base", value)  # a tiered price: its first tier
        return float(value) / 1_000_000

    tiered = any(
        hasattr(getattr(table, name, None), "tiers")
        for name in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
    )
    return Price(
        input=base("input_mtok") or 0.0,
        output=base("output_mtok") or 0.0,
        cache_read=base("cache_read_mtok"),
        cache_write=base("cache_write_mtok"),
        cache_write_1h=base("cache_write_1h_mtok"),
        table=table if tiered else None,
    )


def _table_cost(table: Any, usage: Usage) -> int:
    from genai_prices import Usage as Counted

    counted = Counted(
        input_tokens=usage.prompt,
        output_tokens=usage.output,
        cache_read_tokens=usage.cache_read,
        cache_write_tokens=usage.cache_write,
        cache_write_1h_tokens=usage.cache_write_1h,
    )
    return int((table.calc_price(counted)["total_price"] * NANO).to_integral_value())


def text_tokens(content: Any) -> int:
    """Tokens of a message content (text or a list of parts), counted as chars / 4."""
    return -(-len(_text(content)) // 4)


def cost_nano(
    price: Price | tuple[float, float] | None, prompt_tokens: int, completion_tokens: int
) -> int:
    """Nano-dollars of uncached prompt and completion tokens at ``price``."""
    if price is None:
        return 0
    if not isinstance(price, Price):
        price = Price(*price)
    return price.cost(Usage(input=prompt_tokens, output=completion_tokens))


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
    return measure(_billed(body), mode)


# Anthropic bills an image as width x height / 750 tokens after scaling it to at most about
# 1.15 megapixels: about 1600 tokens at most.
ANTHROPIC_IMAGE_TOKENS = 1600
_IMAGES = {"image": ANTHROPIC_IMAGE_TOKENS, "input_image": IMAGE_TOKENS, "image_url": IMAGE_TOKENS}
# Keys whose values are ids, markers or switches, not text the model reads.
_NOT_BILLED = frozenset({"type", "id", "call_id", "tool_use_id", "cache_control", "signature"})


def content_pieces(value: Any) -> Iterator[Piece]:
    """Every piece of billed input inside the fields of an Anthropic Messages or a Responses
    request, whatever their shape: text (strings, and numbers as written), images at the most
    one costs, and nothing for ids and markers (``type``, ``cache_control``…). Documents and
    files count as their JSON text (base64 included), more than they bill."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        image = _IMAGES.get(value.get("type")) if isinstance(value.get("type"), str) else None
        if image is not None:
            yield image
            return
        for name, inner in value.items():
            if name not in _NOT_BILLED:
                yield from content_pieces(inner)
    elif isinstance(value, list):
        yield MESSAGE_TOKENS * sum(isinstance(v, dict) and "role" in v for v in value)
        for item in value:
            yield from content_pieces(item)
    elif value is not None:
        yield _json(value)


def measure(pieces: Iterable[Piece], mode: str = "chars") -> int:
    """Tokens of pieces of input: text by ``mode``, counted pieces as they are."""
    if mode not in PROMPT_ESTIMATES:
        raise ValueError(f"prompt estimate mode must be one of {PROMPT_ESTIMATES}, got {mode!r}")
    size = counted = 0
    for piece in pieces:
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


def estimated_cost(
    price: Price | None, prompt: int, most: int, *, writes_cache: bool = False
) -> int:
    """Nano-dollars a request can cost at most, checked to fit the engine: past 2**53-1
    nano-dollars (about $9.0M) it is a 400 that says what to lower. ``writes_cache``: the
    request marks its prompt for caching (Anthropic's ``cache_control``), so every prompt
    token may be billed as a cache write, which costs more than plain input."""
    if price is None:
        return 0
    if not isinstance(price, Price):
        price = Price(*price)
    usages = [Usage(input=prompt, output=most)]
    if writes_cache:
        usages += [
            Usage(cache_write=prompt, output=most),
            Usage(cache_write=prompt, cache_write_1h=prompt, output=most),
        ]
    cost = max(price.cost(u) for u in usages)
    if cost <= MAX_AMOUNT:
        return cost
    ceiling = MAX_AMOUNT / NANO
    rate = price.most_per_prompt_token if writes_cache else price.input
    left = ceiling - prompt * rate
    fix = (
        "lower max_tokens (or max_completion_tokens) x n to at most "
        f"{math.floor(left / price.output)}"
        if left > 0 and price.output > 0
        else "shorten the prompt"
    )
    most_dollars = cost / NANO
    raise EntityError(
        400,
        f"this request could cost up to ${most_dollars:,.2f} ({prompt} prompt tokens and up to "
        f"{most} completion tokens), more than the ${ceiling:,.2f} a budget can hold: {fix}",
        "max_tokens",
    )


# Usage past this is not a real request's (and would not fit the engine): a broken upstream.
MAX_REPORTED_TOKENS = 2**31


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_REPORTED_TOKENS else None


def read_usage(usage: Any, flavor: str = "auto") -> Usage | None:
    """A provider's ``usage`` object as billed buckets, or None when it is absent or malformed
    (not an object, not whole numbers, negative, absurd).

    ``openai`` (chat and completions: ``prompt_tokens``; Responses: ``input_tokens``): the
    input count includes cached tokens, named in ``*_tokens_details.cached_tokens``; reasoning
    tokens are part of the output. ``anthropic``: ``input_tokens`` excludes the cache, whose
    reads (``cache_read_input_tokens``) and writes (``cache_creation_input_tokens``, split by
    ``cache_creation.ephemeral_{5m,1h}_input_tokens``) are separate buckets. ``auto`` takes
    Anthropic's reading when its cache fields are there or ``input_tokens`` comes without
    OpenAI's details (the two readings agree when there is no cache)."""
    if not isinstance(usage, Mapping):
        return None
    if flavor == "auto":
        anthropic = "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage
        flavor = "anthropic" if anthropic else "openai"
    if flavor == "anthropic":
        counts = [
            _count(usage.get(name, 0) or 0)
            for name in (
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            )
        ]
        if "input_tokens" not in usage or any(c is None for c in counts):
            return None
        plain, output, read, write = counts
        split = usage.get("cache_creation")
        hour = (
            _count(split.get("ephemeral_1h_input_tokens", 0) or 0)
            if isinstance(split, Mapping)
            else 0
        )
        return Usage(plain, output, read, write, min(hour or 0, write))
    prompt_name = "input_tokens" if "input_tokens" in usage else "prompt_tokens"
    output_name = "output_tokens" if prompt_name == "input_tokens" else "completion_tokens"
    prompt, output = _count(usage.get(prompt_name)), _count(usage.get(output_name, 0) or 0)
    if prompt is None or output is None:
        return None
    details = usage.get(prompt_name.replace("_tokens", "_tokens_details"))
    cached = _count(details.get("cached_tokens") or 0) if isinstance(details, Mapping) else 0
    done = usage.get(output_name.replace("_tokens", "_tokens_details"))
    reasoning = _count(done.get("reasoning_tokens") or 0) if isinstance(done, Mapping) else 0
    cached = min(cached or 0, prompt)
    return Usage(prompt - cached, output, cached, 0, 0, min(reasoning or 0, output))


def text_cost(model: str, input_text: str, output_text: str) -> float:
    price = model_price(model)
    if price is None:
        raise UnknownModel(model)
    usage = Usage(input=text_tokens(input_text), output=text_tokens(output_text))
    return dollars(price.cost(usage))


def response_cost(completion: Any) -> tuple[str, float]:
    """(model, dollars) of an answer: a chat completion, a Responses API response or an
    Anthropic message, as a dict, an SDK object or our ``ModelResponse``; priced from its
    usage with cached input at its own rate (as the sidecar prices it), else from its text."""
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
    counted = read_usage(usage)
    if counted is None or usage.get("completion_tokens", usage.get("output_tokens")) is None:
        choices = data.get("choices")
        chars = sum(choice_chars(c) for c in choices) if isinstance(choices, list) else 0
        prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens"))) or 0
        counted = Usage(input=prompt, output=-(-chars // 4))
    return model, dollars(price.cost(counted))


# A message or delta with no other fields than these has no characters beyond its content.
_TEXT_ONLY = frozenset(("role", "content"))


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
        content = part.get("content")
        if isinstance(content, str):
            total += len(content)
        if part.keys() <= _TEXT_ONLY:  # a streamed chunk's delta, mostly: nothing more to count
            continue
        total += _chars(part.get("refusal"))
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
