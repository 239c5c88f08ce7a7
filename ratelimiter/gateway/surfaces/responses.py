"""OpenAI's Responses API (``/v1/responses``).

Usage reads as ``input_tokens`` (cached ones included, named in
``input_tokens_details.cached_tokens`` and priced at the cache-read rate) and
``output_tokens`` (reasoning included, named in ``output_tokens_details.reasoning_tokens``).
A stream's usage comes in its last event, ``response.completed`` (or ``response.incomplete``
/ ``response.failed``); a stream cut before it is charged the prompt estimate and the
characters streamed / 4. The completion is bounded by ``max_output_tokens``.

``background: true`` is refused: its usage arrives after the request has ended, so it could
be neither held nor settled. Retrieve, delete, cancel and input items are passed to the
deployment that made the response, for the key that made it (proxy.py keeps who made which
response id).
"""

from __future__ import annotations

from typing import Any

from ...errors import EntityError
from ...pricing import content_pieces, measure
from .base import StreamTally, Surface, response_id

__all__ = ["RESPONSES"]

_DONE = ("response.completed", "response.incomplete", "response.failed")
_DELTAS = (
    "response.output_text.delta",
    "response.refusal.delta",
    "response.function_call_arguments.delta",
    "response.reasoning_summary_text.delta",
    "response.reasoning_text.delta",
)


class Responses(Surface):
    kind = "responses"
    path = "responses"
    bound_fields = ("max_output_tokens",)
    strict_field = "max_output_tokens"

    def check(self, body: Any) -> dict[str, Any]:
        checked = super().check(body)
        if checked.get("background") is True:
            raise EntityError(
                400,
                "background responses are not supported through the rate limiter: their usage "
                "arrives after the request ends, so they could be neither held nor charged; "
                "send the request without background (stream it if it is long)",
                "background",
            )
        return checked

    def estimate(self, body: dict[str, Any], default_max_tokens: int, mode: str) -> tuple[int, int]:
        billed = [body.get(f) for f in ("instructions", "input", "tools", "tool_choice", "text")]
        prompt = measure(content_pieces(billed), mode)
        most = body.get("max_output_tokens")
        return prompt, most if isinstance(most, int) and most > 0 else default_max_tokens

    def end_user(self, body: dict[str, Any]) -> str | None:
        for field in ("user", "safety_identifier"):
            user = body.get(field)
            if isinstance(user, str) and user:
                return user
        return None

    def generated_chars(self, answer: Any) -> int:
        output = answer.get("output") if isinstance(answer, dict) else None
        return _chars(output)

    def unsized_input(self, body: dict[str, Any]) -> bool:
        # a conversation's earlier turns, stored upstream, are billed again as input: held as
        # a request that does not bound itself (capped at what is left, one at a time past a
        # limit), since its size is unknown here
        return body.get("conversation") is not None

    def continues(self, body: dict[str, Any]) -> str | None:
        previous = body.get("previous_response_id")
        return previous if isinstance(previous, str) and previous else None

    def answer_id(self, answer: Any) -> str | None:
        # kept in Redis for retrieval: the upstream's choice, so bounded like any id of its
        return response_id(answer.get("id")) if isinstance(answer, dict) else None

    def event_id(self, event: dict[str, Any]) -> Any:
        response = event.get("response") if event.get("type") == "response.created" else None
        return self.answer_id(response)

    def stream_event(self, tally: StreamTally, event: dict[str, Any], wanted: bool) -> bool:
        kind = event.get("type")
        if kind in _DELTAS:
            delta = event.get("delta")
            tally.chars += len(delta) if isinstance(delta, str) else 0
        elif kind == "response.created":
            tally.extra["id"] = self.answer_id(event.get("response"))
        elif kind in _DONE:
            response = event.get("response")
            if isinstance(response, dict):
                tally.usage, tally.complete = response.get("usage"), True
                tally.extra.setdefault("id", self.answer_id(response))
        return True


def _chars(value: Any) -> int:
    """Characters of generated output items: text, refusals, call arguments, summaries."""
    if isinstance(value, list):
        return sum(map(_chars, value))
    if not isinstance(value, dict):
        return 0
    total = 0
    for name in ("text", "refusal", "arguments"):
        if isinstance(value.get(name), str):
            total += len(value[name])
    for name in ("content", "summary"):
        total += _chars(value.get(name))
    return total


RESPONSES = Responses()
