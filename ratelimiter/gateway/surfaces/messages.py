"""Anthropic's Messages API (``/v1/messages``), as Claude Code and Anthropic's SDKs send it.

Usage reads as Anthropic reports it: ``input_tokens`` excludes the cache, whose reads
(``cache_read_input_tokens``) and writes (``cache_creation_input_tokens``, 5-minute and
1-hour) are separate buckets at their own prices. A stream's ``message_start`` carries the
input usage and ``message_delta`` the output (cumulative); a stream cut before
``message_stop`` is charged its input and at least the characters streamed / 4.

Requests go to deployments whose upstream speaks Messages (``model: anthropic/…``), with the
deployment's key as ``x-api-key`` and the client's ``anthropic-version``/``anthropic-beta``
passed through. A Messages request for a model served only in OpenAI's format is a 400: there
is no translation between the two formats.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ...engine import Decision
from ...engine.limits import Concurrency, Gate, Limit, SlidingWindow
from ...errors import EntityError
from ...pricing import Usage, content_pieces, measure
from ...responses import HeaderTemplate, anthropic_error, anthropic_rate_headers, refusal
from ..config import Deployment
from .base import StreamTally, Surface

__all__ = ["ANTHROPIC_VERSION", "COUNT_TOKENS", "MESSAGES"]

ANTHROPIC_VERSION = "2023-06-01"
# Anthropic adds a system prompt of its own when tools are given: 346 tokens for "auto" or
# "none" tool choice, 313 for "any"/"tool"; the larger is held.
TOOL_SYSTEM_TOKENS = 346
# Headers of the client's request passed to the upstream as they are.
PASSED = ("anthropic-version", "anthropic-beta")
# The headers a refusal keeps from OpenAI's form of it.
REFUSAL_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry", "rate_limit_type")


class Messages(Surface):
    kind = "messages"
    path = "messages"
    flavor = "anthropic"
    bound_fields = ("max_tokens",)
    strict_field = "max_tokens"

    def estimate(self, body: dict[str, Any], default_max_tokens: int, mode: str) -> tuple[int, int]:
        billed = [body.get(f) for f in ("system", "messages", "tools", "tool_choice")]
        prompt = measure(content_pieces(billed), mode)
        if body.get("tools"):
            prompt += TOOL_SYSTEM_TOKENS
        most = body.get("max_tokens")
        return prompt, most if isinstance(most, int) and most > 0 else default_max_tokens

    def writes_cache(self, body: dict[str, Any]) -> bool:
        # a cache_control marker anywhere (system, messages, tools) may write the cache
        return b'"cache_control"' in orjson.dumps(body)

    def end_user(self, body: dict[str, Any]) -> str | None:
        metadata = body.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
        return user if isinstance(user, str) and user else None

    def check_deployment(self, deployment: Deployment) -> None:
        if not deployment.speaks_anthropic:
            raise EntityError(
                400,
                f"model {deployment.model_name!r} is served by an OpenAI-format upstream "
                f"({deployment.model}); /v1/messages reaches only Anthropic-format deployments "
                "(model: anthropic/...): call /v1/chat/completions for this model",
                "model",
            )

    def upstream_headers(self, request: web.Request, deployment: Deployment) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        for name in PASSED:
            if name in request.headers:
                headers[name] = request.headers[name]
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
        return headers

    def generated_chars(self, answer: Any) -> int:
        content = answer.get("content") if isinstance(answer, dict) else None
        return sum(map(_block_chars, content)) if isinstance(content, list) else 0

    def event_id(self, event: dict[str, Any]) -> Any:
        message = event.get("message") if event.get("type") == "message_start" else None
        return message.get("id") if isinstance(message, dict) else None

    def stream_event(self, tally: StreamTally, event: dict[str, Any], wanted: bool) -> bool:
        kind = event.get("type")
        if kind == "content_block_delta":
            tally.chars += _block_chars(event.get("delta"))
        elif kind == "content_block_start":
            tally.chars += _block_chars(event.get("content_block"))
        elif kind == "message_start":
            message = event.get("message")
            tally.add_usage(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            tally.add_usage(event.get("usage"))
        elif kind == "message_stop":
            tally.complete = True
        return True

    def rate_headers(
        self, decision: Decision, request_id: str, template: HeaderTemplate | None = None
    ) -> dict[str, str]:
        return anthropic_rate_headers(decision, request_id, template)

    def refusal(self, decision: Decision, request_id: str, hint: str = "") -> web.Response:
        made = refusal(decision, request_id, hint)
        headers = self.rate_headers(decision, request_id)
        headers.update((k, made.headers[k]) for k in REFUSAL_HEADERS if k in made.headers)
        return anthropic_error(made.status, _message(made), headers)

    def error(
        self,
        status: int,
        message: str,
        kind: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> web.Response:
        return anthropic_error(status, message, headers)

    def envelope(self, response: web.Response) -> web.Response:
        if response.status < 400:
            return response
        kept = {k: v for k, v in response.headers.items() if k.lower() != "content-type"}
        kept.pop("Content-Length", None)
        return anthropic_error(response.status, _message(response), kept)


def _message(response: web.Response) -> str:
    try:
        payload = orjson.loads(response.body)  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        return response.reason or f"error {response.status}"
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else str(payload)[:500]


def _block_chars(block: Any) -> int:
    """Characters generated in a content block or a streamed delta: text, thinking, and tool
    input (whole, or streamed as partial JSON)."""
    if not isinstance(block, dict):
        return 0
    total = 0
    for name in ("text", "thinking", "partial_json"):
        if isinstance(block.get(name), str):
            total += len(block[name])
    if block.get("type") == "tool_use" and block.get("input"):
        total += len(orjson.dumps(block["input"])) + len(str(block.get("name") or ""))
    return total


MESSAGES = Messages()


class CountTokens(Messages):
    """``/v1/messages/count_tokens``: the upstream's own count, passed through. Anthropic
    bills no tokens for it but limits its requests per minute, so here it is admitted like
    any request but takes only requests: it counts in the caller's request windows
    (``rpm_limit`` of the key, user, team, organization...) and parallel limits and meets
    their blocks, takes nothing of token windows or budgets, and is settled at 0 tokens and
    $0 (a ledger entry with route ``count_tokens``). The deployment's own rpm/tpm are left
    alone: Anthropic limits token counting apart from message creation."""

    kind = "count_tokens"
    path = "messages/count_tokens"
    free = True

    def estimate(self, body: dict[str, Any], default_max_tokens: int, mode: str) -> tuple[int, int]:
        return 0, 0

    def bounds_itself(self, body: dict[str, Any]) -> bool:
        return True  # it generates nothing: held at exactly 0 tokens

    def writes_cache(self, body: dict[str, Any]) -> bool:
        return False

    def streams(self, body: dict[str, Any]) -> bool:
        return False

    def counts(self, limit: Limit) -> bool:
        if (limit.name or "").startswith("deployment:"):
            return False
        if isinstance(limit, SlidingWindow):
            return limit.measure is None
        return isinstance(limit, (Concurrency, Gate))

    def check_deployment(self, deployment: Deployment) -> None:
        if not deployment.speaks_anthropic:
            raise EntityError(
                501,
                f"count_tokens is not available for {deployment.model_name!r}: it is served by "
                "an OpenAI-format upstream, which has no token-counting endpoint, and the rate "
                "limiter does not guess a count",
            )

    def usage(self, answer: Any) -> Usage | None:
        return Usage()  # a count is free: its input_tokens is the answer, not usage

    def error_usage(self, payload: dict[str, Any]) -> Usage | None:
        return None

    def generated_chars(self, answer: Any) -> int:
        return 0


COUNT_TOKENS = CountTokens()
