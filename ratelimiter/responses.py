"""What the engine's answers look like over HTTP, for the sidecar and for the aiohttp
middleware: OpenAI's error envelope, its rate-limit headers, and 429s whose type, message and
retry-after say which limit refused and when to come back.

Refusals begin with LiteLLM's own wording ("Budget has been exceeded! Key=... Current cost: X,
Max budget: Y", "Rate limit exceeded for api_key: ... Limit type: tokens. Current limit: N,
Remaining: R. Limit resets at: ...") because clients of LiteLLM match it with regular
expressions; our detail (scope, window, what the request could cost, when it resets) follows."""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from .engine import Decision, LimitState
from .engine.durations import MAX_COUNTS, Duration
from .engine.limits import Budget, Concurrency, Gate, Limit, SharedWindow, SlidingWindow
from .pricing import NANO, dollars

__all__ = [
    "ANTHROPIC_ERRORS",
    "SHADOW_REASON",
    "SHADOW_REFUSED",
    "HeaderTemplate",
    "anthropic_error",
    "anthropic_rate_headers",
    "error_response",
    "json_response",
    "rate_headers",
    "refusal",
]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status,
        headers,
    )


_PER = {"1s": "second", "1m": "minute", "1h": "hour", "1d": "day"}
# LiteLLM's names for our scopes: "Rate limit exceeded for <descriptor>: <id>" ...
_DESCRIPTORS = {"key": "api_key", "member": "team_member"}
# ... and "Budget has been exceeded! <Label>=<id>"
_LABELS = {"key": "Key", "user": "User", "team": "Team", "end_user": "End User"}
_WORDS = {"end_user": "end user", "member": "team member"}


