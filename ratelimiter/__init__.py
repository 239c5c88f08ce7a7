"""Exact rate limits, concurrency leases and spend budgets for LLM traffic, in Redis."""

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
)
from .limits import Budget, Concurrency, Gate, Limit, SlidingWindow

__all__ = [
    "Budget",
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
    "RateLimiterError",
    "RedisServer",
    "RedisSettings",
    "RedisUnavailable",
    "Renewal",
    "Reservation",
    "Settlement",
    "SlidingWindow",
    "connect",
    "parse_duration",
]
