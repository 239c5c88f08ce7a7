"""Python on the same engine: LiteLLM's BudgetManager, completion() with a process-wide
max_budget, an aiohttp middleware and an async client for the sidecar's admin API. It never
imports the sidecar."""

from .budget_manager import BudgetManager, UnknownUser
from .sdk import APIError, BudgetExceededError, ModelResponse, acompletion, completion

__all__ = [
    "APIError",
    "BudgetExceededError",
    "BudgetManager",
    "ModelResponse",
    "UnknownUser",
    "acompletion",
    "completion",
]