def _duration(ms: int) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s."""
    seconds = max(ms, 0) / 1000
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 1 else f"{round(seconds)}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


@functools.lru_cache(maxsize=1024)
def _scope_header(name: str) -> str:
    return "x-ratelimit-remaining-" + name.replace(":", "-").replace("_", "-")


def _tightest(decision: Decision) -> dict[str | None, LimitState]:
    """The sliding window with the least left, per measure (requests: None, tokens...)."""
    tightest: dict[str | None, LimitState] = {}
    for state in decision.states:
        limit = state.limit
        # a share can be borrowed past, so the hard windows are the ones to report; a shadow
        # limit is not enforced, so not one to pace by
        if (
            isinstance(limit, SlidingWindow)
            and not isinstance(limit, SharedWindow)
            and not state.shadow
        ):
            best = tightest.get(limit.measure)
            if best is None or state.remaining < best.remaining:
                tightest[limit.measure] = state
    return tightest


# A shadow limit that would have refused this (served) request: its name and reason. Shadow
# limits are otherwise left out of the rate-limit headers, which clients pace themselves by.
SHADOW_REFUSED = "x-ratelimit-shadow-refused"
SHADOW_REASON = "x-ratelimit-shadow-reason"


def rate_headers(
    decision: Decision, request_id: str, template: HeaderTemplate | None = None
) -> dict[str, str]:
    """OpenAI's rate-limit headers for the tightest request and token windows, and one
    ``x-ratelimit-remaining-<scope>-<what>`` per named limit. ``template``: the limits'
    own (``HeaderTemplate``), which makes the same headers in a fraction of the time."""
    if template is not None and template.fits(decision):
        return template.headers(decision, request_id)
    headers = {"x-request-id": request_id}
    tightest = _tightest(decision)
    detail: dict[str, str] = {}
    if decision.shadow_refused is not None:
        headers[SHADOW_REFUSED] = decision.shadow_refused.name or "unnamed"
        headers[SHADOW_REASON] = decision.shadow_reason or ""
    for state in decision.states:
        limit = state.limit
        if isinstance(limit, Gate) or not limit.name or state.shadow:
            continue
        value = dollars(state.remaining) if isinstance(limit, Budget) else state.remaining
        detail.setdefault(_scope_header(limit.name), str(value))  # per-scope detail
    for what, measure in (("requests", None), ("tokens", "tokens")):
        state = tightest.get(measure)
        if state is not None:
            headers[f"x-ratelimit-limit-{what}"] = str(state.limit.capacity)
            headers[f"x-ratelimit-remaining-{what}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{what}"] = _duration(state.reset_ms)
    for name, value in detail.items():
        headers.setdefault(name, value)
    return headers


_OPENAI_FAMILIES = (("requests", None), ("tokens", "tokens"))


class HeaderTemplate:
    """The rate-limit headers of every decision over one list of limits, in that order and
    with the same ones in shadow (a sidecar plan's): which states each header reads and what
    it is called are worked out once, so a request only formats its numbers."""

    def __init__(self, limits: Sequence[Limit], shadow: Collection[str]) -> None:
        self.size = len(limits)
        # per measure, the states the tightest window is chosen from (see _tightest)
        self.windows: dict[str | None, tuple[int, ...]] = {}
        for i, limit in enumerate(limits):
            if (
                isinstance(limit, SlidingWindow)
                and not isinstance(limit, SharedWindow)
                and limit.key not in shadow
            ):
                self.windows[limit.measure] = (*self.windows.get(limit.measure, ()), i)
        self.openai = [(what, self.windows[m]) for what, m in _OPENAI_FAMILIES if m in self.windows]
        taken = {f"x-ratelimit-remaining-{what}" for what, _ in self.openai}
        self.detail: list[tuple[str, int, bool]] = []  # header, state, whether in dollars
        named: set[str] = set()
        for i, limit in enumerate(limits):
            if isinstance(limit, Gate) or not limit.name or limit.key in shadow:
                continue
            name = _scope_header(limit.name)
            if name not in named:  # the first limit of a name gives its header
                named.add(name)
                if name not in taken:
                    self.detail.append((name, i, isinstance(limit, Budget)))

    def fits(self, decision: Decision) -> bool:
        """Whether ``decision`` has a state per limit (not, say, one admitted unchecked)."""
        return len(decision.states) == self.size

    def tightest(self, states: Sequence[LimitState], measure: str | None) -> LimitState | None:
        indices = self.windows.get(measure)
        return None if indices is None else _least(states, indices)

    def headers(self, decision: Decision, request_id: str) -> dict[str, str]:
        """What ``rate_headers`` makes of ``decision``."""
        states = decision.states
        headers = {"x-request-id": request_id}
        if decision.shadow_refused is not None:
            headers[SHADOW_REFUSED] = decision.shadow_refused.name or "unnamed"
            headers[SHADOW_REASON] = decision.shadow_reason or ""
        for what, indices in self.openai:
            state = _least(states, indices)
            headers[f"x-ratelimit-limit-{what}"] = str(state.limit.capacity)
            headers[f"x-ratelimit-remaining-{what}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{what}"] = _duration(state.reset_ms)
        for name, i, budget in self.detail:
            left = states[i].remaining
            headers[name] = str(dollars(left)) if budget else str(left)
        return headers


def _least(states: Sequence[LimitState], indices: Sequence[int]) -> LimitState:
    """The first of the states at ``indices`` with the least left."""
    best = states[indices[0]]
    for i in indices[1:]:
        if states[i].remaining < best.remaining:
            best = states[i]
    return best


# Anthropic's families of rate-limit headers, by the measure of the window they describe.
_ANTHROPIC_FAMILIES = (
    ("requests", None),
    ("tokens", "tokens"),
    ("input-tokens", "input_tokens"),
    ("output-tokens", "output_tokens"),
)


def anthropic_rate_headers(
    decision: Decision, request_id: str, template: HeaderTemplate | None = None
) -> dict[str, str]:
    """Anthropic's form of the same headers: ``anthropic-ratelimit-{requests,tokens,
    input-tokens,output-tokens}-{limit,remaining,reset}`` for the tightest window of each,
    the reset as an RFC 3339 time; with our id and the per-scope detail headers."""
    headers = {"request-id": request_id}
    if template is None or not template.fits(decision):
        template = None
        tightest = _tightest(decision)
    now = datetime.now(UTC)
    for family, measure in _ANTHROPIC_FAMILIES:
        if template is None:
            state = tightest.get(measure)
        else:
            state = template.tightest(decision.states, measure)
        if state is not None:
            reset = now + timedelta(milliseconds=max(state.reset_ms, 0))
            headers[f"anthropic-ratelimit-{family}-limit"] = str(state.limit.capacity)
            headers[f"anthropic-ratelimit-{family}-remaining"] = str(max(state.remaining, 0))
            headers[f"anthropic-ratelimit-{family}-reset"] = reset.isoformat(
                timespec="seconds"
            ).replace("+00:00", "Z")
    for name, value in rate_headers(decision, request_id, template).items():
        if not name.startswith(("x-ratelimit-limit-", "x-ratelimit-reset-")) and name not in (
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
        ):
            headers.setdefault(name, value)
    return headers


# Anthropic's error types by status (its "Errors" page); 429 is rate_limit_error for both a
# window and a budget, told apart by the message and x-should-retry.
ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Anthropic's error envelope: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return json_response(
        {"type": "error", "error": {"type": kind, "message": message}}, status, headers
    )


def refusal(decision: Decision, request_id: str, hint: str = "") -> web.Response:
    """A refused decision in LiteLLM's words: 429 ``budget_exceeded``, or 429 typed by the
    kind of limit (``requests``, ``tokens``, ``max_parallel_requests``), 403 for a block;
    with retry-after unless it would never pass. ``hint``: a sentence the caller adds at the
    end (what the request could change to fit)."""
    limit, retry = decision.refused, decision.retry_after_ms
    headers = rate_headers(decision, request_id)
    if limit is None:
        raise ValueError(f"refusal() of an admitted decision ({decision.request_id})")
    if isinstance(limit, Gate):
        label = limit.name or "a limit"
        return error_response(
            403, f"{label.split(':')[0]} is blocked", "permission_denied", headers=headers
        )
    state = next((s for s in decision.states if s.limit.key == limit.key), None)
    never = isinstance(limit, Budget) and _never_resets(limit.period)
    if retry is not None and not never:
        headers["retry-after"] = str(-(-retry // 1000))
        headers["retry-after-ms"] = str(retry)
    if isinstance(limit, Budget):
        # The OpenAI SDK retries every 429 unless told not to; a spent budget will not come back.
        headers["x-should-retry"] = "false"
        message = _with(_budget_message(limit, state, retry, never), hint)
        return error_response(
            429, message, "budget_exceeded", code="budget_exceeded", headers=headers
        )
    if retry is None:
        headers["x-should-retry"] = "false"
    kind = _rate_kind(limit)
    headers["rate_limit_type"] = kind  # LiteLLM's header naming the kind of limit
    if isinstance(limit, SharedWindow):
        message = _share_message(limit, kind, state, decision, retry)
    else:
        message = _rate_message(limit, kind, state, retry)
    return error_response(
        429,
        _with(message, hint),
        kind,
        code="rate_limit_exceeded",
        headers=headers,
    )


def _scope(limit: Limit) -> tuple[str, str]:
    """The kind and id of the scope a limit belongs to. Names are ``<kind>:<what>`` and the
    id sits in the key's hash tag ``{<kind>:<id>}`` (the sidecar's policy); without such a
    tag the name's second half is taken as the id (``key:k1``)."""
    kind, _, rest = limit.name.partition(":")
    start = limit.key.find("{")
    end = limit.key.find("}", start + 1)
    tag = limit.key[start + 1 : end] if 0 <= start < end else ""
    if kind and tag.startswith(kind + ":"):
        return kind, tag[len(kind) + 1 :]
    return kind or "limit", rest or limit.name or "unnamed"


