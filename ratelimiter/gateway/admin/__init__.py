"""Admin routes with LiteLLM's paths and field names; all need the master key. Reads wait for
the settlements this sidecar has started (http.settled_first)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..http import Handler, settled_first
from ..openapi import add_docs_routes
from . import entities, keys, organizations, spend, tags

__all__ = ["add_admin_routes"]


def add_admin_routes(app: web.Application) -> None:
    r = app.router

    def read(add: Callable[..., Any], path: str, handler: Handler) -> None:
        add(path, settled_first(handler))

    r.add_post("/key/generate", keys.key_generate)
    r.add_post("/key/update", keys.key_update)
    r.add_post("/key/regenerate", keys.key_regenerate)
    r.add_post("/key/{key_id}/regenerate", keys.key_regenerate)
    read(r.add_get, "/key/info", keys.key_info)
    r.add_post("/key/delete", keys.key_delete)
    r.add_post("/key/block", keys.set_blocked("key", True))
    r.add_post("/key/unblock", keys.set_blocked("key", False))
    read(r.add_get, "/key/list", keys.key_list)
    r.add_post("/user/new", entities.user_new)
    read(r.add_get, "/user/info", entities.info_route("user", "user_id"))
    r.add_post("/user/update", entities.update_route("user", "user_id"))
    r.add_post("/user/delete", entities.delete_route("user", "user_ids"))
    r.add_post("/team/new", entities.create("team", "team_id"))
    read(r.add_get, "/team/info", entities.info_route("team", "team_id"))
    r.add_post("/team/update", entities.update_route("team", "team_id"))
    r.add_post("/team/delete", entities.delete_route("team", "team_ids"))
    r.add_post("/team/member_add", entities.team_member_add)
    r.add_post("/team/member_update", entities.team_member_update)
    r.add_post("/team/member_delete", entities.team_member_delete)
    for base in ("/customer", "/end_user"):
        r.add_post(f"{base}/new", entities.create("customer", "user_id"))
        read(r.add_get, f"{base}/info", entities.info_route("customer", "end_user_id", "user_id"))
        r.add_post(f"{base}/update", entities.update_route("customer", "user_id"))
        r.add_post(f"{base}/delete", entities.delete_route("customer", "user_ids"))
        r.add_post(f"{base}/block", keys.set_blocked("customer", True))
        r.add_post(f"{base}/unblock", keys.set_blocked("customer", False))
    r.add_post("/budget/new", entities.create("budget", "budget_id"))
    read(r.add_post, "/budget/info", entities.budget_info)
    read(r.add_get, "/budget/info", entities.budget_info)
    r.add_post("/budget/update", entities.update_route("budget", "budget_id"))
    r.add_post("/budget/delete", entities.delete_route("budget", "id"))
    read(r.add_get, "/budget/list", entities.budget_list)
    orgs = organizations
    r.add_post("/organization/new", orgs.organization_new)
    read(r.add_get, "/organization/info", orgs.organization_info)
    read(r.add_post, "/organization/info", orgs.organization_info)
    read(r.add_get, "/organization/list", orgs.organization_list)
    # LiteLLM's methods, and POST as every other admin write here
    for method in ("PATCH", "POST"):
        r.add_route(method, "/organization/update", orgs.organization_update)
    for method in ("DELETE", "POST"):
        r.add_route(method, "/organization/delete", orgs.organization_delete)
        r.add_route(method, "/organization/member_delete", orgs.organization_member_delete)
    r.add_post("/organization/member_add", orgs.organization_member_add)
    read(r.add_get, "/spend/logs", spend.spend_logs)
    read(r.add_get, "/global/spend", spend.global_spend)
    read(r.add_get, "/global/spend/report", spend.global_spend_report)
    read(r.add_get, "/global/spend/keys", spend.global_spend_keys)
    read(r.add_get, "/global/spend/teams", spend.global_spend_teams)
    read(r.add_get, "/global/spend/models", spend.global_spend_models)
    read(r.add_post, "/global/spend/end_users", spend.global_spend_end_users)
    r.add_post("/tag/new", tags.tag_new)
    r.add_post("/tag/update", tags.tag_update)
    r.add_post("/tag/delete", tags.tag_delete)
    read(r.add_post, "/tag/info", tags.tag_info)
    read(r.add_get, "/tag/list", tags.tag_list)
    read(r.add_get, "/spend/tags", tags.spend_tags)
    add_docs_routes(app)  # the document describes the routes above
