"""The proxy routes: authenticate, admit across every scope in one step, forward, settle.

One path serves every API surface (OpenAI's chat/completions/embeddings and Responses,
Anthropic's Messages): what differs between them is a surface adapter (surfaces/).

A request is estimated (prompt characters / 4 + the most it may generate), admitted by one
atomic acquire for all its limits, forwarded to a deployment of its model (the next one is
tried when a deployment's own rpm/tpm is full), and settled with the usage the upstream
reports. Streams pass through unbuffered; usage is taken from the events that carry it (for
chat, the final chunk, which is asked for and, if the client did not ask, removed before it
reaches the client).

A request that sets ``max_tokens`` holds its whole estimate; one that does not holds it capped
at what its limits have left, or under ``budget_enforcement: strict`` is sent with
``max_tokens`` set to what they afford (see policy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Sequence,
)
from dataclasses import replace
from types import TracebackType
from typing import Any, Generic, TypeVar

import aiohttp
import msgpack
import orjson
from aiohttp import web

from ..engine import Blocks, Decision, Grant, Reservation
from ..engine.limits import MAX_AMOUNT, Budget, Limit, SharedWindow, SlidingWindow
from ..errors import EntityError, RedisUnavailable
from ..ledger import ledger_dims
from ..pricing import Price, Usage, dollars, estimated_cost, read_usage
from ..responses import HeaderTemplate, json_response
from .alerts import ALERTS
from .capacity import BLOCKS, add_capacity_blocks, give_back, take_blocks, with_block_states
from .config import Deployment, Settings
from .http import (
    CLIENT_REQUEST_ID,
    ENGINE,
    HTTP,
    MAX_BODY_BYTES,
    REQUEST_ID,
    SETTINGS,
    SETTLING,
    STORE,
    Settling,
    bearer,
    error_answer,
)
from .logs import info_line
from .metrics import METRICS, timer
from .policy import STRICT_MIN_TOKENS, Plan, Resolved, Scope, completion_room, plan_for
from .resolver import Caller, authenticate, check_model_access, resolve
from .routing import aliases_of, listed_names, route
from .shadow_counts import count_shadow_refusal
from .side_routes import _remember_answer, add_side_routes, carried_tokens
from .surfaces import SURFACES, StreamTally, Surface
from .surfaces.base import response_id
from .tags import client_tags, key_tags, request_tags, without_tags
from .tracing import OPERATIONS, end_span, spend_usd, start_span, trace_call

__all__ = ["HTTP", "add_proxy_routes"]

log = logging.getLogger("ratelimiter.proxy")
T = TypeVar("T")
TOKEN_MEASURES = ("tokens", "input_tokens", "output_tokens")


def _deployments(settings: Settings, model: str, caller: Caller | None = None) -> list[Deployment]:
    """The deployments to try for ``model``, after the caller's aliases (routing.py)."""
    aliases = aliases_of(caller.user, caller.key, caller.team) if caller is not None else {}
    served = aliases.get(model)
    found = route(settings, model if served is None else served)
    if not found:
        what = f"model {model!r}" if served is None else f"alias {model!r} (of {served!r})"
        raise EntityError(404, f"{what} is not served here: ask GET /v1/models", "model")
    return found if served is None else [replace(d, alias=model) for d in found]


