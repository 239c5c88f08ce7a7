"""``completion`` / ``acompletion`` for any OpenAI-compatible endpoint (the sidecar included),
with LiteLLM's process-wide ``max_budget``.

Set ``ratelimiter.max_budget`` (dollars) and every call is checked before it is sent: its
projected cost (the prompt, plus ``max_tokens`` of completion when given) is reserved against
the budget under a lock, so concurrent threads and tasks cannot pass the budget together; a
call that would pass it raises ``BudgetExceededError`` and sends nothing. After the call the
reservation is replaced by the real cost from the response's usage, which
``ratelimiter._current_cost`` reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp

from ..errors import RateLimiterError, UnknownModel
from ..pricing import model_price, response_cost, text_tokens

__all__ = [
    "APIError",
    "BudgetExceededError",
    "ModelResponse",
    "acompletion",
    "completion",
    "current_cost",
]

DEFAULT_BASE = "https://api.openai.com/v1"
TIMEOUT_S = 600.0


class BudgetExceededError(RateLimiterError):
    """The call would take spend past ``max_budget``; it was not sent. LiteLLM's name and
    attributes."""

    def __init__(
        self,
        current_cost: float,
        max_budget: float,
        projected_cost: float,
        hint: str = "Raise ratelimiter.max_budget to allow it.",
    ) -> None:
        self.current_cost, self.max_budget = current_cost, max_budget
        self.projected_cost = projected_cost
        super().__init__(
            f"Budget has been exceeded! Current cost: {current_cost:.6f}, max budget: "
            f"{max_budget:.6f}; this call would cost up to {projected_cost:.6f}. {hint}"
        )


class APIError(RateLimiterError):
    """The endpoint answered with an error; ``status_code`` and its message."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        super().__init__(f"the model endpoint answered {status_code}: {message}")


class ModelResponse(dict[str, Any]):
    """The JSON of a completion, readable as a dict (``r["model"]``) or by attribute
    (``r.choices[0].message.content``), as LiteLLM's responses are."""

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self[name])
        except KeyError:
            raise AttributeError(name) from None


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return ModelResponse(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class _Spend:
    """What this process spent, and what calls in flight may still spend."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spent = 0.0
        self.reserved = 0.0

    def reserve(self, projected: float) -> None:
        limit = sys.modules["ratelimiter"].max_budget
        with self.lock:
            if limit is not None and self.spent + self.reserved + projected > limit:
                raise BudgetExceededError(self.spent + self.reserved, float(limit), projected)
            self.reserved += projected

    def settle(self, projected: float, actual: float) -> None:
        with self.lock:
            self.reserved -= projected
            self.spent += actual


SPEND = _Spend()


def current_cost() -> float:
    return SPEND.spent


def projected_call_cost(model: str, messages: list[dict[str, Any]], max_tokens: Any) -> float:
    """The prompt's cost plus ``max_tokens`` of completion (none when not given)."""
    price = model_price(model)
    if price is None:
        raise UnknownModel(model)
    prompt = sum(text_tokens(m.get("content")) for m in messages if isinstance(m, dict))
    return prompt * price[0] + int(max_tokens or 0) * price[1]


def _projected(model: str, messages: list[dict[str, Any]], max_tokens: Any) -> float:
    if model_price(model) is None and sys.modules["ratelimiter"].max_budget is None:
        return 0.0  # nothing to check, and the response may still name a priced model
    return projected_call_cost(model, messages, max_tokens)


def _request(
    model: str,
    messages: list[dict[str, Any]],
    api_base: str | None,
    api_key: str | None,
    kwargs: dict[str, Any],
) -> tuple[str, bytes, dict[str, str]]:
    if not isinstance(messages, list):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...}")
    base = api_base or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")
    key = api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": model.split("/", 1)[1] if "/" in model else model, "messages": messages}
    body |= kwargs
    url = f"{(base or DEFAULT_BASE).rstrip('/')}/chat/completions"
    return url, json.dumps(body).encode(), headers


def _answer(status: int, raw: bytes) -> ModelResponse:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if status >= 400 or not isinstance(data, dict):
        message = raw.decode(errors="replace")[:500]
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            message = data["error"].get("message") or message
        raise APIError(status, message)
    return ModelResponse(data)


def _cost(response: ModelResponse, model: str) -> float:
    try:
        return response_cost({**response, "model": response.get("model") or model})[1]
    except UnknownModel:
        return 0.0


@contextlib.contextmanager
def _budgeted(model: str, messages: list[dict[str, Any]], max_tokens: Any) -> Iterator[list[float]]:
    """Reserve the call's projected cost; the caller puts the actual cost in the list."""
    projected = _projected(model, messages, max_tokens)
    SPEND.reserve(projected)
    actual = [0.0]
    try:
        yield actual
    finally:
        SPEND.settle(projected, actual[0])


def completion(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    timeout: float = TIMEOUT_S,
    **kwargs: Any,
) -> ModelResponse:
    """A chat completion from ``api_base`` (else ``OPENAI_BASE_URL``, else OpenAI's API) with
    ``api_key`` (else ``OPENAI_API_KEY``); other keyword arguments go into the request body."""
    with _budgeted(model, messages, kwargs.get("max_tokens")) as actual:
        url, body, headers = _request(model, messages, api_base, api_key, kwargs)
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                status, raw = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise APIError(0, f"cannot reach {url}: {exc}") from None
        response = _answer(status, raw)
        actual[0] = _cost(response, model)
        return response


async def acompletion(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    timeout: float = TIMEOUT_S,
    **kwargs: Any,
) -> ModelResponse:
    """``completion`` for asyncio."""
    with _budgeted(model, messages, kwargs.get("max_tokens")) as actual:
        url, body, headers = _request(model, messages, api_base, api_key, kwargs)
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=client_timeout) as session,
                session.post(url, data=body, headers=headers) as answer,
            ):
                status, raw = answer.status, await answer.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise APIError(0, f"cannot reach {url}: {exc}") from None
        response = _answer(status, raw)
        actual[0] = _cost(response, model)
        return response
