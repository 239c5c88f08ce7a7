"""Priority reservation on a shared deployment: LiteLLM's dynamic rate limiter v3 settings
(``litellm_settings.priority_reservation`` and ``priority_reservation_settings``) made exact.

A deployment's rpm and tpm (either alone included: LiteLLM #35422 skipped TPM-only models) are
split by priority. Each priority gets a ``SharedWindow`` over the deployment's own window: below
the saturation level anyone may use what is free; above it each priority is held to its share;
and a priority that was refused within its share because the deployment was full is "waiting"
for one window, during which nobody borrows its unused part. All of it is decided inside the
request's one atomic admission (engine kind ``'p'``).

The caller's priority is the team's ``metadata.priority``, else the key's (LiteLLM's order).
Requests with no priority, or one not in ``priority_reservation``, share one pool,
``default_pool``, whose share is ``default_priority`` (LiteLLM's default: 0.25).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.limits import Limit, SharedWindow

__all__ = [
    "DEFAULT_POOL",
    "MAX_PRIORITIES",
    "PriorityReservation",
    "caller_priority",
    "deployment_shares",
    "share_limits",
]

DEFAULT_POOL = "default_pool"  # LiteLLM's name for the pool of requests with no priority
MAX_PRIORITIES = 64
MAX_NAME = 64
# LiteLLM's PriorityReservationSettings defaults
DEFAULT_PRIORITY = 0.25
SATURATION_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class PriorityReservation:
    """``weights``: priority -> (kind, value), kind ``percent`` (a fraction of the deployment's
    capacity), ``rpm`` or ``tpm`` (an absolute amount, made a fraction of the deployment's rpm or
    tpm, as LiteLLM does)."""

    weights: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    default_priority: float = DEFAULT_PRIORITY
    saturation_threshold: float = SATURATION_THRESHOLD

    def fractions(self, rpm: int | None, tpm: int | None) -> dict[str, float]:
        """Each priority's fraction of a deployment, scaled down to sum to 1 when they sum to
        more (LiteLLM's normalisation; the default pool is not part of it), with the default
        pool's own."""
        found = {
            name: _fraction(kind, value, rpm, tpm) for name, (kind, value) in self.weights.items()
        }
        total = sum(found.values())
        if total > 1:
            found = {name: value / total for name, value in found.items()}
        found.setdefault(DEFAULT_POOL, self.default_priority)
        return found

    def pool(self, priority: str | None) -> str:
        """The pool a request of ``priority`` counts in."""
        return priority if priority is not None and priority in self.weights else DEFAULT_POOL


def _fraction(kind: str, value: float, rpm: int | None, tpm: int | None) -> float:
    if kind == "percent":
        return value
    capacity = rpm if kind == "rpm" else tpm
    # a deployment without that capacity reserves nothing for it (LiteLLM falls back the same)
    return min(value / capacity, 1.0) if capacity else 0.0


def caller_priority(team: Mapping[str, Any] | None, key: Mapping[str, Any] | None) -> str | None:
    """The team's ``metadata.priority``, else the key's; anything but a short string is none."""
    for entity in (team, key):
        metadata = (entity or {}).get("metadata")
        priority = metadata.get("priority") if isinstance(metadata, Mapping) else None
        if isinstance(priority, str) and 0 < len(priority) <= MAX_NAME:
            return priority
    return None


def _units(fraction: float, capacity: int) -> int:
    # 0.29 * 100 is 28.999999999999996 in floats: a share is the whole units it names
    return math.floor(round(fraction * capacity, 6))


def share_limits(
    fields: Mapping[str, Any], total_key: Any, window: str
) -> Iterator[tuple[Limit, str | None]]:
    """The deployment's shared windows for the request's pool: one over its rpm window, one
    over its tpm window, for each it has. ``total_key(what)`` names the deployment's window
    (``rpm`` or ``tpm``); the share lives next to it, in the same hash tag."""
    pool, fraction = fields.get("priority"), fields.get("priority_share")
    threshold = fields.get("saturation_threshold")
    if pool is None or fraction is None or threshold is None:
        return
    for what, measure, capacity in (
        ("rpm", None, fields.get("rpm_limit")),
        ("tpm", "tokens", fields.get("tpm_limit")),
    ):
        if capacity is None:
            continue
        total = total_key(what)
        kind = "requests" if measure is None else "tokens"
        share = SharedWindow(
            f"{total}:priority:{pool}",
            _units(fraction, capacity),
            window,
            0 if measure else 1,
            measure=measure,
            name=f"deployment:priority_{kind}:{pool}",
            total_key=total,
            saturation=_units(threshold, capacity),
        )
        yield share, measure


def deployment_shares(
    reservation: PriorityReservation | None, rpm: int | None, tpm: int | None
) -> dict[str, Any] | None:
    """What /model/info shows of a deployment's split: each pool's fraction and the requests
    and tokens per minute it is held to once the deployment is saturated."""
    if reservation is None or (rpm is None and tpm is None):
        return None
    pools = [
        {
            "priority": name,
            "share": fraction,
            "rpm": None if rpm is None else _units(fraction, rpm),
            "tpm": None if tpm is None else _units(fraction, tpm),
        }
        for name, fraction in reservation.fractions(rpm, tpm).items()
    ]
    return {"saturation_threshold": reservation.saturation_threshold, "priorities": pools}
