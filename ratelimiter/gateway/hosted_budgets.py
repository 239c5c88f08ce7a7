"""LiteLLM's hosted BudgetManager protocol, so that ``BudgetManager(client_type="hosted",
api_base=<the sidecar>)`` keeps its budgets in the sidecar's Redis: ``POST /get_budget``
and ``POST /set_budget``, master key required. The protocol stores each project's whole
user dictionary; the last writer wins, as in LiteLLM."""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from ..engine.connections import translate_errors
from ..errors import EntityError
from ..responses import json_response
from .admin import access
from .http import ENGINE, SETTINGS, read_json

__all__ = ["add_hosted_budget_routes"]

MAX_PROJECT_NAME = 200


def _project(body: Any) -> str:
    if not isinstance(body, dict):
        raise EntityError(400, 'send a JSON object: {"project_name": ...}')
    name = body.get("project_name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_PROJECT_NAME:
        raise EntityError(
            400,
            f"project_name must be a non-empty string of at most {MAX_PROJECT_NAME} characters",
            "project_name",
        )
    return name


def _validate_users(users: Any) -> dict[str, Any]:
    if not isinstance(users, dict):
        raise EntityError(400, "user_dict must be an object: user id -> budget", "user_dict")
    for user, record in users.items():
        if not isinstance(record, dict):
            raise EntityError(400, f"user_dict[{user!r}] must be an object", "user_dict")
        total = record.get("total_budget")
        if (
            isinstance(total, bool)
            or not isinstance(total, int | float)
            or not math.isfinite(total)
        ):
            raise EntityError(
                400, f"user_dict[{user!r}].total_budget must be a number of dollars", "user_dict"
            )
    return users


def _key(request: web.Request, project: str) -> str:
    return f"{request.app[SETTINGS].key_prefix}bm:{{{project}}}:hosted"


async def get_budget(request: web.Request) -> web.Response:
    await access.view(request)
    project = _project(await read_json(request))
    engine = request.app[ENGINE]
    with translate_errors(engine.address):
        raw = await engine.redis.get(_key(request, project))
    if raw is None:
        return json_response(
            {"status": "error", "message": f"no budgets stored for project {project!r} yet"}
        )
    return json_response({"status": "success", "data": orjson.loads(raw)})


async def set_budget(request: web.Request) -> web.Response:
    await access.admin(request)
    body = await read_json(request)
    project = _project(body)
    users = _validate_users(body.get("user_dict"))
    engine = request.app[ENGINE]
    with translate_errors(engine.address):
        await engine.redis.set(_key(request, project), orjson.dumps(users))
    return json_response({"status": "success"})


def add_hosted_budget_routes(app: web.Application) -> None:
    app.router.add_post("/get_budget", get_budget)
    app.router.add_post("/set_budget", set_budget)
