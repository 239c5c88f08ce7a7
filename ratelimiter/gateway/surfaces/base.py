"""What every surface answers (see the package's docstring), with OpenAI's answers as the
defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ...engine import Decision
from ...engine.limits import Limit
from ...errors import EntityError
from ...pricing import Usage, estimate_tokens, read_usage
from ...responses import HeaderTemplate, error_response, rate_headers, refusal
from ..bodies import MAX_END_USER_CHARS, check_body
from ..config import Deployment

__all__ = ["StreamTally", "Surface"]


MAX_RESPONSE_ID = 200  # characters of an upstream's response id kept in the ledger
# LiteLLM's standard headers naming the end user (its "customer"); they win over the body
END_USER_HEADERS = ("x-litellm-customer-id", "x-litellm-end-user-id")


def response_id(value: Any) -> str | None:
    """The upstream's id of its answer (``chatcmpl-…``), which /spend/logs finds entries by,
    or None: the upstream chooses it, so only a short printable ASCII string is kept."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= MAX_RESPONSE_ID
        and value.isascii()
        and value.isprintable()
    ):
        return value
    return None


@dataclass
class StreamTally:
    """What a stream has shown so far: the usage objects its events carried (merged, later
    fields replacing earlier ones), the characters generated, and whether it reached its end
    (then its usage is final; before that, output is at least what was streamed)."""

    usage: dict[str, Any] | None = None
    chars: int = 0
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def add_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage = {**(self.usage or {}), **usage}


class Surface:
    """One API's shape. ``kind``: the route name in the ledger and logs (and the body rules
    of bodies.py); ``path``: the upstream path after the deployment's base URL; ``flavor``:
    how its usage reads (pricing.read_usage)."""

    kind = "chat"
    path = "chat/completions"
    flavor = "openai"
    # the body field that bounds the completion, and the one strict enforcement sets
    bound_fields: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    strict_field = "max_tokens"
    # a request that costs nothing (token counting): no price needed, no tokens or spend held
    free = False

    # -- reading the request ----------------------------------------------------------

    def check(self, body: Any) -> dict[str, Any]:
        return check_body(body, self.kind)

    def estimate(self, body: dict[str, Any], default_max_tokens: int, mode: str) -> tuple[int, int]:
        """(prompt tokens, most completion tokens)."""
        return estimate_tokens(body, default_max_tokens, embedding=False, mode=mode)

    def bounds_itself(self, body: dict[str, Any]) -> bool:
        return not self.unsized_input(body) and any(
            _positive(body.get(f)) for f in self.bound_fields
        )

    def unsized_input(self, body: dict[str, Any]) -> bool:
        """Whether the upstream bills input this request does not carry and the sidecar cannot
        size (earlier turns it keeps itself): such a request cannot hold its full cost."""
        return False

    def choices(self, body: dict[str, Any]) -> int:
        return 1

    def writes_cache(self, body: dict[str, Any]) -> bool:
        """Whether the request may be billed cache writes (priced above plain input)."""
        return False

    def end_user(self, body: dict[str, Any]) -> str | None:
        user = body.get("user")
        return user if isinstance(user, str) and user else None

    def end_user_of(
        self, headers: Mapping[str, str], body: dict[str, Any], configured: tuple[str, ...]
    ) -> str | None:
        """The end user, in LiteLLM's order: its standard headers, the headers the config
        names, then the body (``end_user``). A header's value keys Redis, so it is checked
        like the body's fields: an EntityError naming the header when it is unusable."""
        for name in (*END_USER_HEADERS, *configured):
            value = headers.get(name)
            if not value:
                continue
            if len(value) > MAX_END_USER_CHARS or not value.isprintable():
                raise EntityError(
                    400,
                    f"{name} must be 1 to {MAX_END_USER_CHARS} printable characters (an "
                    f"end-user id), got {len(value)} characters",
                    name,
                )
            return value
        return self.end_user(body)

    def counts(self, limit: Limit) -> bool:
        """Whether a request of this surface meets ``limit`` (every limit, but for one that
        takes only requests)."""
        return True

    def check_deployment(self, deployment: Deployment) -> None:
        """An EntityError when this surface cannot reach ``deployment`` (another format)."""
        if deployment.speaks_anthropic:
            raise EntityError(
                400,
                f"model {deployment.model_name!r} is served by an Anthropic-format upstream; "
                f"/v1/{self.path} reaches only OpenAI-format deployments: call /v1/messages",
                "model",
            )

    def continues(self, body: dict[str, Any]) -> str | None:
        """The id of a stored answer this request continues (its tokens are billed again as
        input, so they are held too), if any."""
        return None

    def answer_id(self, answer: Any) -> str | None:
        """The id of an answer the upstream keeps (for retrieving it later), if any."""
        return None

    def event_id(self, event: dict[str, Any]) -> Any:
        """The answer's id as a stream tells it (the ledger finds an entry by it)."""
        return event.get("id")

    def streams(self, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    # -- the upstream -------------------------------------------------------------------

    def upstream_body(
        self, body: dict[str, Any], deployment: Deployment, max_tokens: int | None
    ) -> dict[str, Any]:
        forwarded = {**body, "model": deployment.model.split("/", 1)[-1]}
        if max_tokens is not None:
            forwarded[self.strict_field] = max_tokens
        return forwarded

    def upstream_url(self, deployment: Deployment) -> str:
        return f"{deployment.base_url}/{self.path}"

    def upstream_headers(self, request: web.Request, deployment: Deployment) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if deployment.api_key:
            headers["Authorization"] = f"Bearer {deployment.api_key}"
        return headers

    def wants_usage(self, body: dict[str, Any]) -> bool:
        """Whether the client asked for the usage events (else added ones are dropped)."""
        return True

    # -- usage ------------------------------------------------------------------------

    def usage(self, answer: Any) -> Usage | None:
        return read_usage(answer.get("usage") if isinstance(answer, dict) else None, self.flavor)

    def generated_chars(self, answer: Any) -> int:
        return 0

    def stream_event(self, tally: StreamTally, event: dict[str, Any], wanted: bool) -> bool:
        """Take usage and generated characters from one SSE event's JSON data; False to keep
        the event from the client."""
        return True

    def error_usage(self, payload: dict[str, Any]) -> Usage | None:
        """Usage an upstream's error answer reports (it consumed tokens even though it failed)."""
        return read_usage(payload.get("usage"), self.flavor)

    # -- answers in the API's own form --------------------------------------------------

    def rate_headers(
        self, decision: Decision, request_id: str, template: HeaderTemplate | None = None
    ) -> dict[str, str]:
        return rate_headers(decision, request_id, template)

    def refusal(self, decision: Decision, request_id: str, hint: str = "") -> web.Response:
        return refusal(decision, request_id, hint)

    def error(
        self,
        status: int,
        message: str,
        kind: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> web.Response:
        return error_response(status, message, kind, param, headers=headers)

    def envelope(self, response: web.Response) -> web.Response:
        """An error answer made in OpenAI's envelope (by the edge or the refusal code),
        rewritten in this API's own; OpenAI's surfaces keep it."""
        return response


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
