"""The admin API's OpenAPI 3.1 document at ``/openapi.json``, built from the request models
(models.py), and interactive docs at ``/docs``: Swagger UI from the swagger-ui-bundle-v2
package (Apache-2.0), served by the sidecar itself, so the page works with no internet.

Neither needs the master key, as in LiteLLM: they describe the API's shape, never its data,
and every route they describe still needs the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import swagger_ui_bundle
from aiohttp import web
from pydantic.json_schema import models_json_schema

from ..responses import json_response
from .models import ACCEPTED_ONLY, ACTED_ON, HANDLED, REQUESTS
from .store import SCHEMAS

__all__ = ["QUERIES", "add_docs_routes", "compatibility_table", "document"]

_DOCUMENT = web.AppKey("openapi_document", dict)

_ID = {"type": "string", "minLength": 1, "maxLength": 256}
_FILTER = {"type": "string", "description": "empty: no filter"}
_DATE = {"type": "string", "format": "date", "description": "2026-11-24; 1970-01-01 to 9999-12-30"}
_DATES = {"start_date": _DATE, "end_date": _DATE}
# The query parameters of each GET route (the POST routes' bodies are in REQUESTS).
QUERIES: dict[str, dict[str, dict[str, Any]]] = {
    "/key/info": {"key": _ID},
    "/key/list": {
        "page": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "size": {"type": "integer", "minimum": 1, "maximum": 100},
        **dict.fromkeys(("user_id", "team_id", "key_alias", "key_hash"), _FILTER),
        "return_full_object": {"type": "boolean"},
    },
    "/user/info": {"user_id": _ID},
    "/team/info": {"team_id": _ID},
    "/customer/info": {"end_user_id": _ID},
    "/end_user/info": {"end_user_id": _ID},
    "/budget/info": {"budget_id": _ID},
    "/budget/list": {},
    "/organization/info": {"organization_id": _ID},
    "/organization/list": {
        "org_id": {"type": "string", "maxLength": 256, "description": "this id only"},
        "org_alias": {"type": "string", "maxLength": 256, "description": "part of the alias"},
    },
    "/spend/logs": {
        **_DATES,
        **dict.fromkeys(
            ("api_key", "user_id", "team_id", "organization_id", "end_user", "model"), _FILTER
        ),
        "request_id": {
            "type": "string",
            "description": "the upstream's id of its answer (chatcmpl-…) or the sidecar's",
        },
        "summarize": {
            "type": "boolean",
            "description": "with both dates: spend per day (the default, as LiteLLM); false: rows",
        },
        "page": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "page_size": {"type": "integer", "minimum": 1, "maximum": 1_000},
    },
    "/global/spend": _DATES,
    "/global/spend/report": {
        **_DATES,
        "group_by": {"enum": ["team", "customer", "api_key", "end_user", "key", "tag"]},
        **dict.fromkeys(("api_key", "internal_user_id", "team_id", "customer_id"), _FILTER),
    },
    "/global/spend/keys": {"limit": {"type": "integer", "minimum": 1, "maximum": 1_000_000}},
    "/global/spend/teams": {},
    "/tag/list": _DATES,
    "/spend/tags": _DATES,
    "/global/spend/models": {
        "limit": {"type": "integer", "minimum": 1, "maximum": 1_000_000, "default": 10}
    },
}
# The one query parameter each info route cannot do without (elsewhere the same names filter).
_REQUIRED = {"key", "user_id", "team_id", "end_user_id", "budget_id", "organization_id"}
# The methods whose body is a model of REQUESTS (LiteLLM updates organizations with PATCH and
# deletes them with DELETE; this API also takes POST for both).
_BODY_METHODS = ("POST", "PATCH", "DELETE")

_ENVELOPE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _answers() -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "200": {"description": "done", "content": {"application/json": {"schema": {}}}},
        "4XX": {"description": "refused, in OpenAI's error envelope", **error},
        "503": {"description": "Redis is unreachable", **error},
    }


def _required(path: str, name: str) -> bool:
    return path.endswith("/info") and name in _REQUIRED


def _operation(method: str, path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{method}{path.replace('/', '_')}",
        "tags": [path.strip("/").split("/")[0]],
        "responses": _answers(),
    }
    in_path = [
        {"name": name, "in": "path", "required": True, "schema": _ID}
        for name in re.findall(r"\{(\w+)\}", path)
    ]
    if in_path:
        operation["parameters"] = in_path
    if method != "get":
        model = REQUESTS[path]
        operation["summary"] = (model.__doc__ or path).strip().splitlines()[0]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas[model.__name__]}},
        }
    else:
        operation["parameters"] = in_path + [
            {"name": name, "in": "query", "required": _required(path, name), "schema": schema}
            for name, schema in QUERIES[path].items()
        ]
    return operation


def document(routes: list[tuple[str, str]]) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` ((method, path) pairs, each in REQUESTS or QUERIES)."""
    models = sorted(set(REQUESTS.values()), key=lambda m: m.__name__)
    refs, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    schemas = {m.__name__: refs[(m, "validation")] for m in models}
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(routes):
        paths.setdefault(path, {})[method.lower()] = _operation(method.lower(), path, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ratelimiter admin API",
            "version": "1",
            "description": "LiteLLM's admin routes and fields. Send the master key as a "
            "bearer token, or a virtual key: it may call a route as far as its user's "
            "user_role allows (proxy_admin: everything; proxy_admin_viewer: every read; "
            "internal_user: its own keys, user, teams and spend; internal_user_viewer: read "
            "those), as in LiteLLM. Fields the limiter does not act on are stored and shown.",
        },
        "paths": paths,
        "components": {
            "schemas": {**defs.get("$defs", {}), "Error": _ENVELOPE},
            "securitySchemes": {
                "master_key": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the master key, or a virtual key within its user's role",
                }
            },
        },
        "security": [{"master_key": []}],
    }


