"""Structured logs: one JSON object per line, with the fields callers pass as ``extra``.

Any string in a line may come from a client (an end-user id, a model name, a path), so each one
is cut to ``FIELD_CHARS`` with a marker saying how much was cut: a client cannot write
megabyte lines. The message keeps its own text whole up to ``MESSAGE_CHARS`` and a traceback up
to ``TRACEBACK_CHARS``.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["FIELD_CHARS", "JsonFormatter", "configure_logging", "info_line"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

FIELD_CHARS = 200
MESSAGE_CHARS = 1_000
TRACEBACK_CHARS = 10_000


# Values a line shows as they are (checked by type: an ABC's isinstance costs a microsecond).
_PLAIN = frozenset({int, float, bool, type(None)})


def _cut(text: str, limit: int = FIELD_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters cut]"


def _bounded(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, Mapping):
        return {_cut(str(k)): _bounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_bounded(v) for v in value]
    return value


def _message(record: logging.LogRecord) -> str:
    """The message with each string argument cut, as ``LogRecord.getMessage`` makes it."""
    message = str(record.msg)
    args = record.args
    if isinstance(args, Mapping):
        message %= {k: _bounded(v) for k, v in args.items()}
    elif args:
        message %= tuple(_bounded(a) for a in args)
    return _cut(message, MESSAGE_CHARS)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        entry.update((k, _bounded(v)) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["error"] = _cut(self.formatException(record.exc_info), TRACEBACK_CHARS)
        return orjson.dumps(entry, default=lambda value: _cut(str(value))).decode()


def info_line(logger: logging.Logger, message: str, fields: Mapping[str, Any]) -> None:
    """``logger.info(message, extra=fields)`` for a flat ``fields`` (the proxy's line per
    request). When the line would go to configure_logging's one JSON handler, it is written
    straight away: the same line, without a LogRecord, a walk of its attributes and a
    formatter (~60 us a line). Any other set-up (text lines, more handlers, filters, a test
    capturing records) gets the record, as ever."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _json_handler(logger)
    if handler is None:
        logger.info(message, extra=fields)
        return
    entry: dict[str, Any] = {
        "ts": _timestamp(time.time()),
        "level": "info",
        "logger": logger.name,
        "message": message,
    }
    for name, value in fields.items():
        # most fields are short strings, numbers or None: bounded here, without a call
        kind = type(value)
        if kind in _PLAIN or (kind is str and len(value) <= FIELD_CHARS):
            entry[name] = value
        else:
            entry[name] = _bounded(value)
    line = orjson.dumps(entry, default=lambda value: _cut(str(value))).decode()
    _write_soon(handler, line + handler.terminator)


# Lines written in one turn of the event loop, per handler: they go out in one write at the
# end of the turn, where under load each request's line was a system call of its own.
_PENDING: dict[logging.StreamHandler[Any], list[str]] = {}


def _write_soon(handler: logging.StreamHandler[Any], line: str) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _write(handler, line)
        return
    lines = _PENDING.get(handler)
    if lines is None:
        lines = _PENDING[handler] = []
        loop.call_soon(_flush, handler)
    lines.append(line)


def _flush(handler: logging.StreamHandler[Any]) -> None:
    lines = _PENDING.pop(handler, None)
    if lines:
        _write(handler, "".join(lines))


@atexit.register
def _flush_all() -> None:
    """A loop stopped before its last turn's lines went out: they go now."""
    for handler in list(_PENDING):
        _flush(handler)


def _write(handler: logging.StreamHandler[Any], text: str) -> None:
    with handler.lock:  # type: ignore[union-attr]
        handler.stream.write(text)
        handler.flush()


def _json_handler(logger: logging.Logger) -> logging.StreamHandler[Any] | None:
    """The one handler a record of ``logger`` reaches, when it is a JSON stream handler that
    lets INFO through and nothing else filters; else None."""
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    handlers = logging.root.handlers
    if len(handlers) != 1 or logging.root.filters:
        return None
    handler = handlers[0]
    if (
        type(handler) is not logging.StreamHandler
        or not isinstance(handler.formatter, JsonFormatter)
        or handler.filters
        or handler.level > logging.INFO
    ):
        return None
    return handler


def _timestamp(now: float) -> str:
    """As JsonFormatter writes it: 2026-01-31T12:00:00.123+00:00."""
    seconds = int(now)
    return f"{_second(seconds)}.{int((now - seconds) * 1000):03d}+00:00"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def configure_logging(json: bool = True, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
