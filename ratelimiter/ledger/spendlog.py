"""One ledger entry as a row of LiteLLM's ``LiteLLM_SpendLogs``: the shape ``/spend/logs``
answers with and the PostgreSQL sink stores (``sink.py``), kept in one place."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..pricing import dollars
from .entries import Entry

__all__ = ["STATUS", "iso", "log_request_id", "spend_log"]

# The ledger's statuses as LiteLLM's SpendLogs.status says them.
STATUS = {"settled": "success", "released": "failure"}


def iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def log_request_id(entry: Entry) -> str:
    """LiteLLM's ``request_id``: the upstream's id of its answer (``chatcmpl-…``) when it gave
    one, else the sidecar's own id."""
    response = entry.info.get("response_id")
    return response if isinstance(response, str) and response else entry.request_id


def spend_log(entry: Entry) -> dict[str, Any]:
    """One entry as a row of LiteLLM's SpendLogs: ``request_id`` is the upstream's id of its
    answer (``chatcmpl-…``) when it gave one, else the sidecar's; the sidecar's own id is
    ``sidecar_request_id`` (the ``x-request-id`` it answered with)."""
    meta, info = entry.meta, entry.info
    spend = dollars(entry.charged.get("spend", 0))
    estimated = dollars(entry.reserved.get("spend", 0))
    return {
        "request_id": log_request_id(entry),
        "sidecar_request_id": entry.request_id,
        "call_type": meta.get("route"),
        "api_key": meta.get("key_hash"),
        "spend": spend,
        "total_tokens": entry.charged.get("tokens", 0),
        "prompt_tokens": info.get("prompt_tokens", 0),
        "completion_tokens": info.get("completion_tokens", 0),
        "startTime": iso(entry.started_ms),
        "endTime": iso(entry.finished_ms),
        "model": meta.get("model"),
        "model_group": meta.get("model"),
        "model_id": meta.get("deployment"),
        "user": meta.get("user_id"),
        "team_id": meta.get("team_id"),
        "organization_id": meta.get("organization_id"),
        "end_user": meta.get("end_user"),
        "request_tags": list(meta.get("tags") or []),
        "metadata": {
            "user_api_key": meta.get("key_hash"),
            "user_api_key_alias": meta.get("key_alias"),
            "user_api_key_user_id": meta.get("user_id"),
            "user_api_key_team_id": meta.get("team_id"),
            "user_api_key_org_id": meta.get("organization_id"),
            "client_request_id": meta.get("client_request_id"),
            "usage_reported": info.get("usage_reported"),
        },
        "status": STATUS.get(entry.status, entry.status),
        # ours, kept beside LiteLLM's fields
        "key_alias": meta.get("key_alias"),
        "deployment": meta.get("deployment"),
        "client_request_id": meta.get("client_request_id"),
        "duration_ms": entry.finished_ms - entry.started_ms,
        "estimated_spend": estimated,
        "ledger_status": entry.status,
        # the shadow limit that would have refused this (served) request, and why
        "shadow_refused": info.get("shadow_refused"),
        "shadow_reason": info.get("shadow_reason"),
    }
