"""Shape checks of the OpenAI request bodies the proxy reads and forwards, made before admission.

A body that would make the estimate, the admission or the forwarding fail is a 400 naming the
field (``messages[2].content``), never a 500 after a lease was taken. Only what we read or must
bound is checked: fields we do not know are passed through untouched, since OpenAI adds fields
all the time, and ``null`` is accepted wherever a field is optional, as OpenAI accepts it.

Bounds: ``model`` at most 256 characters; the end-user id (``user``) at most 256 characters,
room for an email or a UUID, because each one becomes a stored customer; ``max_tokens`` and
``max_completion_tokens`` at most 2**31 (no model generates more than a few hundred thousand
tokens); ``n`` 1 to 128 and ``best_of`` 0 to 20, as OpenAI; token ids 0 to 2**31-1. The body
itself is bounded by the server's size limit, which bounds every list.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..errors import EntityError

__all__ = [
    "MAX_END_USER_CHARS",
    "MAX_MODEL_CHARS",
    "MAX_OUTPUT_TOKENS",
    "check_body",
]

MAX_MODEL_CHARS = 256
MAX_END_USER_CHARS = 256
MAX_RESPONSE_ID_CHARS = 256  # an upstream's response id, as a client sends it back
MAX_OUTPUT_TOKENS = 2**31
MAX_CHOICES = 128
MAX_BEST_OF = 20
MAX_TOKEN_ID = 2**31 - 1

# A check takes a present, non-null value and the path that names it in errors.
Check = Callable[[Any, str], None]


def _shown(value: Any) -> str:
    """A value as an error may quote it, in JSON's words: short, whatever the client sent."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str) and len(value) > 40:
        return f'{json.dumps(value[:37])[:-1]}..."'
    return json.dumps(value)


def _bad(param: str, expected: str, value: Any) -> EntityError:
    return EntityError(400, f"{param} must be {expected}, got {_shown(value)}", param)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- check factories and checks of single values -----------------------------------------


def _string(limit: int, what: str, *, empty: bool = False, name: bool = False) -> Check:
    """``name``: the value names something we store and key Redis on (a model, an end
    user), so control characters are refused too."""

    def check(value: Any, param: str) -> None:
        if not isinstance(value, str) or not (value or empty):
            raise _bad(param, f"a {'' if empty else 'non-empty '}string ({what})", value)
        if len(value) > limit:
            raise EntityError(
                400,
                f"{param} must be at most {limit} characters ({what}), got {len(value)}",
                param,
            )
        if name and not value.isprintable():
            raise EntityError(
                400, f"{param} must be printable characters ({what}), got {_shown(value)}", param
            )

    return check


def _whole(low: int, high: int, what: str) -> Check:
    def check(value: Any, param: str) -> None:
        if not _is_whole(value) or not low <= value <= high:
            raise _bad(param, what, value)

    return check


def _boolean(value: Any, param: str) -> None:
    if not isinstance(value, bool):
        raise _bad(param, "true or false", value)


def _text(value: Any, param: str) -> None:
    if not isinstance(value, str):
        raise _bad(param, "a string", value)


def _object(value: Any, param: str) -> None:
    if not isinstance(value, dict):
        raise _bad(param, "an object", value)


