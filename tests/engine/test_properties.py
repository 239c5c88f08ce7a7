"""Random sequences of acquire, settle, release, renew, expiry and passing time, run against
real Redis and against the plain-Python model in tests/model.py: every answer must agree.

The token window and the budget are capped in some examples: a request then takes up to its
amount while anything is left. Either way a limit is passed only by settlements above what a
request took, each by its own excess (``check_overshoot``), and a capped request is admitted
only while at least one unit is left."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimiter import Budget, Concurrency, Engine, SharedWindow, SlidingWindow
from ratelimiter.engine.durations import time_zone

from ..conftest import ManualClock
from .model import BudgetModel, LeaseModel, ShareModel, WindowModel, admit

HOLD_TTL = 20_000
# Long enough that Redis's own (real-time) key expiry never fires during an example.
WINDOWS = [10_000, 30_000, 60_000]

configs = st.fixed_dictionaries(
    {
        "rpm": st.integers(0, 6),
        "rpm_window": st.sampled_from(WINDOWS),
        "rpm_buckets": st.sampled_from([1, 3, 10, 60]),
        "tpm": st.integers(0, 150),
        "tpm_window": st.sampled_from(WINDOWS),
        "tpm_buckets": st.sampled_from([1, 4, 60]),
        "leases": st.integers(0, 3),
        "lease_ttl": st.sampled_from([10_000, 25_000]),
        "budget": st.sampled_from([0, 300, 500, 1_000, 1_337]),
        "tpm_capped": st.booleans(),
        "budget_capped": st.booleans(),
        "period": st.sampled_from(["10s", "1m", "daily"]),
        "start": st.integers(0, 86_400_000),
    }
)
amounts = st.one_of(st.sampled_from([0, 100, 250, 500]), st.integers(0, 600))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(0, 12_000)),
        st.tuples(
            st.just("acquire"),
            st.integers(1, 15),
            st.integers(0, 80),
            amounts,
            st.one_of(st.just(0), st.integers(1, 15)),  # which limits are shadow
        ),
        st.tuples(st.just("settle"), st.integers(0, 99), st.integers(0, 80), amounts),
        st.tuples(st.just("release"), st.integers(0, 99)),
        st.tuples(st.just("renew"), st.integers(0, 99)),
        st.tuples(st.just("expire")),
    ),
    max_size=50,
)


@dataclass
class Request:
    rid: str
    mask: int  # which of the four limits it met
    tokens: int
    spend: int
    period_start: int
    deadline: int
    status: str = "held"
    charged: dict[str, int] = field(default_factory=dict)
    took: dict[str, int] = field(default_factory=dict)  # what the limits took, by measure
    final: dict[str, int] = field(default_factory=dict)  # what they hold now, by measure

    def excess(self, measure: str) -> int:
        """How far its settlement passed what it took: the most it can push a limit over."""
        return max(self.final.get(measure, 0) - self.took.get(measure, 0), 0)


class Scenario:
    def __init__(self, engine: Engine, clock: ManualClock, config: dict[str, Any]) -> None:
        ns = uuid.uuid4().hex
        self.engine, self.clock = engine, clock
        self.rpm = WindowModel(
            SlidingWindow(
                f"{ns}:rpm",
                config["rpm"],
                f"{config['rpm_window'] // 1000}s",
                buckets=config["rpm_buckets"],
            )
        )
        self.tpm = WindowModel(
            SlidingWindow(
                f"{ns}:tpm",
                config["tpm"],
                f"{config['tpm_window'] // 1000}s",
                measure="tokens",
                buckets=config["tpm_buckets"],
                capped=config["tpm_capped"],
            )
        )
        self.lease = LeaseModel(Concurrency(f"{ns}:par", config["leases"], config["lease_ttl"]))
        self.budget = BudgetModel(
            Budget(
                f"{{{ns}}}:b",
                config["budget"],
                config["period"],
                0,
                capped=config["budget_capped"],
            ),
            time_zone("UTC"),
        )
        self.requests: list[Request] = []

    def limits(self, mask: int, tokens: int, spend: int) -> list[Any]:
        chosen: list[Any] = []
        if mask & 1:
            chosen.append(self.rpm.limit)
        if mask & 2:
            w = self.tpm.limit
            chosen.append(w.with_amount(tokens))
        if mask & 4:
            chosen.append(self.lease.limit)
        if mask & 8:
            b = self.budget.limit
            chosen.append(b.with_amount(spend))
        return chosen

    async def acquire(self, mask: int, tokens: int, spend: int, shadow: int = 0) -> None:
        """``shadow``: the bits of the limits that are shadow. One that would refuse does
        not: the request is admitted by the others and no shadow limit takes anything."""
        now = self.clock.now
        rid = f"r{len(self.requests)}"
        limits = self.limits(mask, tokens, spend)
        shadowed = [limit.key for limit in self.limits(mask & shadow, tokens, spend)]
        decision = await self.engine.acquire(rid, limits, shadow=shadowed)
        if mask & 4:
            self.lease.purge(now)
        checks: dict[int, tuple[str | None, int | None]] = {}
        took: dict[str, int] = {}
        if mask & 1:
            checks[1] = self.rpm.check(now, 1)
        if mask & 2:
            checks[2] = self.window_check(now, tokens, took)
        if mask & 4:
            checks[4] = self.lease.check(now)
        if mask & 8:
            checks[8] = self.budget_check(now, spend, took)
        shadow_bits = frozenset(bit for bit in checks if bit & shadow)
        outcome = admit(checks, shadow_bits)
        assert decision.allowed == (outcome.refusal is None), (decision, checks)
        assert [s.shadow for s in decision.states] == [bit in shadow_bits for bit in checks]
        if outcome.refusal is not None:
            assert (decision.reason, decision.retry_after_ms) == outcome.refusal
            assert decision.shadow_refused is None
            self.expect_states(decision, mask, now, taken=False)
            assert all(s.taken is None for s in decision.states)  # refused takes nothing
            return
        got = (decision.shadow_reason, decision.shadow_retry_after_ms)
        assert got == (outcome.would or (None, None))
        taken = sum(outcome.taken)  # the bits of the limits that count it
        took = {m: n for m, n in took.items() if taken & {"tokens": 2, "spend": 8}[m]}
        self.take(decision, Request(rid, taken, tokens, spend, 0, 0), mask, took)

    def take(self, decision: Any, request: Request, asked: int, took: dict[str, int]) -> None:
        """The model takes the limits in ``request.mask`` of the ``asked`` ones it met."""
        now, rid, mask = self.clock.now, request.rid, request.mask
        if mask & 1:
            assert self.rpm.exact_used(now) + 1 <= self.rpm.limit.capacity
            self.rpm.take(rid, now, 1)
        if mask & 2:
            assert self.tpm.exact_used(now) + took["tokens"] <= self.tpm.limit.capacity
            self.tpm.take(rid, now, took["tokens"])
        if mask & 4:
            self.lease.leases[rid] = now + self.lease.limit.ttl_ms
        start = self.budget.period(now)[0]
        if mask & 8:
            assert self.budget.current(now) + took["spend"] <= self.budget.limit.capacity
            self.budget.add(start, took["spend"])
        request.period_start, request.deadline = start, now + HOLD_TTL
        request.took, request.final = took, dict(took)
        self.requests.append(request)
        self.expect_states(decision, asked, now, taken=True)
        taken = {1: 1, 2: took.get("tokens"), 4: 1, 8: took.get("spend")}
        expected = [taken[bit] if mask & bit else 0 for bit in (1, 2, 4, 8) if asked & bit]
        assert [s.taken for s in decision.states] == expected

    def window_check(self, now: int, tokens: int, took: dict[str, int]) -> tuple[Any, Any]:
        if not self.tpm.limit.capped:
            took["tokens"] = tokens
            return self.tpm.check(now, tokens)
        reason, retry, took["tokens"] = self.tpm.check_capped(now, tokens)
        assert reason is not None or tokens == 0 or self.tpm.used(now) < self.tpm.limit.capacity
        return reason, retry

    def budget_check(self, now: int, spend: int, took: dict[str, int]) -> tuple[Any, Any]:
        if not self.budget.limit.capped:
            took["spend"] = spend
            return self.budget.check(now, spend)
        reason, retry, took["spend"] = self.budget.check_capped(now, spend)
        return reason, retry

    def check_overshoot(self) -> None:
        """A limit is over its capacity by at most the excess of the requests it counts."""
        now = self.clock.now
        by_rid = {r.rid: r for r in self.requests}
        counted = {e.rid for e in self.tpm.counted(now)}
        excess = sum(by_rid[rid].excess("tokens") for rid in counted)
        assert self.tpm.used(now) <= self.tpm.limit.capacity + excess
        start = self.budget.period(now)[0]
        excess = sum(
            r.excess("spend") for r in self.requests if r.mask & 8 and r.period_start == start
        )
        assert self.budget.current(now) <= self.budget.limit.capacity + excess

    def expect_states(self, decision: Any, mask: int, now: int, taken: bool) -> None:
        expected: list[tuple[int, int]] = []
        if mask & 1:
            expected.append(
                (max(self.rpm.limit.capacity - self.rpm.used(now), 0), self.rpm.reset(now))
            )
        if mask & 2:
            expected.append(
                (max(self.tpm.limit.capacity - self.tpm.used(now), 0), self.tpm.reset(now))
            )
        if mask & 4:
            used = len(self.lease.leases)
            expected.append((max(self.lease.limit.capacity - used, 0), self.lease.reset(now, used)))
        if mask & 8:
            expected.append(
                (
                    max(self.budget.limit.capacity - self.budget.current(now), 0),
                    self.budget.period(now)[1] - now,
                )
            )
        got = [(s.remaining, s.reset_ms) for s in decision.states]
        assert got == expected, (taken, got, expected)

    async def finish(self, index: int, mode: str, tokens: int = 0, spend: int = 0) -> None:
        if not self.requests:
            return
        req = self.requests[index % len(self.requests)]
        if mode == "release":
            result = await self.engine.release(req.rid)
        else:
            result = await self.engine.settle(req.rid, {"tokens": tokens, "spend": spend})
        if req.status != "held":
            assert (result.status, result.first, result.charged) == (req.status, False, req.charged)
            return
        final_tokens, final_spend = (0, 0) if mode == "release" else (tokens, spend)
        if req.mask & 1 and mode == "release":
            self.rpm.set_amount(req.rid, 0)
        if req.mask & 2:
            self.tpm.set_amount(req.rid, final_tokens)
            req.charged["tokens"] = req.final["tokens"] = final_tokens
        if req.mask & 8:
            self.budget.add(req.period_start, final_spend - req.took["spend"])
            req.charged["spend"] = req.final["spend"] = final_spend
        self.lease.leases.pop(req.rid, None)
        if mode == "settle":  # every measure settled is recorded, limited or not
            req.charged = {"tokens": final_tokens, "spend": final_spend}
        req.status = "released" if mode == "release" else "settled"
        assert (result.status, result.first, result.charged) == (req.status, True, req.charged)
        assert result.reserved == req.took

    async def renew(self, index: int) -> None:
        if not self.requests:
            return
        req = self.requests[index % len(self.requests)]
        renewal = await self.engine.renew(req.rid)
        if req.status != "held":
            assert renewal.status == req.status
            return
        lost = 0
        if req.mask & 4 and not self.lease.renew(req.rid, self.clock.now):
            lost = 1
        req.deadline = self.clock.now + HOLD_TTL
        assert (renewal.status, renewal.lost_leases) == ("held", lost)

    async def expire(self) -> None:
        now = self.clock.now
        collected = await self.engine.collect_expired()
        due = [r for r in self.requests if r.status == "held" and r.deadline <= now]
        assert sorted(h.request_id for h in collected) == sorted(r.rid for r in due)
        for req in due:
            req.status = "expired"
            req.charged = dict(req.took)
            self.lease.leases.pop(req.rid, None)
        for hold in collected:
            req = next(r for r in due if r.rid == hold.request_id)
            assert hold.reserved == req.charged

    async def check_peek(self) -> None:
        now = self.clock.now
        states = await self.engine.peek(self.limits(15, 0, 0))
        assert [s.remaining for s in states] == [
            max(self.rpm.limit.capacity - self.rpm.used(now), 0),
            max(self.tpm.limit.capacity - self.tpm.used(now), 0),
            max(self.lease.limit.capacity - self.lease.live(now), 0),
            max(self.budget.limit.capacity - self.budget.current(now), 0),
        ]

    async def check(self) -> None:
        await self.check_peek()
        self.check_overshoot()


async def run(
    redis_url: str,
    config: dict[str, Any],
    steps: list[tuple[Any, ...]],
    scenario_of: Callable[[Engine, ManualClock, dict[str, Any]], Any] = Scenario,
) -> None:
    """``steps`` against a fresh engine on a manual clock, each followed by the scenario's
    checks of Redis against the model."""
    clock = ManualClock(1_800_000_000_000 + config["start"])
    engine = await Engine.connect(
        redis_url, clock=clock, hold_ttl_ms=HOLD_TTL, prefix=f"p:{uuid.uuid4().hex}:"
    )
    try:
        scenario = scenario_of(engine, clock, config)
        for op, *args in steps:
            if op == "advance":
                clock.advance(args[0])
            elif op == "acquire":
                await scenario.acquire(*args)
            elif op in ("settle", "release"):
                await scenario.finish(args[0], op, *args[1:])
            elif op == "renew":
                await scenario.renew(args[0])
            else:
                await scenario.expire()
            await scenario.check()
    finally:
        await engine.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, steps=ops)
def test_engine_agrees_with_the_model(
    redis_url: str, config: dict[str, Any], steps: list[tuple[Any, ...]]
) -> None:
    asyncio.run(run(redis_url, config, steps))


# -- shares of a total window (SharedWindow) ------------------------------------------------

share_configs = st.fixed_dictionaries(
    {
        "total": st.one_of(st.just(0), st.integers(40, 200)),
        "window": st.sampled_from(WINDOWS),
        "buckets": st.sampled_from([1, 4, 60]),
        "share_buckets": st.sampled_from([1, 4, 60]),
        "shares": st.lists(
            st.one_of(st.sampled_from([0.1, 0.25, 0.5, 0.9]), st.floats(0, 1)),
            min_size=2,
            max_size=3,
        ),
        "saturation": st.one_of(st.sampled_from([0.3, 0.5, 0.8]), st.floats(0, 1)),
        "capped": st.booleans(),
        "start": st.integers(0, 86_400_000),
    }
)
# small against the total, so that shares fill, borrow and wait within a few steps
share_amounts = st.one_of(st.integers(1, 40), st.integers(1, 40), amounts)
share_ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([1_000, 4_000, 10_000])),
        st.tuples(st.just("advance"), st.integers(0, 6_000)),
        st.tuples(st.just("acquire"), st.integers(0, 2), share_amounts),
        st.tuples(st.just("acquire"), st.integers(0, 2), share_amounts),
        st.tuples(st.just("settle"), st.integers(0, 99), share_amounts),
        st.tuples(st.just("release"), st.integers(0, 99)),
        st.tuples(st.just("expire")),
    ),
    min_size=10,
    max_size=60,
)


class ShareScenario:
    """One total token window and two or three shares of it, each request meeting the total
    and its own share, as a deployment's tpm split by priority does."""

    def __init__(self, engine: Engine, clock: ManualClock, config: dict[str, Any]) -> None:
        ns = uuid.uuid4().hex
        self.engine, self.clock, self.capped = engine, clock, config["capped"]
        window = f"{config['window'] // 1000}s"
        total = config["total"]
        self.total = WindowModel(
            SlidingWindow(
                f"{{{ns}}}:tpm", total, window, measure="tokens", buckets=config["buckets"]
            )
        )
        board: dict[str, tuple[int, int]] = {}
        peers: dict[str, WindowModel] = {}
        self.shares: list[ShareModel] = []
        for n, fraction in enumerate(config["shares"]):
            limit = SharedWindow(
                f"{{{ns}}}:tpm:p{n}",
                int(total * fraction),
                window,
                measure="tokens",
                buckets=config["share_buckets"],
                total_key=self.total.limit.key,
                saturation=int(total * config["saturation"]),
            )
            own = WindowModel(limit)
            peers[limit.key] = own
            self.shares.append(ShareModel(own, self.total, board, peers))
        self.requests: list[Request] = []
        self.owner: dict[str, ShareModel] = {}

    def limits(self, share: ShareModel, tokens: int) -> list[Any]:
        return [
            self.total.limit.with_amount(tokens, self.capped),
            share.own.limit.with_amount(tokens, self.capped),  # type: ignore[attr-defined]
        ]

    async def acquire(self, which: int, tokens: int) -> None:
        now = self.clock.now
        share = self.shares[which % len(self.shares)]
        rid = f"r{len(self.requests)}"
        decision = await self.engine.acquire(rid, self.limits(share, tokens))
        if self.capped:
            t_reason, t_retry, t_take = self.total.check_capped(now, tokens)
            s_reason, s_retry, s_take = share.check_capped(now, tokens)
        else:
            (t_reason, t_retry), t_take = self.total.check(now, tokens), tokens
            (s_reason, s_retry), s_take = share.check(now, tokens), tokens
        refusals = [c for c in ((t_reason, t_retry), (s_reason, s_retry)) if c[0] is not None]
        assert decision.allowed == (not refusals), (decision, refusals)
        if refusals:
            never = [c for c in refusals if c[1] is None]
            expected = never[0] if never else max(refusals, key=lambda c: c[1] or 0)
            assert (decision.reason, decision.retry_after_ms) == expected
            assert all(s.taken is None for s in decision.states)  # refused takes nothing
            self.expect_states(decision, share, now)
            share.mark_waiting(now, min(tokens, 1) if self.capped else tokens)
            return
        # admitted past its share only below the saturation level, leaving the waiting room
        if share.own.used(now) + s_take > share.share:
            assert self.total.used(now) + s_take <= share.level(now)
        assert self.total.exact_used(now) + t_take <= self.total.limit.capacity
        self.total.take(rid, now, t_take)
        share.own.take(rid, now, s_take)
        self.owner[rid] = share
        request = Request(rid, 0, tokens, 0, 0, now + HOLD_TTL)
        request.took = {"tokens": t_take, "share": s_take}
        request.final = dict(request.took)
        self.requests.append(request)
        assert [s.taken for s in decision.states] == [t_take, s_take]
        self.expect_states(decision, share, now)

    def expect_states(self, decision: Any, share: ShareModel, now: int) -> None:
        got = [(s.remaining, s.reset_ms) for s in decision.states]
        assert got == [
            (max(self.total.limit.capacity - self.total.used(now), 0), self.total.reset(now)),
            (max(share.share - share.own.used(now), 0), share.own.reset(now)),
        ]

    async def finish(self, index: int, mode: str, tokens: int = 0) -> None:
        if not self.requests:
            return
        req = self.requests[index % len(self.requests)]
        if mode == "release":
            result = await self.engine.release(req.rid)
        else:
            result = await self.engine.settle(req.rid, {"tokens": tokens})
        if req.status != "held":
            assert (result.status, result.first) == (req.status, False)
            return
        final = 0 if mode == "release" else tokens
        self.total.set_amount(req.rid, final)  # both counters take the actual, once
        self.owner[req.rid].own.set_amount(req.rid, final)
        req.final = {"tokens": final, "share": final}
        req.status = "released" if mode == "release" else "settled"
        assert (result.status, result.first) == (req.status, True)

    async def expire(self) -> None:
        now = self.clock.now
        collected = await self.engine.collect_expired()
        due = [r for r in self.requests if r.status == "held" and r.deadline <= now]
        assert sorted(h.request_id for h in collected) == sorted(r.rid for r in due)
        for req in due:
            req.status = "expired"

    async def check(self) -> None:
        now = self.clock.now
        for share in self.shares:
            states = await self.engine.peek(self.limits(share, 0))
            assert [s.remaining for s in states] == [
                max(self.total.limit.capacity - self.total.used(now), 0),
                max(share.share - share.own.used(now), 0),
            ]
        counted = {e.rid for e in self.total.counted(now)}
        by_rid = {r.rid: r for r in self.requests}
        excess = sum(by_rid[rid].excess("tokens") for rid in counted)
        assert self.total.used(now) <= self.total.limit.capacity + excess


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=share_configs, steps=share_ops)
def test_shared_windows_agree_with_the_model(
    redis_url: str, config: dict[str, Any], steps: list[tuple[Any, ...]]
) -> None:
    asyncio.run(run(redis_url, config, steps, ShareScenario))
