"""acquire's arguments for one list of limits, packed once per list and budget period.

A gateway request meets the limits of its plan (policy.Plan), copied with its own amounts
(``limits.copy_with``, which keeps each limit's ``token``). Everything else acquire is sent
(kinds, capacities, measures, windows, budget periods, places, keys, slot groups) is the same
for every request of the plan: it is packed here once into msgpack fragments, and a request
only packs its amounts between them (a msgpack array is its header and then its elements).
A ``Layout`` is found by the tokens of the limits, so it never serves another limit set, and
its fragments by the budget periods they hold, so they never serve another period.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .limits import Limit

__all__ = ["Fragments", "Layout"]

_pack = msgpack.packb
_array = msgpack.Packer().pack_array_header

# Values of each kind's spec before its capped flag; flat specs pad them to 8 (lib.lua).
SPEC_SIZE = {"w": 6, "p": 8, "b": 8, "l": 5, "g": 4}
_AMOUNTS = frozenset("wpb")  # kinds whose spec holds the request's amount; l and g hold constants
_CAPPED = (b"", _pack(1))  # a capped limit's spec ends with a 1 (lib.lua)
_FLAG = (_pack(0), _pack(1))
_PADDING = {size: _pack(0) * (8 - size) for size in SPEC_SIZE.values()}

# One limit whose spec holds the request's amount: its place in the request's limits and the
# bytes before and after the amount in the specs (ARGV[3], by capped), the settle plan
# (ARGV[13], None when the plan has no entry for it) and the flat specs (ARGV[14], by capped).
Step = tuple[
    int, tuple[bytes, bytes], tuple[bytes, bytes], bytes | None, bytes, bytes, tuple[bytes, bytes]
]


@dataclass(frozen=True, slots=True)
class Fragments:
    """One slot group's arguments but the amounts: ``fill`` packs a request's in."""

    steps: tuple[Step, ...]
    tails: tuple[bytes, bytes, bytes]  # what ends the specs, the plan and the flat specs

    def fill(self, limits: Sequence[Limit]) -> tuple[bytes, bytes, bytes]:
        """The specs, the settle plan and the flat specs of ``limits`` (the request's)."""
        specs: list[bytes] = []
        plan: list[bytes] = []
        flat: list[bytes] = []
        packed: dict[int, bytes] = {}  # a request's limits share a few amounts
        for i, spec_head, spec_tail, plan_head, plan_tail, flat_head, flat_tail in self.steps:
            limit = limits[i]
            capped, amount = limit.capped, limit.amount
            value = packed.get(amount)
            if value is None:
                value = packed[amount] = _pack(amount)
            specs += (spec_head[capped], value, spec_tail[capped])
            if plan_head is not None:
                plan += (plan_head, value, plan_tail)
            flat += (flat_head, value, flat_tail[capped])
        specs.append(self.tails[0])
        plan.append(self.tails[1])
        flat.append(self.tails[2])
        return b"".join(specs), b"".join(plan), b"".join(flat)


@dataclass(slots=True)
class Layout:
    """What acquire sends for a list of limits of these tokens, but the amounts: the slot
    groups, the shadow places, and each group's fragments for the budget periods of
    ``start`` to ``end``."""

    limits: tuple[Limit, ...]  # those it was made from, checked (their amounts are not used)
    groups: list[tuple[str, list[int]]]  # each slot group's anchor and its limits' places
    keys: list[tuple[str, ...]]  # each group's limits' keys
    sent: list[Sequence[str] | bytes]  # and as they are sent (``multiplex.packed``, on one server)
    spans: str
    shadows: dict[frozenset[str], list[bytes]] = field(default_factory=dict)
    fragments: list[Fragments] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0  # none yet

    def shadow_places(self, shadow: frozenset[str]) -> list[bytes]:
        """For each group, the 1-based places of its shadow limits, packed ('' for none);
        ``shadow`` names keys of these limits (checked by the caller)."""
        places = self.shadows.get(shadow)
        if places is None:
            if len(self.shadows) >= _SHADOW_SETS:
                self.shadows.clear()
            places = self.shadows[shadow] = [
                _places(indices, self.limits, shadow) for _, indices in self.groups
            ]
        return places

    def fragments_at(
        self, now: int, specs: Callable[[Sequence[Limit], int], list[list[Any]]]
    ) -> list[Fragments]:
        """Each group's fragments for the periods of ``now``; ``specs`` (``Engine._specs``) makes
        the limits' specs, budget periods included, when they are not made yet for them."""
        if not self.start <= now < self.end:
            made, start, end = [], float("-inf"), float("inf")
            for (_, indices), keys in zip(self.groups, self.keys, strict=True):
                group_specs = specs([self.limits[i] for i in indices], now)
                for spec in group_specs:
                    if spec[0] == "b":  # the periods that hold now (the script picks its own)
                        start, end = max(start, spec[4]), min(end, spec[5])
                made.append(_fragments(indices, keys, group_specs))
            self.fragments, self.start, self.end = made, start, end
        return self.fragments


_SHADOW_SETS = 8  # distinct shadow sets kept per layout: a plan has one or two


def _places(indices: list[int], limits: Sequence[Limit], shadow: frozenset[str]) -> bytes:
    places = [m for m, i in enumerate(indices, 1) if limits[i].key in shadow]
    return _pack(places) if places else b""


def _fragments(indices: list[int], keys: tuple[str, ...], specs: list[list[Any]]) -> Fragments:
    """Each limit's spec, plan entry and flat spec packed but its amount; the bytes of limits
    whose spec holds no amount (leases, gates) are merged into their neighbours'."""
    places = range(1, len(specs) + 1)
    entries = [_plan_entry(*each) for each in zip(specs, keys, places, strict=True)]
    plan_size = sum(values for _, _, values in entries)
    # the bytes of the specs, the plan and the flat specs not yet placed in a step
    before = [_array(len(specs)), _array(plan_size), _array(9 * len(specs))]
    steps: list[Step] = []
    for spec, i, (plan_head, plan_tail, plan_values) in zip(specs, indices, entries, strict=True):
        kind, size = _pack(spec[0]), SPEC_SIZE[spec[0]]
        capped = int(len(spec) > size)
        rest = b"".join(map(_pack, spec[2:size]))
        flat_tail = rest + _PADDING[size]
        if spec[0] not in _AMOUNTS:
            amount = _pack(spec[1])
            before[0] += _array(size + capped) + kind + amount + rest + _CAPPED[capped]
            before[1] += plan_head + plan_tail
            before[2] += kind + amount + flat_tail + _FLAG[capped]
            continue
        plan_step = None
        if plan_values:
            plan_step, before[1] = before[1] + plan_head, b""
        steps.append(
            (
                i,
                (before[0] + _array(size) + kind, before[0] + _array(size + 1) + kind),
                (rest, rest + _CAPPED[1]),
                plan_step,
                plan_tail,
                before[2] + kind,
                (flat_tail + _FLAG[0], flat_tail + _FLAG[1]),
            )
        )
        before[0] = before[2] = b""
    return Fragments(tuple(steps), (before[0], before[1], before[2]))


def _plan_entry(spec: list[Any], key: str, place: int) -> tuple[bytes, bytes, int]:
    """A limit's entry in the settle plan (lib.lua, record_each: what settlement changes),
    as the bytes before and after its amount and its count of values."""
    kind = spec[0]
    if kind == "b":
        tail = b"".join(map(_pack, (spec[3], spec[5], spec[6], spec[7])))
        return _pack("b") + _pack(place) + _pack(key), tail, 8
    if kind == "l":
        return _pack("l") + _pack(key), b"", 2
    if spec[3] and kind != "g":  # a window or share with a measure
        return (
            _pack("w") + _pack(place) + _pack(key),
            _pack(spec[3]) + _pack(spec[4]) + _pack(spec[5]),
            7,
        )
    return b"", b"", 0