def _objects(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _bad(param, "a list of objects", value)
    for i, item in enumerate(value):
        _object(item, f"{param}[{i}]")


def _fields(value: Any, param: str, checks: dict[str, Check], required: tuple[str, ...]) -> None:
    """An object whose listed fields pass their checks; other fields are not looked at."""
    _object(value, param)
    for name in required:
        if value.get(name) is None:
            raise EntityError(400, f"{param}.{name} is required", f"{param}.{name}")
    for name, check in checks.items():
        if value.get(name) is not None:
            check(value[name], f"{param}.{name}")


# -- the structured fields ----------------------------------------------------------------

PART = {"type": _text}
TEXT_PART = {"type": _text, "text": _text}


def _content(value: Any, param: str) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _bad(param, "a string, a list of content parts or null", value)
    for i, part in enumerate(value):
        is_text = isinstance(part, dict) and part.get("type") == "text"
        checks, required = (TEXT_PART, ("type", "text")) if is_text else (PART, ("type",))
        _fields(part, f"{param}[{i}]", checks, required)


MESSAGE: dict[str, Check] = {
    "role": _string(64, "who speaks: system, developer, user, assistant or tool"),
    "content": _content,
    "name": _text,
    "refusal": _text,
    "tool_calls": _objects,
    "function_call": _object,
}


def _messages(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _bad(param, "a list of messages", value)
    for i, message in enumerate(value):
        _fields(message, f"{param}[{i}]", MESSAGE, ("role",))


def _is_token(value: Any) -> bool:
    return _is_whole(value) and 0 <= value <= MAX_TOKEN_ID


def _prompt(value: Any, param: str) -> None:
    """A string, a list of strings, a token array, or a list of token arrays."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _bad(param, "a string, a list of strings or a list of token ids", value)
    for i, item in enumerate(value):
        if isinstance(item, list):
            for j, token in enumerate(item):
                if not _is_token(token):
                    raise _bad(f"{param}[{i}][{j}]", f"a token id from 0 to {MAX_TOKEN_ID}", token)
        elif not isinstance(item, str) and not _is_token(item):
            expected = f"a string, a token id from 0 to {MAX_TOKEN_ID} or a list of token ids"
            raise _bad(f"{param}[{i}]", expected, item)


def _stream_options(value: Any, param: str) -> None:
    _fields(value, param, {"include_usage": _boolean}, ())


def _anthropic_messages(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _bad(param, "a list of messages", value)
    for i, message in enumerate(value):
        _fields(message, f"{param}[{i}]", ANTHROPIC_MESSAGE, ("role", "content"))


def _blocks(value: Any, param: str) -> None:
    """A string, or a list of content blocks, each an object with a type."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _bad(param, "a string or a list of content blocks", value)
    for i, block in enumerate(value):
        _fields(block, f"{param}[{i}]", PART, ("type",))


ANTHROPIC_MESSAGE: dict[str, Check] = {
    "role": _string(64, "who speaks: user or assistant"),
    "content": _blocks,
}


def _system(value: Any, param: str) -> None:
    _blocks(value, param)


def _metadata(value: Any, param: str) -> None:
    _fields(
        value,
        param,
        {"user_id": _string(MAX_END_USER_CHARS, "an end-user id", empty=True, name=True)},
        (),
    )


def _items(value: Any, param: str) -> None:
    """Responses' input: a string or a list of items (messages, tool calls and outputs)."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _bad(param, "a string or a list of input items", value)
    for i, item in enumerate(value):
        _object(item, f"{param}[{i}]")


# -- the table: which fields each kind of request reads, and which it requires ------------

COMMON: dict[str, Check] = {
    "model": _string(MAX_MODEL_CHARS, "the name of a model: see GET /v1/models", name=True),
    # an empty user names no end user, as the proxy reads it
    "user": _string(
        MAX_END_USER_CHARS, "an end-user id such as an email or a UUID", empty=True, name=True
    ),
    "stream": _boolean,
    "stream_options": _stream_options,
}
_output_tokens = _whole(1, MAX_OUTPUT_TOKENS, f"a positive whole number up to {MAX_OUTPUT_TOKENS}")
GENERATION: dict[str, Check] = {
    **COMMON,
    "max_tokens": _output_tokens,
    "max_completion_tokens": _output_tokens,
    "n": _whole(1, MAX_CHOICES, f"a whole number from 1 to {MAX_CHOICES}"),
}
RULES: dict[str, dict[str, Check]] = {
    "chat": {
        **GENERATION,
        "messages": _messages,
        "tools": _objects,
        "functions": _objects,
        "response_format": _object,
    },
    "completion": {
        **GENERATION,
        "prompt": _prompt,
        "suffix": _text,
        "best_of": _whole(0, MAX_BEST_OF, f"a whole number from 0 to {MAX_BEST_OF}"),
    },
    "embedding": {**COMMON, "input": _prompt},
    # Anthropic's Messages: max_tokens is required there, the end user is metadata.user_id
    "messages": {
        **COMMON,
        "max_tokens": _output_tokens,
        "messages": _anthropic_messages,
        "system": _system,
        "tools": _objects,
        "metadata": _metadata,
    },
    # /v1/messages/count_tokens: the same body without max_tokens
    "count_tokens": {
        "model": COMMON["model"],
        "messages": _anthropic_messages,
        "system": _system,
        "tools": _objects,
        "metadata": _metadata,  # its user_id is the end user, as on /v1/messages
    },
    # OpenAI's Responses: input is a string or a list of items
    "responses": {
        **COMMON,
        "input": _items,
        "instructions": _text,
        "tools": _objects,
        "max_output_tokens": _output_tokens,
        "background": _boolean,
        "previous_response_id": _string(
            MAX_RESPONSE_ID_CHARS, "the id of an earlier response", name=True
        ),
        # the end user when ``user`` is not given (surfaces/responses.py)
        "safety_identifier": COMMON["user"],
    },
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("model", "max_tokens", "messages"),
    "count_tokens": ("model", "messages"),
    "responses": ("model",),
    "chat": ("model", "messages"),
    "completion": ("model", "prompt"),
    "embedding": ("model", "input"),
}
HINTS = {
    "model": "name one of GET /v1/models",
    "messages": "send the conversation as a list of messages",
    "prompt": "send the text to complete",
    "input": "send the text to embed",
    "max_tokens": "Anthropic's Messages API requires the most tokens to generate",
}


def check_body(body: Any, kind: str) -> dict[str, Any]:
    """The body of a ``kind`` request ("chat", "completion" or "embedding"), checked; an
    ``EntityError`` 400 naming the first field that is missing or malformed."""
    if not isinstance(body, dict):
        raise EntityError(400, f"the request body must be a JSON object, got {_shown(body)}")
    for name in REQUIRED[kind]:
        if body.get(name) is None:
            raise EntityError(400, f"{name} is required: {HINTS[name]}", name)
    for name, check in RULES[kind].items():
        if body.get(name) is not None:
            check(body[name], name)
    return body
