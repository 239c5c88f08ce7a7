"""Per-user budgets for Python code that calls LLMs itself: LiteLLM's ``BudgetManager``, with
the same methods and record shape, without its lost updates and its 28-day month.

Three places to keep the budgets (``client_type``):

- ``"local"``: a JSON file (``user_cost.json`` in the working directory, as LiteLLM). Every
  change is read-modify-written under an exclusive file lock and replaced atomically, so
  threads and processes sharing the file lose no update.
- ``"redis"``: counters in Redis (``redis_url``, or ``REDIS_URL``). Costs are added with
  ``HINCRBY`` in nano-dollars, so processes on any number of machines lose no update.
- ``"hosted"``: LiteLLM's ``/get_budget`` and ``/set_budget`` protocol (the sidecar serves
  it). The protocol sends the whole dictionary, so the last writer wins: for concurrent
  writers use ``"redis"``.

Durations follow the calendar in ``timezone`` (default UTC): ``daily`` resets at midnight,
``weekly`` on Monday, ``monthly`` on the 1st and ``yearly`` on 1 January. A user's cost is
the cost of the current period: it is zero from the first instant of the next one, whether or
not ``reset_on_duration`` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import redis

from ..engine.durations import parse_duration, period_bounds, time_zone
from ..engine.scripts import lua_source
from ..errors import RateLimiterError, UnknownModel
from ..pricing import NANO, model_price, response_cost, text_cost, text_tokens
from .sdk import BudgetExceededError, ModelResponse, acompletion, completion, projected_call_cost

__all__ = ["BudgetManager", "UnknownUser"]

DURATIONS = ("daily", "weekly", "monthly", "yearly")
# LiteLLM's files store a duration as days; read them as the calendar period they meant.
_LEGACY_DAYS = {1: "daily", 7: "weekly", 28: "monthly", 30: "monthly", 31: "monthly", 365: "yearly"}
DEFAULT_FILE = "user_cost.json"
DEFAULT_HOSTED = "http://127.0.0.1:4000"

DurationName = Literal["daily", "weekly", "monthly", "yearly"]
HOLD_S = 600.0  # a call's hold stops counting after this, if its process never finished it


@dataclass(frozen=True, slots=True)
class Hold:
    """What a call in flight holds of a user's budget, in dollars, until ``expires``."""

    id: str
    amount: float
    now: float
    expires: float


class UnknownUser(RateLimiterError, KeyError):
    """No budget was created for this user."""

    def __init__(self, user: str) -> None:
        super().__init__(
            f"no budget for user {user!r}: call create_budget(total_budget=..., user={user!r}) "
            "first, or check is_valid_user(user)"
        )

    __str__ = RateLimiterError.__str__


def _duration_name(duration: Any) -> str | None:
    if duration is None:
        return None
    if isinstance(duration, int | float) and int(duration) in _LEGACY_DAYS:
        return _LEGACY_DAYS[int(duration)]
    if duration in DURATIONS:
        return str(duration)
    raise ValueError(f"duration must be one of {', '.join(DURATIONS)} or None, got {duration!r}")


