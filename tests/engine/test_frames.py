"""acquire's arguments packed from per-limit-set fragments (frames.py) are byte for byte those
packed from the specs (as the scripts read them, lib.lua), and a layout never serves another
limit set or another budget period."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from ratelimiter.engine import Engine
from ratelimiter.engine.blocks import BLOCK_MEASURE, _as_block
from ratelimiter.engine.durations import time_zone
from ratelimiter.engine.frames import SPEC_SIZE
from ratelimiter.engine.limits import (
    Budget,
    Concurrency,
    Gate,
    Limit,
    SharedWindow,
    SlidingWindow,
    copy_with,
)
from ratelimiter.engine.multiplex import pack

DAY_MS = 86_400_000
NOW = 1_800_000_000_000


def reference(specs: Sequence[list[Any]], keys: Sequence[str]) -> tuple[bytes, bytes, bytes]:
    """The specs, the settle plan and the flat specs packed from whole values, as lib.lua reads
    them: the plan is record_each's (what settlement changes, each limit with its place in the
    group), the flat specs 9 values each, padded to 8 and the last 1 if capped."""
    plan: list[Any] = []
    flat: list[Any] = []
    for place, (spec, key) in enumerate(zip(specs, keys, strict=True), 1):
        kind = spec[0]
        size = SPEC_SIZE[kind]
        flat += [*spec[:size], *[0] * (8 - size), 1 if len(spec) > size else 0]
        if kind == "b":
            plan += ["b", place, key, spec[1], spec[3], spec[5], spec[6], spec[7]]
        elif kind == "l":
            plan += ["l", key]
        elif spec[3] and kind != "g":
            plan += ["w", place, key, spec[1], spec[3], spec[4], spec[5]]
    return msgpack.packb(specs), msgpack.packb(plan), msgpack.packb(flat)


def engine(clock: int = NOW) -> Engine:
    """An engine that packs arguments but never reaches Redis."""
    made = Engine.__new__(Engine)
    made.cluster, made.tz, made._clock = False, time_zone("UTC"), lambda: clock
    made._periods, made._layouts, made._limit_parts = {}, {}, {}
    return made


def packed(made: Engine, limits: Sequence[Limit], now: int = NOW) -> list[tuple[bytes, ...]]:
    checked, layout = made._layout(list(limits), True)  # as with a ledger
    return [f.fill(checked) for f in layout.fragments_at(now, made._parts)]


def expected(made: Engine, limits: Sequence[Limit], now: int = NOW) -> list[tuple[bytes, ...]]:
    return [reference(made._specs(limits, now), [limit.key for limit in limits])]


_AMOUNT = st.one_of(st.integers(0, 130), st.integers(0, 2**53 - 1))


@st.composite
def templates(draw: st.DrawFn) -> list[Limit]:
    """Limits of every kind, as a plan holds them."""
    limits: list[Limit] = []
    for n in range(draw(st.integers(0, 10))):
        key, measure = f"k{n}", draw(st.sampled_from([None, "tokens", "spend", "é"]))
        kind = draw(st.sampled_from(["window", "share", "budget", "lease", "gate"]))
        capacity = draw(_AMOUNT)
        if kind == "window":
            limits.append(SlidingWindow(key, capacity, "1m", measure=measure))
        elif kind == "share":
            total = SlidingWindow(f"{key}:total", capacity, "1h", buckets=7)
            share = SharedWindow(key, capacity, "1h", measure=measure, total_key=total.key)
            limits += [total, replace(share, saturation=draw(_AMOUNT))]
        elif kind == "budget":
            period = draw(st.sampled_from(["1d", "monthly", "30s", "100y"]))
            limits.append(Budget(key, capacity, period, 0, measure=measure, retention_ms=5))
        elif kind == "lease":
            limits.append(Concurrency(key, capacity, ttl_ms=draw(st.integers(1, 10**6))))
        else:
            limits.append(Gate(key))
    return limits


def filled(draw: st.DrawFn, limits: list[Limit]) -> list[Limit]:
    """The limits as a request copies them, each with an amount and capped of its own."""
    return [
        copy_with(limit, draw(_AMOUNT), draw(st.booleans()))
        if isinstance(limit, SlidingWindow | Budget)
        else limit
        for limit in limits
    ]


@given(templates(), st.data())
def test_fragments_filled_with_amounts_are_the_packed_specs(
    limits: list[Limit], data: st.DataObject
) -> None:
    made = engine()
    for _ in range(3):  # the first request makes the layout, the next ones fill it in
        request = filled(data.draw, limits)
        assert packed(made, request) == expected(made, request)
    # another set of the same limits, in another order: their parts are reused, placed anew
    request = data.draw(st.permutations(filled(data.draw, limits)))
    assert packed(made, request) == expected(made, request)


def test_a_budget_whose_period_rolls_over_gets_the_new_period() -> None:
    made = engine()
    budget = Budget("b", 100, "1d", 5)
    start = NOW // DAY_MS * DAY_MS
    for now in (NOW, start + DAY_MS - 1, start + DAY_MS, start + 2 * DAY_MS + 7, NOW):
        assert packed(made, [budget], now) == expected(made, [budget], now)
    assert len(made._layouts) == 1  # one layout, its fragments remade per period


def test_a_limit_whose_fields_change_is_another_layout() -> None:
    made = engine()
    window = SlidingWindow("w", 10, "1m", 1, measure="tokens")
    first = packed(made, [window])
    for changed in (
        replace(window, capacity=9),
        replace(window, window="2m"),
        replace(window, measure="spend"),
        SlidingWindow("w", 10, "1m", 1, measure="tokens"),  # equal, but not its copy
    ):
        assert packed(made, [changed]) == expected(made, [changed])
    assert packed(made, [copy_with(window, 1, False)]) == first
    assert len(made._layouts) == 5


def test_a_block_is_not_the_limit_it_is_made_from() -> None:
    made = engine()
    window = SlidingWindow("w", 10, "1m", 1, measure="tokens")
    packed(made, [window])
    block = _as_block(window, 4)
    assert (block.measure, block.amount, block.capped) == (BLOCK_MEASURE, 4, True)
    assert packed(made, [block]) == expected(made, [block])


def test_the_layouts_are_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr("ratelimiter.engine.engine.LAYOUTS", 3)
    made = engine()
    for n in range(10):
        packed(made, [Gate(f"g{n}")])
    assert len(made._layouts) == 3


@given(st.lists(st.text(min_size=1), max_size=5), st.lists(st.text(min_size=1), max_size=5))
def test_keys_packed_once_are_sent_as_the_keys_themselves(keys: list[str], args: list[str]) -> None:
    made = engine()
    limits = [Gate(key) for key in dict.fromkeys(key.replace("\0", "") or "k" for key in keys)]
    checked, layout = made._layout(limits, True)
    (fragments,) = layout.fragments_at(NOW, made._parts)
    sent = [limit.key for limit in checked]
    assert pack(("EVALSHA", 1, fragments.keys, *args)) == pack(("EVALSHA", 1, *sent, *args))
