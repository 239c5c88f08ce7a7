"""The rollup consumer: daily rollups, lifetime spend and the index of days, derived from the
ledger streams off the settlement's path.

Settlement appends an entry to its slot group's stream for the day and adds the day to the
group's ``rollup-due`` set (``lua/lib.lua``, ``ledger_write``): two commands. ``lua/rollup.lua``
later folds what each due day's stream holds past its checkpoint into the rollups, the lifetime
hash and the index of days, and moves the checkpoint, in one script per slot group: exactly
once, whoever runs it and however often (several sidecars racing is safe).

The lag: every sidecar folds every second (``fold_forever``), so Redis's rollup hashes trail
the streams by about a second. Nobody reading through this package sees it: every reader folds
the groups it reads first (``Rollups.read``), and what must be exact against the stream — a
spend reset, a trim of shipped entries — runs in the same script as a fold to the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from redis.exceptions import NoScriptError

from ..engine import Engine
from ..engine.connections import translate_errors
from ..engine.scripts import Script, lua_source

__all__ = ["DUE", "FOLD_BATCH", "Rollups", "fold_forever"]

log = logging.getLogger("ratelimiter.ledger.rollups")

DUE = "rollup-due"  # per slot group: the days whose streams hold entries not folded yet
CHECKPOINT = "rollup-at"  # per slot group: day -> stream id of the last entry folded
DAYS_INDEX = "ledger-days"  # per slot group: the days that hold a stream
LIFETIME = "lifetime"  # per slot group: dimension -> lifetime spend (nano-dollars)
# Entries per script call, so that folding a backlog never holds Redis for long: measured at
# 15-60 µs an entry with six dimensions (entries sharing their keys - every entry its own), a
# call takes 1.5-6 ms.
FOLD_BATCH = 100
_PAGE = 1000  # slot groups per pipeline
_FOLD_INTERVAL_S = 1.0

Read = Callable[[Any, str], Any]  # queues one read of a slot group (its base) on a pipeline


@cache
def _script() -> Script:
    source = lua_source("rollup").encode()
    return Script("rollup", source, hashlib.sha1(source).hexdigest())


class Rollups:
    """Runs the consumer on the slot groups of one Redis or Cluster."""

    def __init__(self, engine: Engine, batch: int = FOLD_BATCH) -> None:
        self.engine, self.batch = engine, batch

    def bases(self) -> list[str]:
        return [self.engine.ledger_base(anchor) for anchor in self.engine.anchors()]

    async def fold(self, bases: Sequence[str], action: Sequence[Any] = ()) -> dict[str, Any]:
        """Fold every entry of these slot groups, then run ``action`` in each (see
        ``lua/rollup.lua``) atomically with the last fold: base -> the action's answer."""
        done: dict[str, Any] = {}
        pending = list(bases)
        while pending:
            replies = await self._run(pending, action)
            left = []
            for base, (more, _, result) in zip(pending, replies, strict=True):
                if more:
                    left.append(base)
                else:
                    done[base] = result
            pending = left
        return done

    async def read(self, read: Read, action: Sequence[Any]) -> dict[str, Any]:
        """``read`` of every slot group, exact as of now: one pipeline asks each group
        whether it has entries waiting and reads it; those that have are folded and read
        again by ``action``, which must answer what ``read`` does, in the same script.

        The probe costs two small commands per group, where a script costs ~100 times one:
        on a Cluster a read visits all 16,384 groups, of which few have entries waiting."""
        found, due = await self._probe(read)
        found.update(await self.fold(due, action))
        return found

    async def catch_up(self) -> int:
        """Fold every slot group's waiting entries; returns how many groups had some."""
        _, due = await self._probe(None)
        await self.fold(due)
        return len(due)

    async def trim(self, stream: str, minid: str) -> int:
        """Remove a ledger stream's entries below ``minid`` once every entry of its slot
        group is folded, in the same script: nothing is trimmed before it is counted."""
        base, _, day = stream.rpartition("ledger:")
        return int((await self.fold([base], ["trim", day, minid]))[base] or 0)

    async def _probe(self, read: Read | None) -> tuple[dict[str, Any], list[str]]:
        found: dict[str, Any] = {}
        due: list[str] = []
        bases = self.bases()
        step = 2 if read else 1
        for first in range(0, len(bases), _PAGE):
            page = bases[first : first + _PAGE]
            with translate_errors(self.engine.address):
                pipe = self.engine.redis.pipeline(transaction=False)
                for base in page:
                    pipe.exists(base + DUE)
                    if read:
                        read(pipe, base)
                replies = await pipe.execute()
            for n, base in enumerate(page):
                if replies[n * step]:
                    due.append(base)
                elif read:
                    found[base] = replies[n * step + 1]
        return found, due

    async def _run(self, bases: Sequence[str], action: Sequence[Any]) -> list[Any]:
        """One script call per slot group, pipelined. Where the script is missing (a
        restarted or failed-over server) it is loaded and all run again: each is idempotent."""
        try:
            return await self._pipeline(bases, action)
        except NoScriptError:
            with translate_errors(self.engine.address):
                await self.engine.redis.script_load(_script().source)
            return await self._pipeline(bases, action)

    async def _pipeline(self, bases: Sequence[str], action: Sequence[Any]) -> list[Any]:
        sha = _script().sha
        with translate_errors(self.engine.address):
            pipe = self.engine.redis.pipeline(transaction=False)
            for base in bases:
                keys = [base + DUE, base + CHECKPOINT, base + DAYS_INDEX, base + LIFETIME]
                # not pipe.evalsha: redis-py refuses that name in a Cluster pipeline
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, base, self.batch, *action)
            return list(await pipe.execute())


async def fold_forever(engine: Engine, interval_s: float = _FOLD_INTERVAL_S) -> None:
    """Keep the rollups a second behind the ledger streams, until cancelled.

    Every sidecar runs it, unelected: the script is exactly once whoever runs it, a round with
    nothing waiting costs one EXISTS per slot group, and a dead sidecar delays nothing. Readers
    fold before they read, so this only keeps their share of the work small."""
    rollups = Rollups(engine)
    while True:
        try:
            await rollups.catch_up()
        except Exception as exc:
            log.warning("folding the ledger into its rollups failed: %s", exc)
        await asyncio.sleep(interval_s)