def _documented(app: web.Application) -> list[tuple[str, str]]:
    routes = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if (route.method in _BODY_METHODS and path in REQUESTS) or (
            route.method == "GET" and path in QUERIES
        ):
            routes.append((route.method, path))
    return routes


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request.app[_DOCUMENT])


SWAGGER = swagger_ui_bundle.swagger_ui_path
# The only files of the bundle served, with their types.
FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ratelimiter admin API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/start.js"></script>
</body>
</html>
"""
# A file, not an inline script: the page's policy runs scripts from the sidecar only. No
# validator: Swagger UI would send the document to an outside one.
START = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null
  });
};
"""
# Swagger UI draws its icons from data: URLs; nothing is loaded from anywhere else.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=INDEX, content_type="text/html", headers=HEADERS)


async def start_js(request: web.Request) -> web.Response:
    return web.Response(text=START, content_type="text/javascript", headers=HEADERS)


async def docs_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(SWAGGER / name, headers={**HEADERS, "Content-Type": FILES[name]})


def add_docs_routes(app: web.Application) -> None:
    """After the admin routes: the document describes the routes registered so far."""
    app[_DOCUMENT] = document(_documented(app))
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/start.js", start_js)
    app.router.add_get("/docs/{name}", docs_file)


# -- the README's compatibility table, generated so that it cannot drift ----------------

# LiteLLM's admin routes (litellm/proxy/_types.py, LiteLLMRoutes) that the sidecar does not
# serve; every other admin route of LiteLLM's in our domain is in QUERIES or REQUESTS.
NOT_SERVED = (
    "/key/bulk_update",
    "/key/health",
    "/key/aliases",
    "/key/{key_id}/reset_spend",
    "/key/service-account/generate",
    "/user/bulk_update",
    "/user/daily/activity",
    "/v2/team/list",
    "/team/block",
    "/team/unblock",
    "/team/available",
    "/team/permissions_list",
    "/team/permissions_update",
    "/team/daily/activity",
    "/organization/member_update",
    "/organization/daily/activity",
    "/v2/organization/{organization_id}",
    "/budget/settings",
    "/spend/keys",
    "/spend/users",
    "/spend/calculate",
    "/global/spend/logs",
    "/global/spend/tags",
    "/global/spend/provider",
    "/tag/daily/activity",
    "/model/new|update|delete",
)
# The request bodies whose fields the table lists, with LiteLLM's name for each model.
_TABLE = (
    ("/key/generate", "GenerateKeyRequest", "key"),
    ("/key/update", "UpdateKeyRequest", "key"),
    ("/key/regenerate", "RegenerateKeyRequest", "key"),
    ("/user/new", "NewUserRequest", "user"),
    ("/user/update", "UpdateUserRequest", "user"),
    ("/team/new", "NewTeamRequest", "team"),
    ("/team/update", "UpdateTeamRequest", "team"),
    ("/customer/new", "NewCustomerRequest", "customer"),
    ("/customer/update", "UpdateCustomerRequest", "customer"),
    ("/budget/new", "BudgetNewRequest", "budget"),
    ("/budget/update", "BudgetNewRequest", "budget"),
    ("/organization/new", "NewOrganizationRequest", "organization"),
    ("/organization/update", "LiteLLM_OrganizationTableUpdate", "organization"),
    ("/tag/new", "TagNewRequest", "tag"),
    ("/tag/update", "TagUpdateRequest", "tag"),
)


def _codes(names: Iterable[str]) -> str:
    return ", ".join(f"`{n}`" for n in sorted(names)) or "none"


def _acted_on(kind: str) -> set[str]:
    return set(SCHEMAS[kind]) | HANDLED.get(kind, set()) | ACTED_ON[kind]


def compatibility_table() -> str:
    """The README's section between its compatibility markers, from the models."""
    served = sorted(p for p in {*REQUESTS, *QUERIES} if not p.startswith("/end_user/"))
    rows = [
        f"| `{path}` | {litellm} | {_codes(_acted_on(kind) & set(REQUESTS[path].model_fields))}"
        f" | {_codes(set(ACCEPTED_ONLY[kind]) & set(REQUESTS[path].model_fields))} |"
        for path, litellm, kind in _TABLE
    ]
    return "\n".join(
        [
            f"Served ({len(served)} routes, the `/customer/` ones also under `/end_user/`): "
            f"{_codes(served)}.",
            "",
            f"Not served (a 404): {_codes(NOT_SERVED)}.",
            "",
            "| Route | LiteLLM's model | Served: acted on, or ours | "
            "Accepted, stored and shown, not enforced |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            "`/user/list`, `/team/list`, `/customer/list` and `/model/info` are served too "
            "(the admin UI reads them), without a schema in `/openapi.json`. "
            "`password` is accepted and never stored; `key` on `/key/generate` only as null (the "
            "limiter always generates the key), `new_master_key` on `/key/regenerate` only as "
            "null; on info, `spend` (lifetime spend, from the ledger) and `budget_reset_at` show "
            "the limiter's own values. `spend` on create or update sets the lifetime spend to "
            "its value and lowers the spend of every current budget period to it (`0` resets; "
            "requests in flight are counted once, when they settle; the ledger keeps its "
            "entries). `key_aliases` on `/key/delete` is not served. `litellm_budget_table` on "
            "`/organization/update` (LiteLLM's UI nests the limits there) is read as its fields "
            "sent at the top level. Any other field is a 400 naming it.",
        ]
    )
