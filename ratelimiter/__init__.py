"""Exact rate limits, concurrency leases and spend budgets for LLM traffic, in Redis."""

from typing import Any

from .budget_manager import BudgetManager, UnknownUser
from .connections import RedisSettings, connect
from .durations import Duration, parse_duration
from .embedded import RedisServer
from .engine import Decision, Engine, ExpiredHold, LimitState, Renewal, Reservation, Settlement
from .errors import (
    DuplicateRequest,
    InvalidDuration,
    InvalidLimit,
    RateLimiterError,
    RedisUnavailable,
    UnknownModel,
)
from .estimate import register_model
from .limits import Budget, Concurrency, Gate, Limit, SlidingWindow
from .sdk import APIError, BudgetExceededError, ModelResponse, acompletion, completion

# LiteLLM's process-wide budget in dollars: completion() refuses a call that would pass it.
max_budget: float | None = None


def __getattr__(name: str) -> Any:
    if name == "_current_cost":  # LiteLLM's name for what this process has spent
        from .sdk import current_cost

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