def _model(limit: Limit) -> str | None:
    """The model of a per-model limit: the sidecar's keys go on ``:model:<model>`` or
    ``:model_rate:<model>`` after the hash tag, budgets then ``:<period>``."""
    tail = limit.key[limit.key.find("}") + 1 :]
    for marker in (":model_rate:", ":model:"):
        if marker in tail:
            model = tail.split(marker, 1)[1]
            return model.rpartition(":")[0] if isinstance(limit, Budget) else model
    return None


def _never_resets(period: Duration) -> bool:
    # The longest duration (100 years) is how a budget without budget_duration is kept.
    return period.count >= MAX_COUNTS[period.unit]


def _money(nano: int) -> str:
    """Dollars as LiteLLM prints them (100.0, 0.00003): digits and one point, never 3e-05,
    which the regular expressions clients use would not read."""
    whole, fraction = divmod(max(nano, 0), NANO)
    text = f"{whole}.{fraction:09d}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _at(ms: int) -> str:
    moment = datetime.now(UTC) + timedelta(milliseconds=max(ms, 0))
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _budget_message(limit: Budget, state: LimitState | None, retry: int | None, never: bool) -> str:
    kind, ident = _scope(limit)
    # capacity - remaining is what the period holds (spent and in flight); the engine clamps
    # remaining at 0, so past the budget this is a lower bound.
    current = limit.capacity - state.remaining if state is not None else limit.capacity
    model = _model(limit)
    what = f"the {_WORDS.get(kind, kind)} budget of ${_money(limit.capacity)}"
    what += "" if never else f" per {limit.period}"
    what += f" for model {model}" if model else ""
    cost = f"this request could cost up to ${_money(limit.amount)}"
    if retry is None:
        detail = f"{what}; {cost}, more than the whole budget, so it cannot succeed"
    elif never:
        detail = f"{what} never resets; {cost}"
    else:
        reset = state.reset_ms if state is not None else retry
        detail = f"{what} resets at {_at(reset)}, in {_duration(reset)}; {cost}"
    return (
        f"Budget has been exceeded! {_owner(kind, ident)}Current cost: {_money(current)}, "
        f"Max budget: {_money(limit.capacity)} ({detail})"
    )


