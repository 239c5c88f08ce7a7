"""Prometheus metrics, one registry per app (no process-global state)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["METRICS", "Metrics", "add_metrics", "timer"]

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    admissions: Counter
    refusals: Counter
    redis_seconds: Histogram
    upstream_seconds: Histogram
    in_flight: Gauge
    spend: Counter
    redis_errors: Counter
    sink_lag_entries: Gauge
    sink_lag_seconds: Gauge
    shadow_refusals: Counter
    capacity_block_units: Gauge
    # (metric, label values) -> child: labels() checks and locks on every call (~4 us)
    children: dict[tuple[Any, tuple[str, ...]], Any] = field(default_factory=dict)

    def labelled(self, metric: Counter, *values: str) -> Counter:
        """``metric.labels(*values)``, made once; as many as the metric's own children."""
        key = (metric, values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = metric.labels(*values)
        return child

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter(
                "ratelimiter_requests", "HTTP requests", ["route", "status"], registry=r
            ),
            admissions=Counter(
                "ratelimiter_admissions", "Admission decisions", ["outcome"], registry=r
            ),
            refusals=Counter(
                "ratelimiter_refusals",
                "Refusals by scope and reason",
                ["scope", "reason"],
                registry=r,
            ),
            redis_seconds=Histogram(
                "ratelimiter_redis_seconds", "Admission call latency", buckets=_LATENCY, registry=r
            ),
            upstream_seconds=Histogram(
                "ratelimiter_upstream_seconds",
                "Upstream time to response headers",
                buckets=_LATENCY,
                registry=r,
            ),
            in_flight=Gauge("ratelimiter_in_flight", "Proxied requests in flight", registry=r),
            spend=Counter("ratelimiter_spend_dollars", "Settled spend", ["model"], registry=r),
            redis_errors=Counter("ratelimiter_redis_errors", "Redis calls that failed", registry=r),
            sink_lag_entries=Gauge(
                "ratelimiter_ledger_sink_lag_entries",
                "Ledger entries waiting in Redis for the sink (the shipper's last round)",
                registry=r,
            ),
            sink_lag_seconds=Gauge(
                "ratelimiter_ledger_sink_lag_seconds",
                "Age of the oldest ledger entry waiting for the sink",
                registry=r,
            ),
            shadow_refusals=Counter(
                "ratelimiter_shadow_refusals",
                "Requests a shadow limit would have refused (served), by scope and reason",
                ["scope", "reason"],
                registry=r,
            ),
            capacity_block_units=Gauge(
                "ratelimiter_capacity_block_units",
                "Capacity counted in Redis that this sidecar's blocks hold unused (the "
                "under-admission they cause now), by limit, in the limit's own units",
                ["limit"],
                registry=r,
            ),
        )


METRICS = web.AppKey("metrics", Metrics)


SINK_LAG = web.AppKey("sink_lag", Callable[[], Awaitable[Any]])
# this sidecar's capacity blocks, unused units by limit (capacity.py), read at each scrape
BLOCK_UNITS = web.AppKey("block_units", Callable[[], dict[str, int]])


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if SINK_LAG in request.app:  # the shipper's last round, as it wrote it to Redis
        with contextlib.suppress(Exception):
            lag = await request.app[SINK_LAG]()
            if lag is not None:
                metrics.sink_lag_entries.set(lag.entries)
                metrics.sink_lag_seconds.set(lag.seconds)
    if BLOCK_UNITS in request.app:
        metrics.capacity_block_units.clear()  # limits whose blocks are all settled drop out
        for limit, units in request.app[BLOCK_UNITS]().items():
            metrics.capacity_block_units.labels(limit).set(units)
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics(app: web.Application) -> None:
    app[METRICS] = Metrics.create()
    app.router.add_get("/metrics", _metrics)


class timer:
    """Observe the seconds a block takes into a histogram."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.perf_counter() - self.started)
