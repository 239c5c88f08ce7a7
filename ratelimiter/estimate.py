"""Token and cost estimates made before a request is sent, and actual costs after.

Prompt tokens are counted as OpenAI's own rate limiter does: characters / 4. The completion is
``max_tokens`` (or ``max_completion_tokens``, else a configured default) times ``n``: the
most it can be, so a budget holds at least what the request can spend.
"""

from __future__ import annotations

from typing import Any

from .config import Deployment
from .errors import UnknownModel
from .policy import NANO

__all__ = [
    "PRICES",
    "Price",
    "estimate_tokens",
    "model_price",
    "price_of",
    "prompt_chars",
    "register_model",
    "response_cost",
    "text_cost",
    "text_tokens",
]

Price = tuple[float, float]  # dollars per input token, per output token

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


def price_of(deployment: Deployment) -> Price | None:
    if deployment.input_cost_per_token is not None or deployment.output_cost_per_token is not None:
        return (deployment.input_cost_per_token or 0.0, deployment.output_cost_per_token or 0.0)
    name = deployment.model.rsplit("/", 1)[-1]
    return PRICES.get(name) or PRICES.get(deployment.model_name)


def register_model(prices: dict[str, dict[str, float]]) -> None:
    """Prices for models the table lacks, in LiteLLM's shape:
    ``{"my-model": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}``."""
    for name, entry in prices.items():
        PRICES[name] = (
            float(entry.get("input_cost_per_token") or 0.0),
            float(entry.get("output_cost_per_token") or 0.0),
        )


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


def prompt_chars(body: dict[str, Any]) -> int:
    if "messages" in body:
        messages = body["messages"] if isinstance(body["messages"], list) else []
        return sum(len(_text(m.get("content"))) for m in messages if isinstance(m, dict))
    return len(_text(body.get("prompt", body.get("input", ""))))


def estimate_tokens(
    body: dict[str, Any], default_max_tokens: int, *, embedding: bool
) -> tuple[int, int]:
    """(prompt tokens, most completion tokens) for a request body."""
    prompt = -(-prompt_chars(body) // 4)
    if embedding:
        return prompt, 0
    most = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    n = body.get("n") or 1
    return prompt, int(most) * int(n)


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
        text = "".join(
            str(((choice.get("message") or {}).get("content")) or "")
            for choice in data.get("choices") or ()
        )
        completion_tokens = text_tokens(text)
    return model, (prompt or 0) * price[0] + completion_tokens * price[1]
