"""An async client for the sidecar's admin API: keys, users, teams, customers, budgets, spend.

    async with AdminClient("http://127.0.0.1:4000", master_key) as admin:
        key = await admin.generate_key(max_budget=5, rpm_limit=60, budget_duration="monthly")
        info = await admin.key_info(key.key)
        print(info.spend, info.budget_windows)

Entity fields are LiteLLM's names (``max_budget``, ``rpm_limit``, ``team_id``…), passed as
keyword arguments and returned in ``fields``. An error answer raises the ``AdminError`` of
its status, with the API's own message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from ..errors import RateLimiterError

__all__ = [
    "AdminClient",
    "AdminError",
    "AuthenticationError",
    "BadRequest",
    "BudgetWindow",
    "Conflict",
    "EntityInfo",
    "GeneratedKey",
    "NotFound",
    "PermissionDenied",
    "ServiceUnavailable",
]


class AdminError(RateLimiterError):
    """The admin API refused a call; ``status``, ``type``, ``param`` and its message."""

    def __init__(self, status: int, message: str, type: str | None, param: str | None) -> None:
        super().__init__(f"{status} {type or 'error'}: {message}")
        self.status, self.message, self.type, self.param = status, message, type, param


class BadRequest(AdminError):
    """400: a field is missing or malformed; ``param`` names it."""


class AuthenticationError(AdminError):
    """401: no master key, or not the master key."""


class PermissionDenied(AdminError):
    """403."""


class NotFound(AdminError):
    """404: no such key, user, team, customer or budget."""


class Conflict(AdminError):
    """409: the id exists already."""


class ServiceUnavailable(AdminError):
    """503: the sidecar cannot reach Redis."""


_ERRORS: dict[int, type[AdminError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    503: ServiceUnavailable,
}


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    """One budget of an entity, now."""

    budget_duration: str
    max_budget: float
    spend: float
    remaining: float
    budget_reset_at: str | None


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    """A new virtual key: ``key`` is shown this once; ``token`` (its hash) names it after."""

    key: str
    token: str
    expires: str | None
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EntityInfo:
    """A key, user, team or customer with its spend in every budget window."""

    id: str
    fields: dict[str, Any]
    spend: float
    budget_reset_at: str | None
    budget_windows: tuple[BudgetWindow, ...]


@dataclass
class AdminClient:
    """``base_url`` is the sidecar's (``http://host:4000``); ``session`` may be shared."""

    base_url: str
    master_key: str
    session: aiohttp.ClientSession | None = None
    timeout_s: float = 30.0
    _owned: bool = field(default=False, init=False, repr=False)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owned and self.session is not None:
            await self.session.close()
            self.session, self._owned = None, False

    # -- keys ---------------------------------------------------------------------

    async def generate_key(self, **fields: Any) -> GeneratedKey:
        body = await self._post("/key/generate", fields)
        return GeneratedKey(body["key"], body["token"], body.get("expires"), _entity(body))

    async def update_key(self, key: str, **changes: Any) -> dict[str, Any]:
        return await self._post("/key/update", {"key": key, **changes})

    async def key_info(self, key: str) -> EntityInfo:
        body = await self._get("/key/info", key=key)
        return _info(body["key"], body["info"])

    async def list_keys(self) -> list[str]:
        """Every key's hash, read page by page."""
        keys: list[str] = []
        page = 1
        while True:
            body = await self._get("/key/list", page=str(page), size="100")
            keys += body["keys"]
            if page >= body["total_pages"]:
                return keys
            page += 1

    async def delete_keys(self, *keys: str) -> list[str]:
        return (await self._post("/key/delete", {"keys": list(keys)}))["deleted_keys"]

    async def block_key(self, key: str) -> dict[str, Any]:
        return await self._post("/key/block", {"key": key})

    async def unblock_key(self, key: str) -> dict[str, Any]:
        return await self._post("/key/unblock", {"key": key})

    # -- users, teams, customers ----------------------------------------------------------

    async def new_user(self, user_id: str | None = None, **fields: Any) -> GeneratedKey:
        """The user, and the key LiteLLM's /user/new hands out with it."""
        body = await self._post("/user/new", _with_id("user_id", user_id, fields))
        return GeneratedKey(body["key"], "", body.get("expires"), _entity(body))

    async def user_info(self, user_id: str) -> EntityInfo:
        return _info(user_id, (await self._get("/user/info", user_id=user_id))["user_info"])

    async def update_user(self, user_id: str, **changes: Any) -> dict[str, Any]:
        return await self._post("/user/update", {"user_id": user_id, **changes})

    async def delete_users(self, *user_ids: str) -> list[str]:
        return (await self._post("/user/delete", {"user_ids": list(user_ids)}))["deleted"]

    async def new_team(self, team_id: str | None = None, **fields: Any) -> dict[str, Any]:
        return await self._post("/team/new", _with_id("team_id", team_id, fields))

    async def team_info(self, team_id: str) -> EntityInfo:
        return _info(team_id, (await self._get("/team/info", team_id=team_id))["team_info"])

    async def update_team(self, team_id: str, **changes: Any) -> dict[str, Any]:
        return await self._post("/team/update", {"team_id": team_id, **changes})

    async def delete_teams(self, *team_ids: str) -> list[str]:
        return (await self._post("/team/delete", {"team_ids": list(team_ids)}))["deleted"]

    async def add_team_member(
        self,
        team_id: str,
        user_id: str,
        role: str = "user",
        max_budget_in_team: float | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"team_id": team_id, "member": {"user_id": user_id, "role": role}}
        if max_budget_in_team is not None:
            body["max_budget_in_team"] = max_budget_in_team
        return await self._post("/team/member_add", body)

    async def remove_team_member(self, team_id: str, user_id: str) -> dict[str, Any]:
        return await self._post("/team/member_delete", {"team_id": team_id, "user_id": user_id})

    async def new_customer(self, user_id: str, **fields: Any) -> dict[str, Any]:
        return await self._post("/customer/new", {"user_id": user_id, **fields})

    async def customer_info(self, user_id: str) -> EntityInfo:
        return _info(user_id, await self._get("/customer/info", end_user_id=user_id))

    async def update_customer(self, user_id: str, **changes: Any) -> dict[str, Any]:
        return await self._post("/customer/update", {"user_id": user_id, **changes})

    async def delete_customers(self, *user_ids: str) -> list[str]:
        return (await self._post("/customer/delete", {"user_ids": list(user_ids)}))["deleted"]

    async def block_customers(self, *user_ids: str) -> list[str]:
        body = await self._post("/customer/block", {"user_ids": list(user_ids)})
        return body["blocked_users"]

    async def unblock_customers(self, *user_ids: str) -> list[str]:
        body = await self._post("/customer/unblock", {"user_ids": list(user_ids)})
        return body["unblocked_users"]

    # -- budgets ------------------------------------------------------------------------

    async def new_budget(self, budget_id: str, **fields: Any) -> dict[str, Any]:
        return await self._post("/budget/new", {"budget_id": budget_id, **fields})

    async def budget_info(self, *budget_ids: str) -> list[dict[str, Any]]:
        return await self._post("/budget/info", {"budgets": list(budget_ids)})

    async def update_budget(self, budget_id: str, **changes: Any) -> dict[str, Any]:
        return await self._post("/budget/update", {"budget_id": budget_id, **changes})

    async def delete_budget(self, budget_id: str) -> list[str]:
        return (await self._post("/budget/delete", {"id": budget_id}))["deleted"]

    async def list_budgets(self) -> list[dict[str, Any]]:
        return await self._get("/budget/list")

    # -- spend --------------------------------------------------------------------------

    async def spend_logs(self, **filters: Any) -> list[dict[str, Any]]:
        """Ledger entries in LiteLLM's SpendLogs shape, newest first. Filters: ``api_key``,
        ``user_id``, ``team_id``, ``end_user``, ``model``, ``request_id`` (the upstream's
        ``chatcmpl-…`` id or the sidecar's), ``start_date``, ``end_date`` (YYYY-MM-DD),
        ``page``, ``page_size``; with both dates LiteLLM answers spend per day unless
        ``summarize=False`` (the client sends it as false)."""
        if isinstance(filters.get("summarize"), bool):
            filters["summarize"] = str(filters["summarize"]).lower()
        return await self._get("/spend/logs", **filters)

    async def global_spend(self) -> dict[str, Any]:
        return await self._get("/global/spend")

    async def global_spend_report(self, group_by: str = "team", **filters: Any) -> Any:
        """Per day and team (``team``) or customer (``customer``), or per key
        (``api_key``), with the spend per model, as LiteLLM's report."""
        return await self._get("/global/spend/report", group_by=group_by, **filters)

    async def global_spend_keys(self, limit: int | None = None) -> list[dict[str, Any]]:
        return await self._get("/global/spend/keys", limit=limit)

    async def global_spend_teams(self) -> dict[str, Any]:
        return await self._get("/global/spend/teams")

    async def global_spend_models(self, limit: int = 10) -> list[dict[str, Any]]:
        return await self._get("/global/spend/models", limit=limit)

    async def global_spend_end_users(self, **body: Any) -> list[dict[str, Any]]:
        """``api_key``, ``startTime``, ``endTime`` (ISO 8601), all optional."""
        return await self._post("/global/spend/end_users", body)

    # -- transport ------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self.session, self._owned = aiohttp.ClientSession(timeout=timeout), True
        return self.session

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", path, json=body)

    async def _get(self, path: str, **params: Any) -> Any:
        query = {k: str(v) for k, v in params.items() if v is not None}
        return await self._call("GET", path, params=query)

    async def _call(self, method: str, path: str, **options: Any) -> Any:
        url = self.base_url.rstrip("/") + path
        headers = {"Authorization": f"Bearer {self.master_key}"}
        try:
            async with self._session().request(method, url, headers=headers, **options) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceUnavailable(0, f"cannot reach {url}: {exc}", None, None) from None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if status >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            error = error if isinstance(error, dict) else {}
            message = error.get("message") or raw.decode(errors="replace")[:300]
            kind = _ERRORS.get(status, AdminError)
            raise kind(status, message, error.get("type"), error.get("param"))
        return body


def _with_id(name: str, value: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    return fields if value is None else {name: value, **fields}


def _entity(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("key", "expires")}


def _info(entity_id: str, info: dict[str, Any]) -> EntityInfo:
    # Fields a newer sidecar adds to a window are ignored, not a TypeError.
    known = [f.name for f in dataclasses.fields(BudgetWindow)]
    windows = tuple(
        BudgetWindow(**{name: w.get(name) for name in known})
        for w in info.get("budget_windows") or ()
    )
    fields = {
        k: v for k, v in info.items() if k not in ("spend", "budget_reset_at", "budget_windows")
    }
    return EntityInfo(
        entity_id, fields, info.get("spend", 0.0), info.get("budget_reset_at"), windows
    )
