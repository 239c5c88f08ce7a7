"""A request's tags: where they come from, what a tag may look like, and which of them the
caller may use.

Tags come, as in LiteLLM, from the key (its ``tags`` and its ``metadata.tags``: every request
of the key carries them) and from the client: the ``x-litellm-tags`` header (comma-separated),
the body's ``tags`` and its ``metadata.tags``. A tag that exists as an entity (/tag/new) is a
scope with its own budgets and limits (resolver.py); any other tag is a label, recorded in the
ledger only.

Which tags a caller may use (our rule, stricter than LiteLLM's, which lets any client name any
tag): with ``general_settings.reject_clientside_metadata_tags: true`` no client-side tag is
accepted at all (LiteLLM's setting; LiteLLM checks only ``metadata.tags``, here the header and
``tags`` too). Otherwise a key that carries tags may add labels, but not a tag entity it does
not carry: a key handed to one cost centre cannot spend another's tag budget. A key without
tags, and the master key, may name any tag.

A tag keys Redis (``{tag:<name>}``, the scope's hash tag), so it is bounded and checked before
anything is reserved: printable, 1 to 128 characters, none of ``,{}`` (the header's separator
and the hash tag's braces), at most 16 tags a request, at most 8 of them tag entities.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.durations import shown
from ..errors import EntityError

__all__ = [
    "MAX_REQUEST_TAGS",
    "MAX_TAG_CHARS",
    "MAX_TAG_SCOPES",
    "NO_TAGS",
    "TAG_HEADER",
    "ClientTags",
    "check_tag",
    "client_tags",
    "key_tags",
    "request_tags",
    "tag_list",
    "tag_problem",
    "without_tags",
]

TAG_HEADER = "x-litellm-tags"
MAX_TAG_CHARS = 128
MAX_REQUEST_TAGS = 16
MAX_TAG_SCOPES = 8
_FORBIDDEN = frozenset(",{}")


def tag_problem(value: Any) -> str | None:
    """What makes ``value`` unusable as a tag, or None when it is a tag."""
    if not isinstance(value, str):
        return f"a tag is a string, got {shown(value)}"
    if not 0 < len(value) <= MAX_TAG_CHARS:
        return f"a tag has 1 to {MAX_TAG_CHARS} characters, got {len(value)}"
    if not value.isprintable() or _FORBIDDEN & set(value):
        return f"a tag is printable characters without , {{ or }}, got {shown(value)}"
    return None


def check_tag(value: Any, where: str, status: int = 400) -> str:
    problem = tag_problem(value)
    if problem is not None:
        raise EntityError(status, f"{where}: {problem}", where)
    return value


def tag_list(field: str, value: Any) -> list[str]:
    """A list of tags (a key's ``tags``, a store checker): each checked, each once."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise EntityError(400, f"{field}: must be a list of tags, got {shown(value)}", field)
    if len(value) > MAX_REQUEST_TAGS:
        raise EntityError(400, f"{field}: at most {MAX_REQUEST_TAGS} tags, got {len(value)}", field)
    return list(dict.fromkeys(check_tag(tag, f"{field}[{i}]") for i, tag in enumerate(value)))


@dataclass(frozen=True, slots=True)
class ClientTags:
    """The tags a client sent, each with where it came from (the header or the body field)."""

    sources: Mapping[str, str]  # tag -> x-litellm-tags, tags or metadata.tags

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.sources)


NO_TAGS = ClientTags({})


def _listed(value: Any, where: str, indexed: bool = True) -> list[str]:
    """``indexed``: a problem names the entry (``tags[2]``), else the whole (a header)."""
    if not isinstance(value, list):
        raise EntityError(400, f"{where} must be a list of tags, got {shown(value)}", where)
    if len(value) > MAX_REQUEST_TAGS:
        raise EntityError(
            400, f"{where}: at most {MAX_REQUEST_TAGS} tags a request, got {len(value)}", where
        )
    return [check_tag(tag, f"{where}[{i}]" if indexed else where) for i, tag in enumerate(value)]


def _header(value: str) -> list[str]:
    if len(value) > MAX_REQUEST_TAGS * (MAX_TAG_CHARS + 1):
        raise EntityError(
            400,
            f"{TAG_HEADER}: at most {MAX_REQUEST_TAGS} comma-separated tags of at most "
            f"{MAX_TAG_CHARS} characters, got {len(value)} characters",
            TAG_HEADER,
        )
    found = [part.strip() for part in value.split(",") if part.strip()]
    return _listed(found, TAG_HEADER, indexed=False)


def client_tags(
    headers: Mapping[str, str], body: Mapping[str, Any], reject: bool = False
) -> ClientTags:
    """The tags the client sent, checked (a 400 naming the header or field); ``reject``
    (``reject_clientside_metadata_tags``) refuses any, in LiteLLM's words."""
    found: dict[str, str] = {}
    raw = headers.get(TAG_HEADER)
    metadata = body.get("metadata")
    sent = (
        (TAG_HEADER, _header(raw) if raw else []),
        ("tags", [] if body.get("tags") is None else _listed(body["tags"], "tags")),
        (
            "metadata.tags",
            _listed(metadata["tags"], "metadata.tags")
            if isinstance(metadata, dict) and metadata.get("tags") is not None
            else [],
        ),
    )
    for where, tags in sent:
        if tags and reject:
            raise EntityError(
                400,
                f"Client-side '{where}' not allowed in request. "
                "'reject_clientside_metadata_tags'=True. Tags can only be set via API key "
                "metadata.",
                where,
            )
        for tag in tags:
            found.setdefault(tag, where)
    if len(found) > MAX_REQUEST_TAGS:
        raise EntityError(
            400,
            f"at most {MAX_REQUEST_TAGS} tags a request (header and body together), got "
            f"{len(found)}",
            next(iter(found.values())),
        )
    return ClientTags(found)


def key_tags(key: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The tags a key gives every one of its requests: its ``tags`` and ``metadata.tags``.
    ``metadata`` is free-form, so an unusable tag there refuses the key's requests (403)
    rather than being skipped: skipping it would skip its budget."""
    if not key:
        return ()
    metadata = key.get("metadata") or {}
    listed = [*(key.get("tags") or []), *(metadata.get("tags") or [])]
    if len(listed) > 2 * MAX_REQUEST_TAGS or not all(tag_problem(t) is None for t in listed):
        bad = next((t for t in listed if tag_problem(t) is not None), listed[-1])
        raise EntityError(
            403,
            f"this API key's tags cannot be used ({tag_problem(bad) or 'too many'}): an admin "
            "can fix its tags or metadata.tags with /key/update",
            "tags",
        )
    return tuple(dict.fromkeys(listed))


def request_tags(own: Iterable[str], client: ClientTags) -> tuple[str, ...]:
    """The key's tags, then the client's, each once."""
    merged = tuple(dict.fromkeys([*own, *client.names]))
    if len(merged) > 2 * MAX_REQUEST_TAGS:
        raise EntityError(400, f"at most {MAX_REQUEST_TAGS} tags a request", "tags")
    return merged


def without_tags(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body to forward: the tags are the gateway's, and an upstream would refuse them
    (OpenAI's metadata holds strings only, Anthropic's only user_id)."""
    forwarded = dict(body)
    forwarded.pop("tags", None)
    metadata = forwarded.get("metadata")
    if isinstance(metadata, dict) and "tags" in metadata:
        rest = {k: v for k, v in metadata.items() if k != "tags"}
        if rest:
            forwarded["metadata"] = rest
        else:
            del forwarded["metadata"]
    return forwarded