class Call:
    """One proxied request from admission to settlement."""

    def __init__(
        self, request: web.Request, surface: Surface, body: dict[str, Any], deadline: float
    ) -> None:
        self.request, self.surface, self.body = request, surface, body
        self.kind = surface.kind
        self.app = request.app
        self.settings: Settings = self.app[SETTINGS]
        self.engine = self.app[ENGINE]
        # Ours, never the client's: a reused id must not reach another request's hold.
        self.request_id = request[REQUEST_ID]
        self.client_request_id = request.get(CLIENT_REQUEST_ID)
        self.started = time.perf_counter()
        self.meta, self.dims = b"", ["proxy:all"]
        self.scopes: tuple[Scope, ...] = ()
        self.usage: dict[str, Any] = {}
        self.charged: dict[str, int] | None = None
        self.reservation: Reservation | None = None
        self.limits: list[Limit] | None = None  # kept to charge later when Redis was down
        self.grants: list[Grant] = []  # what it took from this sidecar's capacity blocks
        self.deployment: Deployment | None = None
        self.sent = False  # the upstream may have the prompt: from here on it is billed
        self.finished = False  # settled or released: both happen once
        # the settlement or release to make in Redis once the response is on its way
        self.update: Callable[[], Awaitable[Any]] | None = None
        self.tally = StreamTally()  # what a stream has shown of its usage and output
        self.response_id: str | None = None  # the upstream's id (chatcmpl-…), for the ledger
        self.deadline = deadline
        self.prompt, self.most = surface.estimate(
            body, self.settings.default_max_tokens, self.settings.prompt_estimate
        )
        self.bounded = surface.bounds_itself(body)
        self.strict = not self.bounded and self.settings.budget_enforcement == "strict"
        if self.strict and surface.unsized_input(body):
            raise EntityError(
                400,
                "budget_enforcement: strict cannot bound a request whose earlier turns are kept "
                "upstream (conversation): their size is unknown here. Send the turns in input, "
                "or continue with previous_response_id",
                "conversation",
            )
        self.choices = surface.choices(body)
        self.writes_cache = surface.writes_cache(body)
        self.end_user = surface.end_user_of(request.headers, body, self.settings.end_user_headers)
        self.client_tags = client_tags(
            request.headers, body, self.settings.reject_clientside_metadata_tags
        )
        self.max_tokens: int | None = None  # what strict enforcement sends upstream
        # for the trace: the last decision, its estimate in nano-dollars, Redis time before it
        self.decision: Decision | None = None
        self.shadow: frozenset[str] = frozenset()  # keys of the limits in shadow (shadow.py)
        self.headers: HeaderTemplate | None = None  # of an admission in its plan's order
        self.estimate_nano: int | None = None
        self.admission_redis_s = 0.0

    def admission_deadline(self) -> _AdmissionDeadline:
        return _AdmissionDeadline(self.app, self.deadline)

    async def admit(self, caller: Caller) -> tuple[Deployment, Decision] | web.Response:
        store = self.app[STORE]
        last: Decision | None = None
        for attempt, deployment in enumerate(
            _deployments(self.settings, self.body["model"], caller)
        ):
            if attempt:
                # Its own id: on a Cluster a refused attempt leaves a released record in the
                # slots it took, which the same id would meet as a reuse.
                self.request_id = self.request[REQUEST_ID] = f"{self.request[REQUEST_ID]}.{attempt}"
            check_model_access(caller, deployment, self.settings)
            self.surface.check_deployment(deployment)
            price = deployment.price
            if price is None and not self.surface.free and not self._unpriced_ok(deployment):
                raise EntityError(
                    400,
                    f"model {deployment.model_name!r} has no price: set "
                    "input_cost_per_token/output_cost_per_token in model_list",
                )
            self.estimate_nano = estimated_cost(
                price, self.prompt, self.most, writes_cache=self.writes_cache
            )
            resolved = await self.admission_deadline().run(
                resolve(
                    store,
                    self.settings,
                    caller,
                    deployment,
                    self.end_user,
                    self.prompt + self.most,
                    self.estimate_nano,
                    input_tokens=self.prompt,
                    output_tokens=self.most,
                    tags=self.client_tags,
                )
            )
            self.scopes = resolved.scopes
            plan = plan_for(
                resolved.scopes,
                resolved.model,
                self.settings.key_prefix,
                round(self.settings.lease_ttl_s * 1000),
                self.surface.counts,
            )
            limits = plan.limits(resolved, capped=not self.bounded and not self.strict)
            self.shadow = plan.unblocked if self.settings.shadow else plan.shadowed
            metrics = self.app[METRICS]
            self.describe(caller, deployment)
            self.limits = limits
            asked = time.perf_counter()
            try:
                with timer(metrics.redis_seconds):
                    async with self.admission_deadline():
                        if self.strict:
                            limits = self.limits = await self._bound(resolved, price, plan, limits)
                        decision = await self._acquire(limits)
            except RedisUnavailable as exc:
                refused = self._refuse_unchecked(exc, limits)
                if refused is exc:
                    raise
                if refused is not None:
                    raise refused from exc
                # The request goes through unchecked; its usage is charged to every limit
                # once Redis answers again.
                metrics.redis_errors.inc()
                metrics.labelled(metrics.admissions, "unchecked").inc()
                log.warning("admitting %s unchecked: %s", self.request_id, exc)
                self.deployment = deployment
                return deployment, Decision(True, self.request_id, ())
            self.admission_redis_s += time.perf_counter() - asked
            self.decision = decision
            outcome = "admitted" if decision.allowed else "refused"
            metrics.labelled(metrics.admissions, outcome).inc()
            if decision.allowed:
                self.reservation, self.deployment = decision.reservation, deployment
                if self.grants:
                    decision = with_block_states(self.app[BLOCKS], decision, self.grants)
                if self._blocks() is None:  # else its states are not in the plan's order
                    self.headers = plan.headers(self.settings.shadow)
                self._count_shadow_refusal(decision)
                return deployment, decision
            if isinstance(decision.refused, Budget):
                self.app[ALERTS].refused(decision.refused)
            refused = decision.refused.name if decision.refused else ""
            metrics.labelled(metrics.refusals, refused.split(":")[0], decision.reason or "").inc()
            last = decision
            if not (decision.refused and decision.refused.name.startswith("deployment:")):
                break
        assert last is not None
        return self.surface.refusal(last, self.request_id, self._fit_hint(last, price))

    async def _acquire(self, limits: list[Limit]) -> Decision:
        """One atomic acquire of ``limits``, less those this sidecar's capacity blocks serve
        (capacity.py); what the blocks granted goes back unused unless it is admitted."""
        blocks = self._blocks()
        if blocks is not None:
            # a shadow limit is always decided in the acquire, where its would-be refusal is
            # counted exactly as the same limit enforced would be: never from a block
            enforced = [limit for limit in limits if limit.key not in self.shadow]
            served, self.grants = await take_blocks(blocks, self.settings.capacity_blocks, enforced)
            limits = [*served, *(limit for limit in limits if limit.key in self.shadow)]
        try:
            decision = await self.engine.acquire(
                self.request_id, limits, meta=self.meta, ledger=self.dims, shadow=self.shadow
            )
        except BaseException:
            self._give_back(None)
            raise
        if not decision.allowed:
            self._give_back(None)
        return decision

    def _blocks(self) -> Blocks | None:
        """This sidecar's capacity blocks, when they serve this request's limits."""
        return None if self.strict else self.app.get(BLOCKS)

    def _give_back(self, actuals: dict[str, int] | None) -> None:
        grants, self.grants = self.grants, []
        give_back(self.app, grants, actuals)

    def _count_shadow_refusal(self, decision: Decision) -> None:
        limit = decision.shadow_refused
        if limit is not None:
            metrics = self.app[METRICS]
            scope = limit.name.split(":")[0]
            metrics.labelled(metrics.shadow_refusals, scope, decision.shadow_reason or "").inc()
            count_shadow_refusal(self.app, self.scopes, limit)

    def shadow_fields(self) -> dict[str, Any]:
        """What the log line and the ledger entry say of a shadow limit's would-be refusal."""
        decision = self.decision
        if decision is None or decision.shadow_refused is None:
            return {}
        return {
            "shadow_refused": decision.shadow_refused.name,
            "shadow_reason": decision.shadow_reason,
        }

    def _fit_hint(self, refused: Decision, price: Price | None) -> str:
        """For a request held at its own max_tokens, refused by a token window or a budget:
        the largest max_tokens that would fit now (DESIGN: a refusal says so)."""
        if not self.bounded or self.kind == "embedding":
            return ""
        limit = refused.refused
        if not isinstance(limit, Budget) and not (
            isinstance(limit, SlidingWindow) and limit.measure in TOKEN_MEASURES
        ):
            return ""
        if isinstance(limit, SharedWindow):  # what fits depends on who borrows and who waits
            return ""
        room = completion_room(refused.states, self.prompt, price, self.choices)
        if room is None:
            return ""
        if room < 1:
            return "Nothing fits now: what is left does not cover even the prompt."
        return f"The largest max_tokens that fits now is {room}."

    async def _bound(
        self, resolved: Resolved, price: Price | None, plan: Plan, limits: list[Limit]
    ) -> list[Limit]:
        """budget_enforcement: strict. The request's limits with the completion bounded to what
        they afford now (at most default_max_tokens), held in full. Between this peek and the
        acquire others may take the room: the acquire then refuses, it never over-admits."""
        # shadow limits must not change what is served: they do not bound the request
        measured = [
            limit for limit in limits if limit.measure is not None and limit.key not in self.shadow
        ]
        room = None
        if measured:
            states = await self.engine.peek(measured)
            room = completion_room(states, self.prompt, price, self.choices)
        default = self.settings.default_max_tokens
        # Below the minimum the request is held at the minimum, which the engine refuses
        # with the refusing limit's retry-after unless room came free meanwhile.
        tokens = default if room is None else max(min(default, room), self._minimum)
        self.max_tokens = tokens
        most = tokens * self.choices
        bounded = replace(
            resolved,
            tokens=self.prompt + most,
            output_tokens=most,
            cost=estimated_cost(price, self.prompt, most, writes_cache=self.writes_cache),
        )
        return plan.limits(bounded)

    @property
    def _minimum(self) -> int:
        return min(STRICT_MIN_TOKENS, self.settings.default_max_tokens)

    def _refuse_unchecked(
        self, exc: RedisUnavailable, limits: Sequence[Limit]
    ) -> RedisUnavailable | None:
        """With Redis unreachable: None to let the request through (on_redis_error: allow,
        while fewer than max_unchecked_requests wait to be charged), else the error to answer
        with. A refused request's acquire may still reach Redis later: it is abandoned, so it
        takes nothing."""
        waiting = self.app[DEFERRED].pending
        # A Redis that answers but will not write (full, a replica) is not an outage to ride
        # out: what it refuses now it would refuse to charge later.
        if self.settings.on_redis_error == "allow" and not exc.refusing:
            if waiting < self.settings.max_unchecked_requests:
                return None
            exc = RedisUnavailable(
                exc.address,
                str(exc.__cause__ or exc),
                hint=f"{waiting} requests already went through unchecked and wait to be "
                "charged (ratelimiter_settings.max_unchecked_requests): no more until Redis "
                "is back.",
            )
        self.app[DEFERRED].put(functools.partial(self.engine.abandon, self.request_id, limits))
        return exc

    def _unpriced_ok(self, deployment: Deployment) -> bool:
        if self.settings.unpriced_models == "refuse":
            return False
        warned = self.app[UNPRICED_WARNED]
        if deployment.label not in warned:
            warned.add(deployment.label)
            log.warning("model %s has no price; its requests count as free", deployment.model_name)
        return True

    def log_fields(self, deployment: Deployment, status: int, caller: Caller) -> dict[str, Any]:
        """What a log line may say about a request: never the key or the prompt."""
        key = caller.key or {}
        return {
            "request_id": self.request_id,
            "client_request_id": self.client_request_id,
            "route": self.kind,
            "status": status,
            "model": deployment.model_name,
            "deployment": deployment.deployment_id,
            "key_alias": key.get("key_alias"),
            "key_hash": (caller.token or "")[:12] or None,
            "user_id": key.get("user_id"),
            "team_id": key.get("team_id"),
            "organization_id": (caller.organization or {}).get("organization_id"),
            "end_user": self.end_user,
            "stream": self.surface.streams(self.body),
            "charged": self.charged,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 1),
            **self.shadow_fields(),
        }

    def trace_attributes(self) -> dict[str, Any]:
        """The span's attributes (tracing.py): GenAI's semantic conventions, then ours."""
        deployment, decision, usage = self.deployment, self.decision, self.usage
        refused = decision.refused if decision is not None and not decision.allowed else None
        return {
            "gen_ai.operation.name": OPERATIONS.get(self.kind, self.kind),
            "gen_ai.provider.name": self.surface.flavor,
            "gen_ai.request.model": self.body.get("model"),
            "gen_ai.request.max_tokens": self.most if self.bounded else None,
            "gen_ai.response.id": self.response_id,
            "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
            "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
            "ratelimiter.route": self.kind,
            "ratelimiter.request_id": self.request_id,
            "ratelimiter.deployment": deployment.deployment_id if deployment else None,
            "ratelimiter.scopes": [scope.kind for scope in self.scopes] or None,
            "ratelimiter.decision": (
                None if decision is None else "admitted" if decision.allowed else "refused"
            ),
            "ratelimiter.refused_by": refused.name if refused is not None else None,
            "ratelimiter.refusal_reason": decision.reason if refused is not None else None,
            "ratelimiter.shadow_refused_by": self.shadow_fields().get("shadow_refused"),
            "ratelimiter.estimate.input_tokens": self.prompt,
            "ratelimiter.estimate.output_tokens": self.most,
            "ratelimiter.estimate.spend_usd": spend_usd(self.estimate_nano),
            "ratelimiter.charged.tokens": (self.charged or {}).get("tokens"),
            "ratelimiter.charged.spend_usd": spend_usd((self.charged or {}).get("spend")),
            "ratelimiter.redis.admission_ms": round(self.admission_redis_s * 1000, 3),
        }

    def describe(self, caller: Caller, deployment: Deployment) -> None:
        """What the ledger entry will say of this request (never the key or the prompt)."""
        key = caller.key or {}
        fields = {
            "key_hash": caller.token,
            "key_alias": key.get("key_alias"),
            "user_id": key.get("user_id"),
            "team_id": key.get("team_id"),
            "organization_id": (caller.organization or {}).get("organization_id"),
            "end_user": self.end_user,
            "model": deployment.model_name,
            "deployment": deployment.deployment_id,
            "route": self.kind,
            "client_request_id": self.client_request_id,
            "tags": list(request_tags(key_tags(caller.key), self.client_tags)) or None,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        self.meta, self.dims = msgpack.packb(fields), ledger_dims(fields)

    def settle(self, actuals: dict[str, int]) -> None:
        """Charge ``actuals``, once. Only the bookkeeping happens now; the Redis update is
        made by ``finish`` when the request leaves the handler, off the client's latency."""
        if self.finished:
            return
        self.finished, self.charged = True, actuals
        info = msgpack.packb({**self.usage, **self.shadow_fields()})
        if self.reservation is not None:
            self.update = functools.partial(self._settle, self.reservation, actuals, info)
        elif self.limits is not None:
            charge = functools.partial(
                self.engine.charge,
                self.request_id,
                self.limits,
                actuals,
                meta=self.meta,
                ledger=self.dims,
                info=info,
            )
            self.app[DEFERRED].put(charge)

    async def _settle(self, reservation: Reservation, actuals: dict[str, int], info: bytes) -> None:
        await self.engine.settle(reservation, actuals, info=info)
        self.app[ALERTS].observe(self.scopes)

    def release(self) -> None:
        """Free everything held, once (the upstream never had the request); made by
        ``finish`` as ``settle`` is."""
        if self.finished:
            return
        self.finished = True
        if self.reservation is not None:
            self.update = functools.partial(self.engine.release, self.reservation)
        elif self.limits is not None:  # admitted unchecked: its acquire may land late
            self.app[DEFERRED].put(
                functools.partial(self.engine.abandon, self.request_id, self.limits)
            )

    def finish(self) -> None:
        """The one exit every admitted request passes: whatever ended it (our bug, a bad
        upstream payload, a client gone, a shutdown), what the upstream may have billed is
        charged, else everything is released. It never waits: the Redis update runs as a
        task of its own (SETTLING), which shutdown waits for."""
        if not self.finished and self.deployment is not None:
            if self.sent:
                self.settle(self.stream_actuals(self.deployment))
            else:
                self.release()
        update, self.update = self.update, None
        if update is not None:
            self.app[SETTLING].start(self._now_or_later(update))
        self._give_back(self.charged)

    async def _now_or_later(self, update: Callable[[], Awaitable[Any]]) -> None:
        """The client has its answer, whatever Redis does next: with Redis gone the update
        waits in the deferred queue (settling is idempotent per request id, so a retry after
        a lost reply cannot charge twice)."""
        try:
            await update()
        except RedisUnavailable as exc:
            self.app[METRICS].redis_errors.inc()
            log.warning("settling %s when Redis is back: %s", self.request_id, exc)
            self.app[DEFERRED].put(update)
        except Exception:  # no handler is left to answer with it: the log is the only trace
            log.exception("settling %s failed", self.request_id)

    async def renew(self) -> None:
        if self.reservation is not None:
            await self.engine.renew(self.reservation)

    def upstream_body(self, deployment: Deployment) -> dict[str, Any]:
        return self.surface.upstream_body(without_tags(self.body), deployment, self.max_tokens)

    def stream_actuals(self, deployment: Deployment) -> dict[str, int]:
        """What to charge for a stream, finished or cut short: the usage its events carried,
        with output at least the characters streamed / 4 when it did not reach its end."""
        tally = self.tally
        usage = reported_usage(tally.usage, self.surface.flavor)
        if usage is not None and not tally.complete:
            usage = usage._replace(output=max(usage.output, -(-tally.chars // 4)))
            if usage.prompt == 0:
                usage = usage._replace(input=self.prompt)
        return self.actuals(deployment, usage, tally.chars)

    def actuals(
        self, deployment: Deployment, usage: Usage | None, generated_chars: int = 0
    ) -> dict[str, int]:
        """What to charge: the upstream's usage when it is sane, else the prompt estimate
        and the characters it generated / 4. Cached input is priced at its own rate; what the
        token windows count of it is ratelimiter_settings.tpm_counts."""
        reported = usage is not None
        if usage is None:
            usage = Usage(input=self.prompt, output=-(-generated_chars // 4))
        price = deployment.price
        spend = min(price.cost(usage) if price is not None else 0, MAX_AMOUNT)
        self.usage = {
            "prompt_tokens": usage.prompt,
            "completion_tokens": usage.output,
            "cache_read_input_tokens": usage.cache_read,
            "cache_creation_input_tokens": usage.cache_write,
            "reasoning_tokens": usage.reasoning,
            "usage_reported": reported,
        }
        if self.response_id is not None:
            self.usage["response_id"] = self.response_id
        metrics = self.app[METRICS]
        metrics.labelled(metrics.spend, deployment.label).inc(dollars(spend))
        tokens = usage.total
        if self.settings.tpm_counts == "uncached":
            tokens -= usage.cache_read
        return {
            "tokens": min(tokens, MAX_AMOUNT),
            "input_tokens": min(tokens - usage.output, MAX_AMOUNT),
            "output_tokens": min(usage.output, MAX_AMOUNT),
            "spend": spend,
        }


def reported_usage(usage: Any, flavor: str = "openai") -> Usage | None:
    """An upstream's ``usage`` as billed buckets, or None when it is absent or malformed (not
    an object, not whole numbers, negative, absurd): see pricing.read_usage."""
    return read_usage(usage, flavor)


UNPRICED_WARNED = web.AppKey("unpriced_warned", set)


class DeferredWork:
    """Redis updates that had to wait for Redis: charging requests admitted while it was
    unreachable (on_redis_error: allow), settling requests answered meanwhile, abandoning
    acquires whose answer never came. Made in order, each retried until Redis answers."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Callable[[], Awaitable[Any]]] = asyncio.Queue()
        self.pending = 0  # queued, or being retried

    def put(self, work: Callable[[], Awaitable[Any]]) -> None:
        self.pending += 1
        self.queue.put_nowait(work)

    async def run(self) -> None:
        while True:
            work = await self.queue.get()
            try:
                while True:
                    try:
                        await work()
                        break
                    except RedisUnavailable:
                        await asyncio.sleep(1)
                    except Exception:  # one bad update must not stop the ones behind it
                        log.exception("a deferred Redis update failed and was dropped")
                        break
            finally:
                self.pending -= 1


DEFERRED = web.AppKey("deferred_redis_work", DeferredWork)


class Renewals:
    """The calls in flight, whose leases and hold one task renews for as long as the
    upstream takes, streamed or not: a slow answer must not free its parallel slot while it
    still runs. Each tick (a third of the lease TTL) renews the calls that have run a tick:
    a call is first renewed between one and two ticks after it started, before its lease
    (three ticks) lapses; the many that end sooner cost a set entry, not a task each."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.calls: dict[Call, float] = {}  # call -> loop time it started

    def add(self, call: Call, now: float) -> None:
        """Renew ``call`` from now (loop time) until ``remove``: a pair of calls, not a
        context manager, which cost a generator per request."""
        self.calls[call] = now

    def remove(self, call: Call) -> None:
        del self.calls[call]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            due = loop.time() - self.tick_s
            calls = [call for call, started in self.calls.items() if started <= due]
            # one failed renewal is retried on the next tick; it must not stop the others
            await asyncio.gather(*(call.renew() for call in calls), return_exceptions=True)


RENEWALS = web.AppKey("renewals", Renewals)


async def _renewals(app: web.Application) -> AsyncIterator[None]:
    renewals = app[RENEWALS] = Renewals(app[SETTINGS].lease_ttl_s / 3)
    task = asyncio.create_task(renewals.run())
    yield
    task.cancel()


async def _settling(app: web.Application) -> AsyncIterator[None]:
    settling = app[SETTLING] = Settling()
    yield
    # Shutdown waits for every settlement, before the deferred queue stops and the engine
    # closes (cleanup_ctx unwinds in reverse).
    await settling.drain()


async def _run_deferred(app: web.Application) -> AsyncIterator[None]:
    deferred = app[DEFERRED] = DeferredWork()
    task = asyncio.create_task(deferred.run())
    yield
    task.cancel()
    if deferred.pending:
        log.error("%d deferred Redis updates were never made (Redis stayed down)", deferred.pending)


async def _read_body(request: web.Request, surface: Surface) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise EntityError(400, f"send the body as application/json, not {request.content_type!r}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise EntityError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes") from None
    try:
        return surface.check(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise EntityError(400, f"the body is not valid JSON: {exc}") from None


class _AdmissionDeadline:
    """Every Redis call before admission shares one deadline: a paused Redis costs a client
    redis_timeout, not the timeout of each call and each of its retries. A class, not an
    async generator: it is entered three times per request."""

    __slots__ = ("app", "deadline", "timeout")

    def __init__(self, app: web.Application, deadline: float) -> None:
        self.app, self.deadline = app, deadline

    async def __aenter__(self) -> None:
        self.timeout = asyncio.timeout_at(self.deadline)
        await self.timeout.__aenter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            raise self._unavailable() from None
        if kind is not None and issubclass(kind, TimeoutError):
            raise self._unavailable() from None

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``await coro`` under the deadline, whose timer is armed only if ``coro`` waits.
        Most requests find the entities they need in the store's cache and never wait, and
        arming an asyncio timeout costs more than the rest of such a call. It is armed after
        ``coro``'s first step, before the loop runs again, so it bites as if armed first."""
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except TimeoutError:
            raise self._unavailable() from None
        async with self:
            return await _Resumed(coro, waiting)

    def _unavailable(self) -> RedisUnavailable:
        return RedisUnavailable(
            self.app[ENGINE].address,
            f"no answer within {self.app[SETTINGS].redis_timeout_s:g}s "
            "(ratelimiter_settings.redis_timeout)",
        )


class _Resumed(Generic[T]):
    """The rest of a coroutine whose first step ended waiting on ``waiting``: awaited, it
    hands that wait to the task, then steps the coroutine as ``await`` would have."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def __await__(self) -> Generator[Any, Any, T]:
        coro, step = self.coro, self.waiting
        while True:
            try:
                answer = yield step
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancelled (the deadline), or thrown in: it is coro's
                try:
                    step = coro.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    step = coro.send(answer)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]


def proxy_route(surface: Surface) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        start_span(request, surface.kind)
        try:
            response = await _answered(request, surface)
        except web.HTTPException as exc:
            end_span(request, exc.status)
            raise
        except BaseException:  # cancelled: the client went away
            end_span(request, 499)
            raise
        end_span(request, response.status)
        return response

    return handler


async def _answered(request: web.Request, surface: Surface) -> web.StreamResponse:
    try:
        return await _proxied(request, surface)
    except (asyncio.CancelledError, web.HTTPException):
        raise
    except Exception as exc:  # in the surface's own error envelope
        return surface.envelope(error_answer(request, exc))


async def _proxied(request: web.Request, surface: Surface) -> web.StreamResponse:
    app = request.app  # a property that looks the app up on each use
    settings = app[SETTINGS]
    deadline = asyncio.get_running_loop().time() + settings.redis_timeout_s
    # Who is calling first: a caller with no valid key costs no body parsing or estimate.
    admission = _AdmissionDeadline(app, deadline)
    caller = await admission.run(authenticate(app[STORE], settings, bearer(request)))
    call = Call(request, surface, await _read_body(request, surface), deadline)
    trace_call(request, call)
    previous = surface.continues(call.body)
    if previous is not None:  # the earlier turns are billed again as input: held too
        async with admission:
            call.prompt += await carried_tokens(app, caller, previous)
    admitted = await call.admit(caller)
    if isinstance(admitted, web.Response):
        return admitted
    deployment, decision = admitted
    in_flight = app[METRICS].in_flight
    in_flight.inc()
    status = 499  # the client went away before an answer was made
    # Leases and the hold are renewed for as long as the upstream takes, streamed or not:
    # a slow answer must not free its parallel slot while it still runs.
    renewals = app[RENEWALS]
    renewals.add(call, asyncio.get_running_loop().time())
    response: web.StreamResponse | None = None
    try:
        try:
            response = await forward(call, deployment, decision)
            status = response.status
        finally:
            renewals.remove(call)
            try:
                call.finish()  # its settlement queued before the answer leaves
            finally:
                in_flight.dec()
        answer = call.tally.extra.get("id")
        if answer and status < 400:  # retrievable by its id once the client has it
            await _remember_answer(call, caller, deployment, answer)
        await _send(request, response)
        return response
    finally:
        info_line(log, "proxied", call.log_fields(deployment, status, caller))


async def _send(request: web.Request, response: web.StreamResponse) -> None:
    """A whole answer written out now rather than when the handler returns, so that the log
    line and the metrics after it are not part of the client's wait (a stream is out already).
    A client gone meanwhile is aiohttp's to notice, as for any answer."""
    if response.prepared:
        return
    with contextlib.suppress(ConnectionResetError):
        await response.prepare(request)
        await response.write_eof()


async def forward(call: Call, deployment: Deployment, decision: Decision) -> web.StreamResponse:
    surface = call.surface
    url = surface.upstream_url(deployment)
    headers = surface.upstream_headers(call.request, deployment)
    # made once: the answer, an error or the stream each carry them
    failure = surface.rate_headers(decision, call.request_id, call.headers)
    payload = orjson.dumps(call.upstream_body(deployment))
    try:
        with timer(call.app[METRICS].upstream_seconds):
            call.sent = True
            upstream = await call.app[HTTP].post(url, data=payload, headers=headers)
        async with upstream:
            if upstream.status >= 400:
                return await _upstream_error(call, deployment, upstream, failure)
            if surface.streams(call.body):
                return await _stream(call, deployment, failure, upstream)
            raw = await upstream.read()
    except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
        if isinstance(exc, _NEVER_SENT):
            call.release()
        # else the upstream had the request and may bill it: finish() charges the prompt
        if isinstance(exc, TimeoutError):
            return surface.error(
                504,
                f"the upstream for {deployment.model_name!r} did not answer "
                f"within {call.settings.upstream_timeout_s:g}s",
                "upstream_timeout",
                headers=failure,
            )
        return surface.error(
            502,
            f"the upstream for {deployment.model_name!r} could not be "
            f"reached: {type(exc).__name__}",
            "upstream_error",
            headers=failure,
        )
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        call.response_id = response_id(answer.get("id"))
    # With no sane usage, what came back is charged: its text, or the whole body when it
    # is not an answer at all.
    generated = surface.generated_chars(answer) if answer is not None else len(raw)
    call.settle(call.actuals(deployment, surface.usage(answer), generated))
    call.tally.extra["id"] = surface.answer_id(answer)
    return web.Response(
        body=raw, status=upstream.status, content_type="application/json", headers=failure
    )


async def _upstream_error(
    call: Call, deployment: Deployment, upstream: aiohttp.ClientResponse, headers: dict[str, str]
) -> web.Response:
    raw = await upstream.read()
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        payload = None
    payload = payload if isinstance(payload, dict) else {}
    error = payload.get("error")
    usage = call.surface.error_usage(payload)
    if usage is not None:  # it consumed tokens even though it failed
        call.settle(call.actuals(deployment, usage))
    else:
        call.release()
    message = error.get("message") if isinstance(error, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return call.surface.error(
        upstream.status,
        message
        if isinstance(message, str) and message
        else raw.decode(errors="replace")[:500] or f"upstream answered {upstream.status}",
        kind if isinstance(kind, str) and kind else "upstream_error",
        headers=headers,
    )


# Failures that mean the request never left: nothing to bill.
_NEVER_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# An SSE line longer than this is no event we can read (OpenAI's and Anthropic's are a few KB):
# it is passed on as it comes and charged as generated text, so that an upstream sending no
# newline cannot grow the sidecar's memory without end.
MAX_SSE_LINE = 1 << 20


async def _stream(
    call: Call,
    deployment: Deployment,
    headers: dict[str, str],
    upstream: aiohttp.ClientResponse,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
    )
    wanted = call.surface.wants_usage(call.body)
    try:
        await response.prepare(call.request)
        # Whatever arrived is read line by line but written back in one piece: a write per
        # SSE line cost more CPU than the rest of the stream's handling together.
        partial: list[bytes] = []  # the start of a line, kept in pieces: joined once, whole
        held = 0  # its length
        overlong = False  # in a line longer than MAX_SSE_LINE: passed on unread
        async for data in upstream.content.iter_any():
            if overlong:
                data, overlong = await _pass_on_overlong(call, response, data)
            end = data.rfind(b"\n") + 1
            if end:
                lines = b"".join((*partial, data[:end])) if partial else data[:end]
                partial, held = [], 0
                out = _read_sse(call, lines, wanted)
                if out:
                    await response.write(out)
            if end < len(data):
                partial.append(data[end:])
                held += len(data) - end
                if held > MAX_SSE_LINE:
                    overlong = True
                    await _pass_on_overlong(call, response, b"".join(partial))
                    partial, held = [], 0
        if partial:
            await response.write(b"".join(partial))
    except (aiohttp.ClientError, OSError):
        # The client left (stop paying for tokens nobody reads) or the upstream broke off:
        # the caller's finish() charges what was streamed.
        upstream.close()
        return response
    call.settle(call.stream_actuals(deployment))
    # Started before the client can see the end: closing the upstream response afterwards
    # waits on the loop, and a client's next request would meet this one's lease still held.
    call.finish()
    with contextlib.suppress(aiohttp.ClientError, OSError):
        await response.write_eof()
    return response


async def _pass_on_overlong(
    call: Call, response: web.StreamResponse, data: bytes
) -> tuple[bytes, bool]:
    """The part of an overlong line in ``data`` goes to the client unread and is charged as
    generated characters; returns what follows the line, and whether the line goes on."""
    cut = data.find(b"\n") + 1
    line = data[:cut] if cut else data
    call.tally.chars += len(line)
    await response.write(line)
    return (data[cut:], False) if cut else (b"", True)


def _read_sse(call: Call, lines: bytes, wanted: bool) -> bytes:
    """Whole SSE lines (``lines`` ends with a newline) as the client gets them: each data
    line read by ``_read_sse_line``, those it keeps from the client left out. The lines are
    passed on as they came unless one is left out: most chunks are never split and joined
    again, and blank and ``event:`` lines never reach a function call."""
    kept: list[bytes] | None = None
    split = lines.split(b"\n")
    split.pop()  # after the last newline: nothing
    for at, line in enumerate(split):
        if line[:5] == b"data:" and not _read_sse_line(call, line, wanted):
            if kept is None:
                kept = split[:at]
        elif kept is not None:
            kept.append(line)
    if kept is None:
        return lines
    return b"\n".join(kept) + b"\n" if kept else b""


def _read_sse_line(call: Call, line: bytes, wanted: bool) -> bool:
    """Take usage and generated characters from one SSE data line (its surface reads the
    event); False to keep it from the client. A data line that is not a JSON object (other
    than OpenAI's closing ``[DONE]``) is passed on and counted whole as generated text: an
    upstream streaming words we cannot read still pays for them."""
    data = line[5:].strip()
    if data[:1] != b"{":
        if data != b"[DONE]":
            call.tally.chars += len(data)
        return True
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        call.tally.chars += len(data)
        return True
    if call.response_id is None:
        call.response_id = response_id(call.surface.event_id(event))
    return call.surface.stream_event(call.tally, event, wanted)


async def list_models(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    caller = await authenticate(request.app[STORE], settings, bearer(request))
    routes = request.query.get("return_wildcard_routes", "").lower() == "true"  # LiteLLM's
    names = []
    for name in listed_names(settings, wildcard_routes=routes):
        try:
            check_model_access(caller, route(settings, name)[0], settings)
        except EntityError:
            continue
        names.append(name)
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "ratelimiter"}
                for name in names
            ],
        }
    )


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=10, sock_read=app[SETTINGS].upstream_timeout_s
    )
    # No cap on connections per host (aiohttp's default is 100): the limits decide how many
    # calls run, and a 101st stream must not wait silently for a pooled connection. No
    # cookie jar: a cookie one upstream answer sets must not ride on other keys' requests.
    connector = aiohttp.TCPConnector(limit=0)
    app[HTTP] = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[HTTP].close()


def add_proxy_routes(app: web.Application) -> None:
    app[UNPRICED_WARNED] = set()
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_run_deferred)
    add_capacity_blocks(app)  # closed after the settling context drains
    app.cleanup_ctx.append(_settling)
    app.cleanup_ctx.append(_renewals)
    for prefix in ("/v1", "", "/anthropic/v1"):
        for path, surface in SURFACES.items():
            if prefix == "/anthropic/v1" and surface.flavor != "anthropic":
                continue  # LiteLLM's Anthropic pass-through prefix serves Messages only
            app.router.add_post(f"{prefix}/{path}", proxy_route(surface))
        add_side_routes(app, prefix)
        if prefix != "/anthropic/v1":
            app.router.add_get(f"{prefix}/models", list_models)