class BudgetManager:
    """LiteLLM's ``BudgetManager``: a budget per user, with cost per model.

    ``user_dict`` holds what LiteLLM's does (``total_budget``, ``duration``, ``created_at``,
    ``last_updated_at``, ``current_cost``, ``model_cost``) as of the last call; each method
    reads the store first, so it sees what other threads and processes did.
    """

    def __init__(
        self,
        project_name: str,
        client_type: Literal["local", "hosted", "redis"] = "local",
        api_base: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        redis_url: str | None = None,
        timezone: str = "UTC",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(project_name, str) or not project_name:
            raise ValueError("project_name must be a non-empty string")
        self.project_name, self.client_type = project_name, client_type
        self.clock, self.tz = clock, time_zone(timezone)
        self.store: _Store
        if client_type == "local":
            self.store = _FileStore(Path(path or DEFAULT_FILE))
        elif client_type == "hosted":
            self.store = _HostedStore(project_name, api_base, headers)
        elif client_type == "redis":
            self.store = _RedisStore(project_name, redis_url, self._period)
        else:
            raise ValueError(
                f"client_type must be 'local', 'hosted' or 'redis', got {client_type!r}"
            )
        self.user_dict: dict[str, dict[str, Any]] = {}
        self.load_data()

    # -- LiteLLM's methods ------------------------------------------------------------

    def load_data(self) -> None:
        self.user_dict = self.current(self.store.read())

    def create_budget(
        self,
        total_budget: float,
        user: str,
        duration: DurationName | None = None,
        created_at: float | None = None,
    ) -> dict[str, Any]:
        if isinstance(total_budget, bool) or not isinstance(total_budget, int | float):
            raise ValueError(f"total_budget must be a number of dollars, got {total_budget!r}")
        if total_budget < 0:
            raise ValueError(f"total_budget must be 0 or more, got {total_budget!r}")
        name = _duration_name(duration)
        at = self.clock() if created_at is None else float(created_at)
        record: dict[str, Any] = {"total_budget": float(total_budget)}
        if name is not None:
            record |= {"duration": name, "created_at": at, "last_updated_at": at}
        return self._change(user, lambda _: record, create=True)

    def projected_cost(self, model: str, messages: list[dict[str, Any]], user: str) -> float:
        """The user's cost so far plus the prompt's (text parts of multimodal content count)."""
        price = model_price(model)
        if price is None:
            raise UnknownModel(model)
        tokens = sum(text_tokens(m.get("content")) for m in messages if isinstance(m, dict))
        return self.get_current_cost(user) + tokens * price[0]

    def get_total_budget(self, user: str) -> float:
        return float(self._user(user)["total_budget"])

    def update_cost(
        self,
        user: str,
        completion_obj: Any = None,
        model: str | None = None,
        input_text: str | None = None,
        output_text: str | None = None,
    ) -> dict[str, Any]:
        if model and input_text is not None and output_text is not None:
            cost = text_cost(model, input_text, output_text)
        elif completion_obj is not None:
            model, cost = response_cost(completion_obj)
        else:
            raise ValueError(
                "update_cost needs a completion object (completion_obj=response) or "
                "model=, input_text= and output_text="
            )
        self._user(user)
        return {"user": self.store.add_cost(user, model, cost, self)}

    def get_current_cost(self, user: str) -> float:
        return float(self._user(user).get("current_cost", 0.0))

    def get_model_cost(self, user: str) -> dict[str, float]:
        return dict(self._user(user).get("model_cost") or {})

    def is_valid_user(self, user: str) -> bool:
        return self.store.read_one(user) is not None

    def get_users(self) -> list[str]:
        self.load_data()
        return list(self.user_dict)

    def reset_cost(self, user: str) -> dict[str, Any]:
        return {"user": self._change(user, _zeroed)}

    def reset_on_duration(self, user: str) -> None:
        """Start the user's new period if the current one is over. Costs read as zero from
        the boundary on anyway; this also records when the period started."""
        now = self.clock()

        def roll(record: dict[str, Any]) -> dict[str, Any]:
            # Costs of a past period were already read as zero; what is left to do is to
            # note when the new period was entered.
            if "duration" not in record:
                return record
            start_ms, _ = self._period(record["duration"], now) or (0, 0)
            if float(record.get("last_updated_at", 0.0)) * 1000 < start_ms:
                return record | {"last_updated_at": now}
            return record

        self._change(user, roll)

    def update_budget_all_users(self) -> None:
        for user in self.get_users():
            self.reset_on_duration(user)

    def completion(
        self, user: str, model: str, messages: list[dict[str, Any]], **kwargs: Any
    ) -> ModelResponse:
        """Check and call in one step, where LiteLLM's examples check, then call, then update:
        the call's projected cost (prompt + ``max_tokens``) is held against the user's budget
        first, so concurrent calls cannot pass it together; ``BudgetExceededError`` if it
        does not fit, before anything is sent. The real cost replaces the hold afterwards."""
        hold = self._hold(user, model, messages, kwargs.get("max_tokens"))
        try:
            response = completion(model, messages, **kwargs)
        except BaseException:
            self.store.add_cost(user, None, 0.0, self, hold.id)
            raise
        self._finish(user, hold, response)
        return response

    async def acompletion(
        self, user: str, model: str, messages: list[dict[str, Any]], **kwargs: Any
    ) -> ModelResponse:
        """``completion`` for asyncio (the store is called in a worker thread)."""
        hold = await asyncio.to_thread(self._hold, user, model, messages, kwargs.get("max_tokens"))
        try:
            response = await acompletion(model, messages, **kwargs)
        except BaseException:
            await asyncio.to_thread(self.store.add_cost, user, None, 0.0, self, hold.id)
            raise
        await asyncio.to_thread(self._finish, user, hold, response)
        return response

    def save_data(self) -> dict[str, str]:
        """Every change is already stored when its method returns; kept for LiteLLM's API."""
        return {"status": "success"}

    # -- internals ------------------------------------------------------------------

    def _hold(self, user: str, model: str, messages: list[dict[str, Any]], max_tokens: Any) -> Hold:
        now = self.clock()
        hold = Hold(
            f"hold-{uuid.uuid4().hex}",
            projected_call_cost(model, messages, max_tokens),
            now,
            now + HOLD_S,
        )
        fits, spent, held = self.store.hold(user, hold, self)
        if not fits:
            record = self._user(user)
            per = f" {record['duration']}" if "duration" in record else ""
            hint = (
                f"User {user!r} has {record['total_budget']:g} dollars{per}; raise it with "
                "create_budget, or wait for the next period."
            )
            raise BudgetExceededError(spent + held, record["total_budget"], hold.amount, hint)
        return hold

    def _finish(self, user: str, hold: Hold, response: Any) -> None:
        model, cost = response_cost(response)
        self.user_dict[user] = self.store.add_cost(user, model, cost, self, hold.id)

    def _user(self, user: str) -> dict[str, Any]:
        record = self.store.read_one(user)
        if record is None:
            self.user_dict.pop(user, None)
            raise UnknownUser(user)
        self.user_dict[user] = self.current({user: record})[user]
        return self.user_dict[user]

    def _change(
        self,
        user: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        create: bool = False,
    ) -> dict[str, Any]:
        def apply(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            if user not in records and not create:
                raise UnknownUser(user)
            records = self.current(records)
            records[user] = change(dict(records.get(user) or {}))
            return records

        self.user_dict = self.current(self.store.update(apply))
        return self.user_dict[user]

    def _period(self, duration: str | None, at_s: float | None = None) -> tuple[int, int] | None:
        if duration is None:
            return None
        at = self.clock() if at_s is None else at_s
        return period_bounds(parse_duration(duration), int(at * 1000), self.tz)

    def period_of(self, record: Mapping[str, Any]) -> int:
        """Start (ms) of the period a cost added now belongs to; 0 for a budget with none."""
        bounds = self._period(record.get("duration"))
        return 0 if bounds is None else bounds[0]

    def current(self, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Records with the costs of past periods read as zero."""
        out = {}
        for user, record in records.items():
            record = dict(record)
            if "duration" in record:
                record["duration"] = _duration_name(record["duration"])
                stored = record.get("period")
                if stored is None:  # a LiteLLM file: its costs are of its last update's period
                    bounds = self._period(record["duration"], record.get("last_updated_at", 0))
                    stored = bounds[0] if bounds else 0
                if int(stored) < self.period_of(record):
                    record = _zeroed(record)
            out[user] = record
        return out


def _zeroed(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "current_cost": 0.0, "model_cost": {}, "period": 0}


# -- stores ---------------------------------------------------------------------------

Records = dict[str, dict[str, Any]]
Update = Callable[[Records], Records]


class _View(Protocol):
    """How the manager reads records at its clock: past periods' costs as zero."""

    def current(self, records: Records) -> Records: ...

    def period_of(self, record: Mapping[str, Any]) -> int: ...


class _Store:
    def read(self) -> Records:
        raise NotImplementedError

    def read_one(self, user: str) -> dict[str, Any] | None:
        """One user's record; stores that can read it alone do so."""
        return self.read().get(user)

    def update(self, apply: Update) -> Records:
        """Apply ``apply`` to the stored records atomically and return the result."""
        raise NotImplementedError

    def add_cost(
        self,
        user: str,
        model: str | None,
        cost: float,
        view: _View,
        hold_id: str | None = None,
    ) -> dict[str, Any]:
        """Add ``cost`` to the user's current period (and to ``model``'s), and drop the hold
        ``hold_id`` that stood for it, in one change."""

        def add(records: Records) -> Records:
            if user not in records:
                raise UnknownUser(user)
            records = view.current(records)
            record = dict(records[user])
            period = view.period_of(record)
            if hold_id is not None:
                record["holds"] = {
                    k: v for k, v in (record.get("holds") or {}).items() if k != hold_id
                }
            if model is not None:
                models = dict(record.get("model_cost") or {})
                models[model] = models.get(model, 0.0) + cost
                record |= {
                    "current_cost": float(record.get("current_cost", 0.0)) + cost,
                    "model_cost": models,
                    "period": period,
                }
            return {**records, user: record}

        return self.update(add)[user]

    def hold(self, user: str, hold: Hold, view: _View) -> tuple[bool, float, float]:
        """Check that the user's cost, what other calls hold and ``hold.amount`` fit the
        budget, and if so add the hold, in one change: (held, cost so far, held by others)."""
        outcome: list[tuple[bool, float, float]] = []

        def check(records: Records) -> Records:
            if user not in records:
                raise UnknownUser(user)
            record = dict(view.current(records)[user])
            holds = {k: v for k, v in (record.get("holds") or {}).items() if v[1] > hold.now}
            spent = float(record.get("current_cost", 0.0))
            held = sum(v[0] for v in holds.values())
            fits = spent + held + hold.amount <= float(record["total_budget"])
            if fits:
                holds[hold.id] = [hold.amount, hold.expires]
            outcome.append((fits, spent, held))
            return {**records, user: record | {"holds": holds}}

        self.update(check)
        return outcome[-1]


class _FileStore(_Store):
    """A JSON file changed under ``flock`` and replaced atomically: readers never see half a
    file, and two writers, in threads or processes, never overwrite each other's change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.thread_lock = threading.Lock()  # flock is per process: threads queue here first

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self.thread_lock:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> Records:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise RateLimiterError(
                f"{self.path} is not valid JSON ({exc}): restore it from a backup or move it "
                "away to start with no budgets"
            ) from None
        if not isinstance(data, dict):
            raise RateLimiterError(f"{self.path} must hold a JSON object of users")
        return data

    def update(self, apply: Update) -> Records:
        with self._locked():
            records = apply(self.read())
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, dir=self.path.parent or ".")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(records, out, indent=4)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return records


class _HostedStore(_Store):
    """LiteLLM's hosted protocol: ``POST /get_budget {project_name}`` answers
    ``{"status": "success", "data": {...}}`` (or ``"error"`` when nothing is stored yet);
    ``POST /set_budget {project_name, user_dict}`` stores the whole dictionary."""

    def __init__(
        self, project_name: str, api_base: str | None, headers: dict[str, str] | None
    ) -> None:
        self.project_name = project_name
        self.api_base = (api_base or os.environ.get("RATELIMITER_URL") or DEFAULT_HOSTED).rstrip(
            "/"
        )
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        master = os.environ.get("RATELIMITER_MASTER_KEY")
        if master and not any(k.lower() == "authorization" for k in self.headers):
            self.headers["Authorization"] = f"Bearer {master}"
        self.lock = threading.Lock()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.api_base}{path}"
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            raise RateLimiterError(f"{url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RateLimiterError(
                f"cannot reach the budget API at {url}: {exc}; set api_base= or RATELIMITER_URL"
            ) from None

    def read(self) -> Records:
        reply = self._post("/get_budget", {"project_name": self.project_name})
        return dict(reply.get("data") or {}) if reply.get("status") != "error" else {}

    def update(self, apply: Update) -> Records:
        with self.lock:
            records = apply(self.read())
            self._post("/set_budget", {"project_name": self.project_name, "user_dict": records})
            return records


class _RedisStore(_Store):
    """Users in one hash; costs in a hash per user and period, added with ``HINCRBY`` in
    nano-dollars, so concurrent writers anywhere lose nothing. A reset starts a new
    generation of the user's cost keys instead of deleting under a concurrent writer.
    All keys of a project share the hash tag ``{bm:<project>}``: one Cluster slot."""

    RETENTION_MS = 2 * 86_400_000  # past periods stay readable for two days

    def __init__(
        self,
        project_name: str,
        redis_url: str | None,
        period: Callable[[str | None], tuple[int, int] | None],
    ) -> None:
        url = redis_url or os.environ.get("REDIS_URL")
        if not url:
            raise ValueError("client_type='redis' needs redis_url= or the REDIS_URL variable")
        self.redis = redis.Redis.from_url(url)
        self.hold_script = self.redis.register_script(lua_source("budget_hold"))
        self.tag = f"bm:{{bm:{project_name}}}"
        self.users_key = f"{self.tag}:users"
        self.period = period

    def _costs_key(self, user: str, record: Mapping[str, Any]) -> tuple[str, int | None]:
        bounds = self.period(record.get("duration"))
        start = 0 if bounds is None else bounds[0]
        key = f"{self.tag}:cost:{user}:{int(record.get('generation', 0))}:{start}"
        return key, None if bounds is None else bounds[1] + self.RETENTION_MS

    def read(self) -> Records:
        users = {u.decode(): json.loads(v) for u, v in self.redis.hgetall(self.users_key).items()}
        keys = {user: self._costs_key(user, record)[0] for user, record in users.items()}
        pipe = self.redis.pipeline(transaction=False)
        for key in keys.values():
            pipe.hgetall(key)
        for (user, record), costs in zip(users.items(), pipe.execute(), strict=True):
            _with_costs(record, keys[user], costs)
        return users

    def read_one(self, user: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.users_key, user)
        if raw is None:
            return None
        record = json.loads(raw)
        key = self._costs_key(user, record)[0]
        return _with_costs(record, key, self.redis.hgetall(key))

    def update(self, apply: Update) -> Records:
        # Budget definitions change rarely and only through create/reset: WATCH the users
        # hash so that two of them at once cannot overwrite each other.
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(self.users_key)
                    before = self.read()
                    after = apply(before)
                    pipe.multi()
                    for user, record in after.items():
                        old = before.get(user)
                        definition = _definition(record)
                        generation = int((old or {}).get("generation", 0))
                        if old and old.get("current_cost") and not record.get("current_cost"):
                            generation += 1  # zeroed: costs go on in fresh keys
                        definition["generation"] = generation
                        if old is None or _definition(old) != definition:
                            pipe.hset(self.users_key, user, json.dumps(definition))
                    pipe.execute()
                    return self.read()
                except redis.WatchError:
                    continue

    def _record(self, user: str) -> dict[str, Any]:
        raw = self.redis.hget(self.users_key, user)
        if raw is None:
            raise UnknownUser(user)
        return json.loads(raw)

    def _hold_keys(self, user: str) -> tuple[str, str]:
        return f"{self.tag}:holds:{user}", f"{self.tag}:held:{user}"

    def add_cost(
        self,
        user: str,
        model: str | None,
        cost: float,
        view: _View,
        hold_id: str | None = None,
    ) -> dict[str, Any]:
        key, expire_at = self._costs_key(user, self._record(user))
        nano = round(cost * NANO)
        pipe = self.redis.pipeline(transaction=True)
        if model is not None:
            pipe.hincrby(key, "_total", nano)
            pipe.hincrby(key, model, nano)
            if expire_at is not None:
                pipe.pexpireat(key, expire_at)
        if hold_id is not None:
            holds, amounts = self._hold_keys(user)
            pipe.zrem(holds, hold_id)
            pipe.hdel(amounts, hold_id)
        pipe.execute()
        return self.read_one(user) or {}

    def hold(self, user: str, hold: Hold, view: _View) -> tuple[bool, float, float]:
        record = self._record(user)
        key, _ = self._costs_key(user, record)
        fits, spent, held = self.hold_script(
            keys=[key, *self._hold_keys(user)],
            args=[
                hold.id,
                round(hold.amount * NANO),
                round(float(record["total_budget"]) * NANO),
                int(hold.now * 1000),
                int(hold.expires * 1000),
            ],
        )
        return bool(fits), spent / NANO, held / NANO


def _with_costs(record: dict[str, Any], key: str, costs: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A user's record with the costs of its current cost hash, in dollars."""
    record |= {
        "current_cost": int(costs.get(b"_total", 0)) / NANO,
        "model_cost": {k.decode(): int(v) / NANO for k, v in costs.items() if k != b"_total"},
        "period": key.rsplit(":", 1)[1],
    }
    return record


def _definition(record: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("total_budget", "duration", "created_at", "last_updated_at", "generation")
    return {k: record[k] for k in keep if k in record}