def _owner(kind: str, ident: str) -> str:
    """Who LiteLLM names before "Current cost"; the proxy-wide budget names no one."""
    if kind == "proxy":
        return ""
    if kind == "member":
        team, _, user = ident.partition(":")
        return f"User={user} in Team={team} "
    return f"{_LABELS.get(kind, kind.replace('_', ' ').title())}={ident} "


_TOKEN_MEASURES = ("tokens", "input_tokens", "output_tokens")


def _rate_kind(limit: SlidingWindow | Concurrency) -> str:
    if isinstance(limit, Concurrency):
        return "max_parallel_requests"
    return "tokens" if limit.measure in _TOKEN_MEASURES else "requests"


def _rate_message(
    limit: SlidingWindow | Concurrency, kind: str, state: LimitState | None, retry: int | None
) -> str:
    scope, ident = _scope(limit)
    descriptor = _DESCRIPTORS.get(scope, scope)
    model = _model(limit)
    if model is not None:
        descriptor, ident = f"model_per_{scope}", f"{ident}:{model}"
    remaining = max(state.remaining, 0) if state is not None else 0
    reset = retry if retry is not None else (state.reset_ms if state is not None else 0)
    if isinstance(limit, Concurrency):
        allows = f"{_count(limit.capacity, 'request')} in parallel"
    else:
        unit = "request"
        if kind == "tokens":
            unit = {"input_tokens": "input token", "output_tokens": "output token"}.get(
                str(limit.measure), "token"
            )
        allows = f"{_count(limit.capacity, unit)} per {_per(limit.window)}"
    detail = f"The {_WORDS.get(scope, scope)} allows {allows}"
    detail += f" of model {model}" if model else ""
    if retry is not None:
        detail += f"; retry in {retry / 1000:.1f}s."
    elif kind == "tokens":
        detail += f"; this request needs {limit.amount} tokens, so it cannot succeed."
    else:
        detail += "; this request can never fit, so it cannot succeed."
    return (
        f"Rate limit exceeded for {descriptor}: {ident}. Limit type: {kind}. "
        f"Current limit: {limit.capacity}, Remaining: {remaining}. "
        f"Limit resets at: {_at(reset)}. {detail}"
    )


def _share_message(
    limit: SharedWindow, kind: str, state: LimitState | None, decision: Decision, retry: int | None
) -> str:
    """LiteLLM's priority refusal ("Priority-based rate limit exceeded. Priority: …, Rate limit
    type: …, Remaining: …, Model saturation: …%"), then which deployment and when to retry."""
    priority = limit.name.rpartition(":")[2] or "default"
    total = next((s for s in decision.states if s.limit.key == limit.total_key), None)
    saturation = 0.0
    if total is not None and total.limit.capacity > 0:
        saturation = (total.limit.capacity - total.remaining) / total.limit.capacity
    remaining = max(state.remaining, 0) if state is not None else 0
    _, deployment = _scope(limit)
    detail = (
        f"Deployment {deployment} reserves {limit.capacity} {kind} per {_per(limit.window)} for "
        f"priority {priority}; past {limit.saturation} in all, each priority is held to its share"
    )
    detail += f"; retry in {retry / 1000:.1f}s." if retry is not None else "; it can never fit."
    return (
        f"Priority-based rate limit exceeded. Priority: {priority}, Rate limit type: {kind}, "
        f"Remaining: {remaining}, Model saturation: {saturation:.1%}. {detail}"
    )


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def _per(window: object) -> str:
    return _PER.get(str(window), str(window))


def _with(message: str, hint: str) -> str:
    return f"{message} {hint}" if hint else message
