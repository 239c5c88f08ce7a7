"""OpenAI's chat completions, completions and embeddings: usage in ``usage`` (``prompt_tokens``
including cached ones, named in ``prompt_tokens_details.cached_tokens``), streamed in a final
chunk that is asked for (``stream_options.include_usage``) and, when the client did not ask,
removed before it reaches the client."""

from __future__ import annotations

from typing import Any

from ...pricing import choice_chars, estimate_tokens
from ..config import Deployment
from .base import StreamTally, Surface, _positive

__all__ = ["CHAT", "COMPLETION", "EMBEDDING"]


class Chat(Surface):
    kind = "chat"
    path = "chat/completions"

    def choices(self, body: dict[str, Any]) -> int:
        """Completions generated and billed: n, or best_of when larger (as the estimate
        counts)."""
        return max((body[f] for f in ("n", "best_of") if _positive(body.get(f))), default=1)

    def upstream_body(
        self, body: dict[str, Any], deployment: Deployment, max_tokens: int | None
    ) -> dict[str, Any]:
        # strict enforcement sets max_tokens, not max_completion_tokens: every
        # OpenAI-compatible server honours it, where one that does not know
        # max_completion_tokens would ignore the bound
        forwarded = super().upstream_body(body, deployment, max_tokens)
        if forwarded.get("stream"):
            options = forwarded.get("stream_options")
            forwarded["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        return forwarded

    def wants_usage(self, body: dict[str, Any]) -> bool:
        options = body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def generated_chars(self, answer: Any) -> int:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        return sum(map(choice_chars, choices)) if isinstance(choices, list) else 0

    def stream_event(self, tally: StreamTally, event: dict[str, Any], wanted: bool) -> bool:
        choices = event.get("choices")
        if event.get("usage"):
            tally.usage, tally.complete = event["usage"], True
            if not wanted and not choices:
                return False
        if isinstance(choices, list):
            tally.chars += sum(map(choice_chars, choices))
        return True


class Completion(Chat):
    kind = "completion"
    path = "completions"


class Embedding(Chat):
    kind = "embedding"
    path = "embeddings"

    def estimate(self, body: dict[str, Any], default_max_tokens: int, mode: str) -> tuple[int, int]:
        return estimate_tokens(body, default_max_tokens, embedding=True, mode=mode)

    def bounds_itself(self, body: dict[str, Any]) -> bool:
        return True


CHAT, COMPLETION, EMBEDDING = Chat(), Completion(), Embedding()
