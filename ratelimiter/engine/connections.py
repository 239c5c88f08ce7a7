"""Connecting to Redis: one URL selects a server, TLS, a unix socket or a Cluster."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..errors import RateLimiterError, RedisUnavailable

__all__ = ["RedisClient", "RedisSettings", "connect", "unavailable_errors"]

RedisClient = aioredis.Redis | RedisCluster

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SENTINEL_SCHEMES = {"redis+sentinel", "rediss+sentinel"}
_SCHEMES = {"redis", "rediss", "unix", *_CLUSTER_SCHEMES, *_SENTINEL_SCHEMES}
DEFAULT_SENTINEL_PORT = 26379
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# Every way redis-py (and the socket under it) reports "Redis did not answer".
unavailable_errors: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.MaxConnectionsError,
    OSError,
    asyncio.TimeoutError,
)
# Redis answers, but will not run a write now: full under noeviction, a replica, a slot in
# migration. For a request that is the same as no Redis: nothing can be decided.
refusing_errors: tuple[type[BaseException], ...] = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where Redis is and how patiently to talk to it.

    ``url`` accepts ``redis://``, ``rediss://`` (TLS), ``unix:///path.sock``; for a
    Cluster, ``redis+cluster://`` / ``rediss+cluster://`` or ``?cluster=true`` (with
    ``cluster=None`` the server is asked whether it runs in Cluster mode); and for Sentinel,
    ``redis+sentinel://[:password@]host:26379[,host2:26379...]/service_name[/db]``
    (``?sentinel_password=`` when the Sentinels have their own).
    """

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool | None = None
    connect_timeout: float = 2.0
    command_timeout: float = 2.0
    retries: int = 2
    max_connections: int = 256

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RedisSettings:
        """Settings from a URL; ``cluster``, ``connect_timeout`` and ``timeout`` (seconds)
        may be given as query parameters, the rest of the query goes to redis-py."""
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise RateLimiterError(
                f"unsupported Redis URL scheme {parts.scheme!r} in {_redact(url)}: use redis://, "
                "rediss://, unix://, redis+cluster://, rediss+cluster:// or redis+sentinel://"
            )
        options: dict[str, Any] = {}
        scheme = parts.scheme
        if scheme in _SENTINEL_SCHEMES:
            options["cluster"] = False
        elif scheme in _CLUSTER_SCHEMES:
            options["cluster"], scheme = True, _CLUSTER_SCHEMES[scheme]
        rest = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "cluster":
                options["cluster"] = _flag(value, url)
            elif name in ("timeout", "command_timeout", "socket_timeout"):
                options["command_timeout"] = _seconds(name, value, url)
            elif name in ("connect_timeout", "socket_connect_timeout"):
                options["connect_timeout"] = _seconds(name, value, url)
            else:
                rest.append((name, value))
        clean = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
        return replace(cls(url=clean, **options), **overrides)

    @property
    def sentinel(self) -> bool:
        return urlsplit(self.url).scheme in _SENTINEL_SCHEMES

    @property
    def address(self) -> str:
        """host:port or socket path, safe to log: never the password."""
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return parts.path
        if self.sentinel:
            service = parts.path.strip("/").split("/")[0]
            return f"{service} via Sentinel {parts.netloc.rpartition('@')[2]}"
        return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _flag(value: str, url: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise RateLimiterError(f"cluster={value!r} in {_redact(url)} must be true or false")


def _seconds(name: str, value: str, url: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise RateLimiterError(
            f"{name}={value!r} in {_redact(url)} must be a positive number of seconds"
        )
    return seconds


@contextlib.contextmanager
def translate_errors(address: str) -> Iterator[None]:
    """Turn redis-py's many ways of not serving a command into one ``RedisUnavailable``."""
    try:
        yield
    except (*unavailable_errors, *refusing_errors) as exc:
        raise as_unavailable(address, exc) from exc


def as_unavailable(address: str, exc: BaseException) -> RedisUnavailable:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, redis_errors.OutOfMemoryError):
        return RedisUnavailable(
            address,
            reason,
            "is out of memory",
            "Free memory (export the spend ledger with --ack) or raise Redis's maxmemory.",
            refusing=True,
        )
    if isinstance(exc, redis_errors.ReadOnlyError):
        return RedisUnavailable(
            address,
            reason,
            "is a read-only replica",
            "Point the Redis URL at the master, or use a redis+sentinel:// or Cluster URL "
            "that follows failovers.",
            refusing=True,
        )
    if isinstance(exc, redis_errors.TryAgainError):
        return RedisUnavailable(
            address, reason, "is moving the slot", "Retry in a moment.", refusing=True
        )
    return RedisUnavailable(address, reason)


def _client_options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.command_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.retries),
        "retry_on_error": [redis_errors.ConnectionError, redis_errors.TimeoutError],
        "max_connections": settings.max_connections,
    }


