"""Structured logs: one JSON object per line, with the fields callers pass as ``extra``.

Any string in a line may come from a client (an end-user id, a model name, a path), so each one
is cut to ``FIELD_CHARS`` with a marker saying how much was cut: a client cannot write
megabyte lines. The message keeps its own text whole up to ``MESSAGE_CHARS`` and a traceback up
to ``TRACEBACK_CHARS``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["FIELD_CHARS", "JsonFormatter", "configure_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

FIELD_CHARS = 200
MESSAGE_CHARS = 1_000
TRACEBACK_CHARS = 10_000


def _cut(text: str, limit: int = FIELD_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters cut]"


def _bounded(value: Any) -> Any:
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
