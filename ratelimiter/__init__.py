"""Exact rate limits, concurrency leases and spend budgets for LLM traffic, in Redis."""

from typing import Any

from .engine import Decision, Engine, ExpiredHold, LimitState, Renewal, Reservation, Settlement
from .engine.connections import RedisSettings, connect
from .engine.durations import Duration, parse_duration
from .engine.embedded import RedisServer
from .engine.limits import Budget, Concurrency, Gate, Limit, SharedWindow, SlidingWindow
from .errors import (
    DuplicateRequest,
    InvalidDuration,
    InvalidLimit,
    RateLimiterError,
    RedisUnavailable,
    UnknownModel,
)
from .library.budget_manager import BudgetManager, UnknownUser
from .library.sdk import APIError, BudgetExceededError, ModelResponse, acompletion, completion
from .pricing import register_model

# LiteLLM's process-wide budget in dollars: completion() refuses a call that would pass it.
max_budget: float | None = None


def __getattr__(name: str) -> Any:
    if name == "_current_cost":  # LiteLLM's name for what this process has spent
        from .library.sdk import current_cost

        return current_cost()
    raise AttributeError(f"module 'ratelimiter' has no attribute {name!r}")


__all__ = [
    "APIError",
    "Budget",
    "BudgetExceededError",
    "BudgetManager",
    "Concurrency",
    "Decision",
    "DuplicateRequest",
    "Duration",
    "Engine",
    "ExpiredHold",
    "Gate",
    "InvalidDuration",
    "InvalidLimit",
    "Limit",
    "LimitState",
    "ModelResponse",
    "RateLimiterError",
    "RedisServer",
    "RedisSettings",
    "RedisUnavailable",
    "Renewal",
    "Reservation",
    "Settlement",
    "SharedWindow",
    "SlidingWindow",
    "UnknownModel",
    "UnknownUser",
    "acompletion",
    "completion",
    "connect",
    "max_budget",
    "parse_duration",
    "register_model",
]