async def connect(settings: RedisSettings | str) -> RedisClient:
    """A connected client (``Redis`` or ``RedisCluster``), checked with a PING.

    Raises ``RedisUnavailable`` naming the address when the server cannot be reached.
    """
    if isinstance(settings, str):
        settings = RedisSettings.from_url(settings)
    try:
        return await _connect(settings, _client_options(settings))
    except redis_errors.RedisError as exc:  # something answered, but not a usable Redis
        raise RateLimiterError(_unusable(settings, exc)) from None


def _unusable(settings: RedisSettings, exc: redis_errors.RedisError) -> str:
    where = f"{_redact(settings.url)} ({settings.address})"
    if isinstance(exc, redis_errors.InvalidResponse):
        return (
            f"{where} does not answer as Redis does ({exc}): point REDIS_URL or "
            "ratelimiter_settings.redis_url at a Redis server"
        )
    if "DB index is out of range" in str(exc):
        return (
            f"{where}: the server has no database {urlsplit(settings.url).path.strip('/')}; "
            "use a number below its 'databases' setting (16 by default), e.g. /0"
        )
    return f"{where} refused the connection check: {exc}"


async def _connect(settings: RedisSettings, options: dict[str, Any]) -> RedisClient:
    with translate_errors(settings.address):
        if settings.sentinel:
            return await _via_sentinel(settings, options)
        cluster = settings.cluster
        if cluster is not True:
            client = aioredis.Redis.from_url(settings.url, **options)
            try:
                if cluster is None:
                    info = await client.info("cluster")
                    cluster = bool(info.get("cluster_enabled"))
                if not cluster:
                    await client.ping()
                    return client
            except BaseException:
                await client.aclose()
                raise
            await client.aclose()
        client = RedisCluster.from_url(settings.url, **options)
        try:
            await client.initialize()
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return client


async def _via_sentinel(settings: RedisSettings, options: dict[str, Any]) -> aioredis.Redis:
    """The master of a Sentinel-monitored service; after a failover, new connections go to
    the new master (redis-py asks the Sentinels again when a connection fails)."""
    from redis.asyncio.sentinel import Sentinel

    parts = urlsplit(settings.url)
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise RateLimiterError(
            f"{_redact(settings.url)} names no service: use "
            "redis+sentinel://host:26379[,host2:26379]/service_name[/db]"
        )
    query = dict(parse_qsl(parts.query))
    try:
        hosts = [_sentinel_host(item) for item in parts.netloc.rpartition("@")[2].split(",")]
        db = int(path[1]) if len(path) > 1 else 0
    except ValueError:
        raise RateLimiterError(
            f"cannot read {_redact(settings.url)}: Sentinel ports and the db number are "
            "integers, as in redis+sentinel://host:26379,host2:26379/service_name/0"
        ) from None
    sentinel_kwargs = {
        "socket_timeout": settings.command_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "password": query.get("sentinel_password"),
    }
    options = {k: v for k, v in options.items() if k != "max_connections"}
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **options)
    client = sentinel.master_for(
        path[0],
        db=db,
        password=parts.password,
        username=parts.username or None,
    )
    try:
        await client.ping()
    except BaseException:
        await client.aclose()
        raise
    return client


def _sentinel_host(item: str) -> tuple[str, int]:
    host, colon, port = item.rpartition(":")
    if not colon:
        return item or "127.0.0.1", DEFAULT_SENTINEL_PORT
    return host or "127.0.0.1", int(port)
