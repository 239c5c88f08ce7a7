"""What the engine's answers look like over HTTP, for the sidecar and for the aiohttp
middleware: OpenAI's error envelope, its rate-limit headers, and 429s whose type, message and
retry-after say which limit refused and when to come back."""

from __future__ import annotations

import functools
from typing import Any

import orjson
from aiohttp import web

from .engine import Decision, LimitState
from .engine.limits import Budget, Concurrency, Gate, SlidingWindow
from .pricing import dollars

__all__ = ["error_response", "json_response", "rate_headers", "refusal"]


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


def rate_headers(decision: Decision, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    tightest: dict[str | None, LimitState] = {}
    detail: dict[str, str] = {}
    for state in decision.states:
        limit = state.limit
        if isinstance(limit, SlidingWindow):
            best = tightest.get(limit.measure)
            if best is None or state.remaining < best.remaining:
                tightest[limit.measure] = state
        if isinstance(limit, Gate) or not limit.name:
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


def refusal(decision: Decision, request_id: str) -> web.Response:
    limit, retry = decision.refused, decision.retry_after_ms
    headers = rate_headers(decision, request_id)
    label = limit.name if limit is not None and limit.name else "a limit"
    if isinstance(limit, Gate):
        return error_response(
            403, f"{label.split(':')[0]} is blocked", "permission_denied", headers=headers
        )
    if retry is not None:
        headers["retry-after"] = str(-(-retry // 1000))
        headers["retry-after-ms"] = str(retry)
    when = f" Retry in {retry / 1000:.1f}s." if retry is not None else " It cannot succeed."
    if isinstance(limit, Budget):
        headers["x-should-retry"] = "false"
        return error_response(
            429,
            f"Budget exceeded for {label}: {dollars(limit.capacity):g} dollars per "
            f"{limit.period}.{when}",
            "budget_exceeded",
            code="budget_exceeded",
            headers=headers,
        )
    if isinstance(limit, Concurrency):
        kind, what = "max_parallel_requests", f"{limit.capacity} requests in parallel"
    elif isinstance(limit, SlidingWindow) and limit.measure == "tokens":
        kind, what = "tokens", f"{limit.capacity} tokens per {_per(limit.window)}"
    elif isinstance(limit, SlidingWindow):
        kind, what = "requests", f"{limit.capacity} requests per {_per(limit.window)}"
    else:
        kind, what = "requests", "requests"
    if retry is None:
        headers["x-should-retry"] = "false"
    return error_response(
        429,
        f"Rate limit reached for {label}: {what}.{when}",
        kind,
        code="rate_limit_exceeded",
        headers=headers,
    )


def _per(window: object) -> str:
    return _PER.get(str(window), str(window))
