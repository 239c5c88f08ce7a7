"""The mechanism: limits, and the engine that runs the Lua scripts over them in Redis
(connections, the script cache, pipelining, slot groups on a Cluster, the embedded server).
It knows nothing of keys, users or models, and imports nothing of ours above it."""

from .blocks import Blocks, Grant
from .engine import (
    BudgetUse,
    Decision,
    Engine,
    ExpiredHold,
    LimitState,
    Renewal,
    Reservation,
    Settlement,
    slot_tags,
)

__all__ = [
    "Blocks",
    "BudgetUse",
    "Decision",
    "Engine",
    "ExpiredHold",
    "Grant",
    "LimitState",
    "Renewal",
    "Reservation",
    "Settlement",
    "slot_tags",
]
