"""acquire's arguments for one list of limits, packed once per list and budget period.

A gateway request meets the limits of its plan (policy.Plan), copied with its own amounts
(``limits.copy_with``, which keeps each limit's ``token``). Everything else acquire is sent
(kinds, capacities, measures, windows, budget periods, places, keys, slot groups) is the same
for every request of the plan: it is packed here once into msgpack fragments, and a request
only packs its amounts between them (a msgpack array is its header and then its elements).
A ``Layout`` is found by the tokens of the limits, so it never serves another limit set, and
its fragments by the budget periods they hold, so they never serve another period. A limit set
met for the first time is joined from its limits' ``Parts``, kept by token too: the limits of a
key are met with many end users, each another set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .limits import Limit
from .multiplex import Packed

__all__ = ["Fragments", "Layout", "Parts", "limit_parts"]

_pack = msgpack.packb
_array = msgpack.Packer().pack_array_header

# Values of each kind's spec before its capped flag; flat specs pad them to 8 (lib.lua).
SPEC_SIZE = {"w": 6, "p": 8, "b": 8, "l": 5, "g": 4}
_AMOUNTS = frozenset("wpb")  # kinds whose spec holds the request's amount; l and g hold constants
_CAPPED = (b"", _pack(1))  # a capped limit's spec ends with a 1 (lib.lua)
_FLAG = (_pack(0), _pack(1))
_PADDING = {size: _pack(0) * (8 - size) for size in SPEC_SIZE.values()}
_PLACES = tuple(map(_pack, range(128)))

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
    keys: Packed  # the limits' keys, for the multiplexer

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


@dataclass(frozen=True, slots=True)
class Parts:
    """One limit's bytes in acquire's arguments that hold neither the request's amount nor the
    limit's place in its group: made once per limit (and budget period) for every limit set
    that has it. A spec holding no amount (a lease, a gate) is whole in the heads."""

    amount: bool  # whether the spec holds the request's amount
    spec_heads: tuple[bytes, bytes]  # the spec before its amount, by capped
    spec_tails: tuple[bytes, bytes]  # and after it
    flat_head: bytes
    flat_tails: tuple[bytes, bytes]
    plan_head: bytes  # the plan entry before its place ("b", "w") or whole ("l"), or b""
    plan_tail: bytes  # after the amount
    plan_values: int  # values in the plan entry: 0 for none
    key: bytes  # msgpack
    resp: bytes  # the key as a RESP argument, without its CRLF
    start: float  # the budget period it holds: valid from start to end
    end: float


def limit_parts(spec: list[Any], key: str, start: float, end: float) -> Parts:
    """``spec`` (``Engine._specs``) of the limit keyed ``key`` as parts, valid from ``start`` to
    ``end``."""
    kind, size = _pack(spec[0]), SPEC_SIZE[spec[0]]
    capped = int(len(spec) > size)
    rest = b"".join(map(_pack, spec[2:size]))
    flat_rest = rest + _PADDING[size]
    packed_key = _pack(key)
    encoded = key.encode()
    resp = b"$%d\r\n%s" % (len(encoded), encoded)
    plan_head, plan_tail, plan_values = _plan_entry(spec, packed_key)
    if spec[0] not in _AMOUNTS:
        whole = _array(size + capped) + kind + _pack(spec[1]) + rest + _CAPPED[capped]
        flat = kind + _pack(spec[1]) + flat_rest + _FLAG[capped]
        return Parts(
            False,
            (whole, whole),
            (b"", b""),
            flat,
            (b"", b""),
            plan_head,
            b"",
            plan_values,
            packed_key,
            resp,
            start,
            end,
        )
    return Parts(
        True,
        (_array(size) + kind, _array(size + 1) + kind),
        (rest, rest + _CAPPED[1]),
        kind,
        (flat_rest + _FLAG[0], flat_rest + _FLAG[1]),
        plan_head,
        plan_tail,
        plan_values,
        packed_key,
        resp,
        start,
        end,
    )


def _plan_entry(spec: list[Any], key: bytes) -> tuple[bytes, bytes, int]:
    """A limit's entry in the settle plan (lib.lua, record_each: what settlement changes): the
    bytes before its place (whole for a lease), those after its amount, its count of values."""
    kind = spec[0]
    if kind == "b":
        return _pack("b"), b"".join(map(_pack, (spec[3], spec[5], spec[6], spec[7]))), 8
    if kind == "l":
        return _pack("l") + key, b"", 2
    if spec[3] and kind != "g":  # a window or share with a measure
        return _pack("w"), b"".join(map(_pack, spec[3:6])), 7
    return b"", b"", 0


PartsOf = Callable[[list[Limit], int], list[Parts]]


@dataclass(slots=True)
class Layout:
    """What acquire sends for a list of limits of these tokens, but the amounts: the slot
    groups, the shadow places, and each group's fragments for the budget periods of
    ``start`` to ``end``."""

    limits: tuple[Limit, ...]  # those it was made from, checked (their amounts are not used)
    groups: list[tuple[str, list[int]]]  # each slot group's anchor and its limits' places
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

    def fragments_at(self, now: int, parts_of: PartsOf) -> list[Fragments]:
        """Each group's fragments for the periods of ``now``, from its limits' parts
        (``parts_of``, ``Engine._parts``) when they are not made yet for them."""
        if not self.start <= now < self.end:
            made, start, end = [], float("-inf"), float("inf")
            for _, indices in self.groups:
                parts = parts_of([self.limits[i] for i in indices], now)
                for each in parts:
                    start, end = max(start, each.start), min(end, each.end)
                made.append(_fragments(indices, parts))
            self.fragments, self.start, self.end = made, start, end
        return self.fragments


_SHADOW_SETS = 8  # distinct shadow sets kept per layout: a plan has one or two


def _places(indices: list[int], limits: Sequence[Limit], shadow: frozenset[str]) -> bytes:
    places = [m for m, i in enumerate(indices, 1) if limits[i].key in shadow]
    return _pack(places) if places else b""


def _fragments(indices: list[int], parts: list[Parts]) -> Fragments:
    """The group's limits' parts joined with their places; the bytes of limits whose spec
    holds no amount (leases, gates) are merged into their neighbours'."""
    plan_size = sum(each.plan_values for each in parts)
    # the bytes of the specs, the plan and the flat specs not yet placed in a step
    before = [_array(len(parts)), _array(plan_size), _array(9 * len(parts))]
    steps: list[Step] = []
    for place, (i, each) in enumerate(zip(indices, parts, strict=True), 1):
        plan_head = each.plan_head
        if each.plan_values > 2:  # it names its place (all but a lease's)
            plan_head += (_PLACES[place] if place < len(_PLACES) else _pack(place)) + each.key
        if not each.amount:
            before[0] += each.spec_heads[0]
            before[1] += plan_head
            before[2] += each.flat_head
            continue
        plan_step = None
        if each.plan_values:
            plan_step, before[1] = before[1] + plan_head, b""
        heads, flat_head = each.spec_heads, each.flat_head
        if before[0]:  # a lease's or a gate's bytes came first
            heads = (before[0] + heads[0], before[0] + heads[1])
            flat_head = before[2] + flat_head
            before[0] = before[2] = b""
        steps.append(
            (i, heads, each.spec_tails, plan_step, each.plan_tail, flat_head, each.flat_tails)
        )
    keys = Packed(b"\r\n".join([each.resp for each in parts]))
    keys.count = len(parts)
    return Fragments(tuple(steps), (before[0], before[1], before[2]), keys)
