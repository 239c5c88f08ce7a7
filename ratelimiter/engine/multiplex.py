"""Many concurrent script calls over one Redis connection, pipelined automatically.

redis-py takes a connection from its pool for every command and gives it back after the reply:
per call that is a pool round, a health check and a lone write, about as much CPU in the
sidecar as the Lua itself costs Redis. Here every command issued in one event-loop turn goes
out in a single write on one shared connection, and the replies are parsed as they arrive and
handed back in order. Each call is still its own atomic EVALSHA; only the transport is shared,
so a hundred concurrent admissions cost one write and one read system call, not a hundred of
each.

redis-py opens the connection (TLS, a unix socket, a Sentinel's master, AUTH, SELECT, the
protocol version); then the multiplexer becomes the socket's protocol and parses with hiredis
in ``data_received``. Reading through redis-py's stream (a reader task, a buffered stream, an
event to wake it) cost a call about 1.5 times the CPU and, at a low rate, some 70 us more from
write to reply: four hops of the event loop where one does.

The shared connection runs without a timer per reply: one watchdog per connection bounds the
wait instead. When commands are in flight and no reply has come for the client's socket
timeout, the connection is dropped and every command in flight fails with redis-py's
``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection

__all__ = ["Multiplexer", "Packed"]

RETRY_BASE_S, RETRY_CAP_S = 0.05, 0.5


class Multiplexer:
    """Pipelines commands from concurrent callers over one connection of ``client``'s pool.

    A reply that does not arrive within the client's socket timeout, or a broken connection,
    fails every command in flight with redis-py's own ``TimeoutError``/``ConnectionError``
    and drops the connection; the next command opens a new one. Error replies (``NOSCRIPT``,
    script errors) fail only their own command, as redis-py's exception classes.
    """

    def __init__(self, client: aioredis.Redis, retries: int = 2) -> None:
        self.client, self.retries = client, retries
        self.link: _Link | None = None
        self.outbox: list[tuple[bytes, asyncio.Future[Any]]] = []
        self.flush_at: asyncio.Handle | None = None  # the turn's flush, once scheduled
        self.connecting: asyncio.Task[None] | None = None
        self.progress_at = 0.0  # loop time of the last reply, or of a wait's start
        self.watchdog: asyncio.TimerHandle | None = None
        self.dropping: set[asyncio.Task[None]] = set()  # drops under way, referenced

    async def execute(self, *command: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.outbox.append((pack(command), future))
        if self.flush_at is None and self.connecting is None:
            self._schedule_flush(future.get_loop())
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

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.link is None:
            self.connecting = loop.create_task(self._connect())
        else:
            # one loop turn after the first command: everything queued by then goes together
            self.flush_at = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_at = None
        link = self.link
        if link is None:  # lost since the flush was scheduled: the outbox waits for a new one
            if self.outbox and self.connecting is None:
                self._schedule_flush(asyncio.get_running_loop())
            return
        batch, self.outbox = [(c, f) for c, f in self.outbox if not f.done()], []
        if not batch:
            return
        if not link.waiting:  # the wait for a reply starts now
            self.progress_at = asyncio.get_running_loop().time()
        link.waiting.extend(future for _, future in batch)
        link.transport.write(b"".join(command for command, _ in batch))

    async def _connect(self) -> None:
        try:
            connection = await self.client.connection_pool.get_connection()
            try:
                self.link = _Link(self, connection)
            except BaseException:
                await self.client.connection_pool.release(connection)
                raise
        except BaseException as exc:
            batch, self.outbox = self.outbox, []
            for _, future in batch:
                if not future.done():
                    future.set_exception(_as_redis_error(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self.connecting = None
        if self.link.timeout:
            loop = asyncio.get_running_loop()
            self.watchdog = loop.call_later(self.link.timeout, self._watch)
        self._flush()

    def _watch(self) -> None:
        """Drop the connection when commands wait and no reply came for the timeout; else
        look again when the oldest wait would reach it. Runs only while a link is up (losing
        it cancels the watchdog)."""
        link = self.link
        assert link is not None and link.timeout
        loop = asyncio.get_running_loop()
        late = loop.time() - self.progress_at
        if link.waiting and late >= link.timeout:
            self.watchdog = None
            self._lost(redis_errors.TimeoutError(f"no reply from Redis within {link.timeout:g}s"))
            return
        wait = link.timeout - late if link.waiting else link.timeout
        self.watchdog = loop.call_later(wait, self._watch)

    def _replied(self) -> None:
        self.progress_at = asyncio.get_running_loop().time()

    def _lost(self, exc: BaseException, link: _Link | None = None) -> None:
        """The connection is gone or given up: every command in flight fails with ``exc``, and
        the next command connects again."""
        link = link or self.link
        if link is None or link.dead:
            return
        link.dead = True
        if self.link is link:
            self.link = None
            if self.watchdog is not None:
                self.watchdog.cancel()
                self.watchdog = None
        error = _as_redis_error(exc)
        while link.waiting:
            future = link.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        task = asyncio.get_running_loop().create_task(link.close(self.client))
        self.dropping.add(task)
        task.add_done_callback(self.dropping.discard)
        if self.outbox and self.flush_at is None and self.connecting is None:
            self._schedule_flush(asyncio.get_running_loop())

    async def aclose(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            with contextlib.suppress(BaseException):
                await self.connecting
        self._lost(redis_errors.ConnectionError("the engine was closed"))
        if self.dropping:
            await asyncio.gather(*self.dropping, return_exceptions=True)


class _Link(asyncio.Protocol):
    """One connection of the pool, taken over once redis-py has opened it: the commands
    waiting for a reply, oldest first, and the replies parsed as they arrive."""

    def __init__(self, owner: Multiplexer, connection: AbstractConnection) -> None:
        writer = connection._writer  # the open socket is ours from here
        if writer is None:
            raise redis_errors.ConnectionError("the pool gave a connection that is not open")
        self.owner, self.connection = owner, connection
        # the socket timeout the connection came with, enforced by the watchdog instead
        self.timeout, connection.socket_timeout = connection.socket_timeout, None
        encoder = connection.encoder
        options: dict[str, Any] = {"replyError": BaseParser.parse_error}
        if encoder.decode_responses:
            options.update(encoding=encoder.encoding, errors=encoder.encoding_errors)
        self.reader = hiredis.Reader(**options)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.dead = False
        self.transport = writer.transport
        self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        if self.dead:  # given up, its close under way: nobody waits for what it says
            return
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.owner._lost(redis_errors.InvalidResponse(str(exc)), self)
                return
            if reply is False:
                return
            if type(reply) is _PUSH:  # RESP3 out-of-band message: no command waits for it
                continue
            self.owner._replied()
            if not self.waiting:  # a reply to nothing: the stream is out of step
                self.owner._lost(redis_errors.InvalidResponse("a reply nobody asked for"), self)
                return
            future = self.waiting.popleft()
            if future.done():  # its caller gave up; the reply is simply dropped
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(exc or redis_errors.ConnectionError("Redis closed the connection"), self)

    async def close(self, client: aioredis.Redis) -> None:
        connection = self.connection
        connection.socket_timeout = self.timeout  # as the pool lent it
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await client.connection_pool.release(connection)


_PUSH = getattr(hiredis, "PushNotification", None)


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
