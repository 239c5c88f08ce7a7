"""Which deployments serve a requested model name: aliases first, then ``model_list``.

Aliases. A key's ``aliases``, its user's ``aliases`` and its team's ``model_aliases`` map a
name a client asks for to a name served here. They are merged as ``{user, key, team}``, later
ones winning: the team's map wins over the key's, as LiteLLM merges them (``{**key.aliases,
**team.model_aliases}``), and a user's map is the default its keys override. An alias applies
once: its target is looked up in ``model_list`` and never again among the aliases, so an alias
to an alias, or a cycle ``{a: b, b: a}``, is deterministic (``a`` is served by ``b``'s
deployments and ``b`` by ``a``'s) and cannot loop. Targets are checked when an alias is saved:
each must be served here.

Routing, as LiteLLM's router does it: a name equal to a ``model_name`` is served by those
deployments; otherwise by the deployments of the most specific wildcard ``model_name`` that
matches it (``openai/*``, ``*``). Specificity is LiteLLM's: the longer pattern first, then the
one with more wildcards, then the one first in the config. Each ``*`` matches any characters
(including none and ``/``) and fills the next ``*`` of ``litellm_params.model``: a request for
``openai/gpt-4o`` reaches ``model_name: openai/*`` with ``model: openai/*`` as ``openai/gpt-4o``.
Unlike LiteLLM, a pattern must match the whole name, not just its start.

A deployment matched by a pattern is served as a deployment of its own: its ``model_name`` is
the name requested, its ``model`` the filled one, so its price is the filled model's (unless
the entry sets one), its ``rpm``/``tpm`` count per filled model (LiteLLM counts a deployment's
usage by its id and its model), and key x model limits and the ledger see the name requested.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..pricing import provider_models
from .config import Deployment, Settings

__all__ = [
    "Route",
    "aliases_of",
    "listed_names",
    "pattern_regex",
    "route",
    "serves",
]


def pattern_regex(pattern: str) -> str:
    """A ``model_name`` with ``*`` wildcards as a regex, each ``*`` a group (LiteLLM's form)."""
    return re.escape(pattern).replace(r"\*", "(.*)")


def _specificity(pattern: str) -> tuple[int, int]:
    """LiteLLM's order of patterns: the longer regex first, then the more wildcards."""
    regex = pattern_regex(pattern)
    return len(regex), sum(regex.count(c) for c in "*+?\\^$|()")


@dataclass(frozen=True, slots=True)
class Pattern:
    """A wildcard model_name as its literal pieces: ``a*b*c`` is ("a", "b", "c")."""

    pieces: tuple[str, ...]

    def match(self, name: str) -> tuple[str, ...] | None:
        """What each ``*`` matched, as the regex ``a(.*)b(.*)c`` fully matching ``name``
        would give (each group as long as it can be, leftmost first), or None. Found by
        placing the middle pieces from the right, in time linear in the name for each piece:
        a backtracking regex takes time to the power of the wildcards on a hostile name."""
        first, *middle, last = self.pieces
        if len(name) < len(first) + len(last) or not (
            name.startswith(first) and name.endswith(last)
        ):
            return None
        start, end = len(first), len(name) - len(last)
        cuts = []
        for piece in reversed(middle):
            at = name.rfind(piece, start, end)
            if at < 0:
                return None
            cuts.append((at, at + len(piece)))
            end = at
        groups, left = [], start
        for at, after in reversed(cuts):
            groups.append(name[left:at])
            left = after
        groups.append(name[left : len(name) - len(last)])
        return tuple(groups)


@dataclass(frozen=True, slots=True)
class Route:
    """model_list, indexed: deployments by exact name, and the patterns most specific first."""

    exact: Mapping[str, tuple[Deployment, ...]]
    patterns: tuple[tuple[Pattern, tuple[Deployment, ...]], ...]


_routes: dict[int, tuple[tuple[Deployment, ...], Route]] = {}


def _index(models: tuple[Deployment, ...]) -> Route:
    cached = _routes.get(id(models))
    if cached is not None and cached[0] is models:
        return cached[1]
    exact: dict[str, list[Deployment]] = {}
    patterns: dict[str, list[Deployment]] = {}
    for deployment in models:
        table = patterns if "*" in deployment.model_name else exact
        table.setdefault(deployment.model_name, []).append(deployment)
    # sorted() is stable: patterns as specific as each other keep their config order
    ordered = sorted(patterns.items(), key=lambda item: _specificity(item[0]), reverse=True)
    index = Route(
        {name: tuple(found) for name, found in exact.items()},
        tuple((Pattern(tuple(p.split("*"))), tuple(found)) for p, found in ordered),
    )
    if len(_routes) > 64:  # settings are few (one per app, a few in tests)
        _routes.clear()
    _routes[id(models)] = (models, index)
    return index


def _filled(deployment: Deployment, name: str, groups: tuple[str, ...]) -> Deployment:
    model = deployment.model
    if "*" in model:  # config checks that model then has one * per * of the pattern
        pieces = model.split("*")
        model = pieces[0] + "".join(g + p for g, p in zip(groups, pieces[1:], strict=True))
    return replace(deployment, model_name=name, model=model, pattern=deployment.model_name)


def route(settings: Settings, name: str) -> list[Deployment]:
    """The deployments that serve ``name``, in the order to try them; [] when none does."""
    index = _index(settings.models)
    found = index.exact.get(name)
    if found:
        return list(found)
    for pattern, deployments in index.patterns:
        groups = pattern.match(name)
        if groups is not None:
            return [_filled(d, name, groups) for d in deployments]
    return []


def serves(settings: Settings, name: str) -> bool:
    index = _index(settings.models)
    return name in index.exact or any(p.match(name) is not None for p, _ in index.patterns)


def aliases_of(*owners: Mapping[str, Any] | None) -> dict[str, str]:
    """The alias map of a key's owners, given as (user, key, team): later ones win. Entries
    that are not name to name (stored before aliases were checked) are left out."""
    merged: dict[str, str] = {}
    for owner, field in zip(owners, ("aliases", "aliases", "model_aliases"), strict=False):
        aliases = (owner or {}).get(field)
        if isinstance(aliases, dict):
            merged.update((k, v) for k, v in aliases.items() if isinstance(v, str) and v)
    return merged


def listed_names(settings: Settings, *, wildcard_routes: bool = False) -> list[str]:
    """What /v1/models lists, before access checks, as LiteLLM lists it: every model_name;
    for a wildcard ``provider/*`` entry, the models genai-prices knows of its provider
    that it would serve (``openai/gpt-4o``), not the pattern itself unless ``wildcard_routes``
    (LiteLLM's ``return_wildcard_routes``). A bare ``*`` names no provider: only the route."""
    names: dict[str, None] = {}
    for deployment in settings.models:
        if "*" not in deployment.model_name:
            names[deployment.model_name] = None
            continue
        if wildcard_routes:
            names[deployment.model_name] = None
        prefix, slash, _ = deployment.model_name.partition("/")
        provider = deployment.model.partition("/")[0] if "/" in deployment.model else "openai"
        if not slash or "*" in prefix or "*" in provider:
            continue
        for known in _known(provider):
            candidate = f"{prefix}/{known}"
            served = route(settings, candidate)
            if served and served[0].pattern == deployment.model_name:
                names[candidate] = None
    return list(names)


def _known(provider: str) -> Iterable[str]:
    return provider_models(provider)
