"""Many concurrent script calls over one Redis connection, pipelined automatically.

redis-py takes a connection from its pool for every command and gives it back after the reply:
per call that is a pool round, a health check and a lone write, about as much CPU in the
sidecar as the Lua itself costs Redis. Here every command issued in one event-loop turn goes
out in a single write on one shared connection, and one reader hands the replies back in
order. Each call is still its own atomic EVALSHA; only the transport is shared, so a hundred
concurrent admissions cost one write and one read system call, not a hundred of each.

The shared connection runs without redis-py's socket timeout, which costs a timer per reply
and a task per write (``asyncio.wait_for``); one watchdog per connection gives the same bound
instead: when commands are in flight and no reply has come for the timeout, the connection
is dropped and every command in flight fails with redis-py's ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection

__all__ = ["Multiplexer", "Packed"]

RETRY_BASE_S, RETRY_CAP_S = 0.05, 0.5


class Multiplexer:
    """Pipelines commands from concurrent callers over one connection of ``client``'s pool.

    A reply that does not arrive within the client's socket timeout, or a broken connection,
    fails every command in flight with redis-py's own ``TimeoutError``/``ConnectionError``
    and drops the connection; the next command opens a new one. Error replies (``NOSCRIPT``,
    script errors) fail only their own command.
    """

    def __init__(self, client: aioredis.Redis, retries: int = 2) -> None:
        self.client, self.retries = client, retries
        self.connection: AbstractConnection | None = None
        self.outbox: list[tuple[bytes, asyncio.Future[Any]]] = []
        self.in_flight: deque[asyncio.Future[Any]] = deque()
        self.flushing: asyncio.Task[None] | None = None
        self.reading: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.connecting = asyncio.Lock()
        # the socket timeout the connection came with, enforced by the watchdog instead
        self.timeout: float | None = None
        self.progress_at = 0.0  # loop time of the last reply, or of a wait's start
        self.watchdog: asyncio.TimerHandle | None = None
        self.dropping: asyncio.Task[None] | None = None  # the watchdog's drop, referenced

    async def execute(self, *command: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.outbox.append((pack(command), future))
        if self.flushing is None:
            self.flushing = asyncio.ensure_future(self._flush())
        return await future

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        """EVALSHA, retried on a lost connection or a timeout like redis-py's own client: our
        scripts are idempotent per request id, so a retry never takes anything twice."""
        for attempt in range(self.retries + 1):
            try:
                return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                if attempt == self.retries:
                    raise
                await asyncio.sleep(min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt))
        raise AssertionError("unreachable")

    async def script_load(self, source: bytes) -> Any:
        return await self.client.script_load(source)

    async def _connect(self) -> AbstractConnection:
        async with self.connecting:
            if self.connection is None:
                connection = await self.client.connection_pool.get_connection()
                self.timeout, connection.socket_timeout = connection.socket_timeout, None
                self.connection = connection
                self.reading = asyncio.ensure_future(self._read(connection))
                if self.timeout:
                    self.watchdog = asyncio.get_running_loop().call_later(self.timeout, self._watch)
            return self.connection

    def _watch(self) -> None:
        """Drop the connection when commands wait and no reply came for the timeout; else
        look again when the oldest wait would reach it."""
        assert self.timeout
        loop = asyncio.get_running_loop()
        late = loop.time() - self.progress_at
        if self.in_flight and late >= self.timeout:
            self.watchdog = None
            error = redis_errors.TimeoutError(f"no reply from Redis within {self.timeout:g}s")
            self.dropping = loop.create_task(self._drop(error))
            return
        wait = self.timeout - late if self.in_flight else self.timeout
        self.watchdog = loop.call_later(wait, self._watch)

    async def _flush(self) -> None:
        # Runs one loop turn after the first command: everything queued by then goes together.
        try:
            connection = await self._connect()
        except BaseException as exc:
            batch, self.outbox, self.flushing = self.outbox, [], None
            for _, future in batch:
                if not future.done():
                    future.set_exception(_as_redis_error(exc))
            return
        batch, self.outbox = [(c, f) for c, f in self.outbox if not f.done()], []
        try:
            if batch:
                if not self.in_flight:  # the wait for a reply starts now
                    self.progress_at = asyncio.get_running_loop().time()
                self.in_flight.extend(future for _, future in batch)
                self.ready.set()
                packed = [command for command, _ in batch]
                await connection.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            await self._drop(exc)
        finally:
            self.flushing = asyncio.ensure_future(self._flush()) if self.outbox else None

    async def _read(self, connection: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.in_flight:
                    self.ready.clear()
                    await self.ready.wait()
                try:
                    reply: Any = await connection.read_response()
                except redis_errors.ResponseError as error:
                    reply = error
                self.progress_at = loop.time()
                future = self.in_flight.popleft()
                if future.done():  # its caller gave up; the reply is simply dropped
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._drop(exc, reading=True)

    async def _drop(self, exc: BaseException, reading: bool = False) -> None:
        connection, self.connection = self.connection, None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        error = _as_redis_error(exc)
        while self.in_flight:
            future = self.in_flight.popleft()
            if not future.done():
                future.set_exception(error)
        if self.reading is not None and not reading:
            self.reading.cancel()
        self.reading = None
        if connection is not None:
            connection.socket_timeout = self.timeout  # as the pool lent it
            with contextlib.suppress(Exception):
                await connection.disconnect()
            with contextlib.suppress(Exception):
                await self.client.connection_pool.release(connection)

    async def aclose(self) -> None:
        if self.reading is not None:
            self.reading.cancel()
        await self._drop(redis_errors.ConnectionError("the engine was closed"))


class Packed(bytes):
    """``count`` arguments already in RESP, each ``$<length>`` CRLF value, CRLF between them and
    none after: sent as they are, for arguments that many commands repeat (a limit set's keys)."""

    count: int


def pack(command: tuple[Any, ...]) -> bytes:
    """A command in RESP. redis-py's packer spends ~4 us per argument, and an admission has
    dozens of arguments; this does the same for str, bytes and int in a fraction of that: the
    parts are joined by CRLF once, with the ``$<length>`` heads of short arguments made ahead."""
    parts = [b""]
    count = len(command)
    for arg in command:
        kind = type(arg)
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is Packed:
            if arg.count:
                parts.append(arg)
            count += arg.count - 1
            continue
        elif kind is not bytes:
            arg = _other(arg)
        size = len(arg)
        parts.append(_HEADS[size] if size < len(_HEADS) else b"$%d" % size)
        parts.append(arg)
    parts[0] = b"*%d" % count
    parts.append(b"")
    return b"\r\n".join(parts)


_HEADS = tuple(b"$%d" % size for size in range(1024))


def _other(arg: Any) -> bytes:
    """An argument that is not exactly a str, an int or bytes (a subclass, a float)."""
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    if isinstance(arg, bytes):
        return bytes(arg)
    raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")


def _as_redis_error(exc: BaseException) -> BaseException:
    if isinstance(exc, redis_errors.RedisError):
        return exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return redis_errors.TimeoutError(str(exc) or "Timeout reading from Redis")
    return redis_errors.ConnectionError(str(exc) or type(exc).__name__)
