"""Issue 13 item 6: hostile JSON bodies, query strings and headers against every route of one
running sidecar (real Redis, the fake upstream): no 5xx, no hang, every error in OpenAI's
envelope.

The routes come from the app factory's own router, so a new route is fuzzed without touching
this file. Hypothesis runs derandomized and without its example database, so CI sends the same
requests on every run. The sidecar and the upstream run on their own event loop in a thread; the
hypothesis tests are synchronous and wait for each answer with a bound.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import traceback
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

import aiohttp
import pytest
import redis.asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from ratelimiter.engine import Engine
from ratelimiter.gateway.app import create_app
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.http import MAX_BODY_BYTES
from ratelimiter.gateway.store import SCHEMAS, hash_key

from .conftest import MASTER_KEY, Admin, running_sidecar, running_upstream

# Routes not fuzzed, and why. Nothing else is skipped, and no route streams forever.
SKIPPED = {
    "/metrics": "Prometheus text for scrapers: reads no body or query, answers no JSON",
    "/ui": "a fixed redirect to /ui/",
    "/ui/": "the UI's HTML page, a static file",
    "/ui/static/{name}": "the UI's static files, by name",
}


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route the factory registers, read from an app that is never
    served (its Redis client never connects)."""
    app = create_app(Settings(master_key=MASTER_KEY), Engine(redis.asyncio.Redis()))
    return [
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        # HEAD is the GET handler answering without a body
        if route.method != "HEAD" and route.resource and route.resource.canonical not in SKIPPED
    ]


ROUTES = _routes()
PROXY_KINDS = {"chat/completions": "chat", "completions": "completion", "embeddings": "embedding"}
T = TypeVar("T")
CALL_BOUND_S = 10.0  # an answer slower than this is a hang: the upstream answers at once
ENVELOPE = {"message", "type", "param", "code"}
HYPOTHESIS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
}


def _proxy_kind(path: str) -> str | None:
    for suffix, kind in PROXY_KINDS.items():  # chat/completions before completions
        if path.endswith("/" + suffix):
            return kind
    return None


def weighted(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``options``, each about as often as its weight (one_of draws each distinct
    strategy about equally, however often it is listed); shrinks towards the first."""
    table = [strategy for weight, strategy in options for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


# -- hostile values ----------------------------------------------------------------------

EDGE_INTS = [-1, 0, 1, 2**31 - 1, 2**31, 2**53 - 1, 2**53, 2**60, 2**63 - 1, 2**63, 2**64, 10**30]
EDGE_FLOATS = [1e308, -1e308, 1e-308, 0.5, -0.0, 1e10, 9007199.254740993, 1.5]
EDGE_TEXT = [
    "",
    " ",
    "\x00",
    "\u202e",
    "🙂" * 300,
    "x" * 257,
    "x" * 5000,
    "99999999999999999999d",
    "100000y",
    "1e308s",
    "-1d",
    "0s",
    "1s",
    "30d",
    "9999-12-31",
    "0001-01-01",
    "NaN",
    "Infinity",
    "sk-",
    "%s%n{0}",
    "m",
    "*",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(),
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=False, allow_infinity=False),  # NaN and infinity are not JSON
    st.sampled_from(EDGE_TEXT),
    st.text(max_size=30),
)

# Fields the admin handlers read besides the entities' own (admin.py, hosted_budgets.py).
HANDLER_FIELDS = {
    "key",
    "keys",
    "user_ids",
    "team_ids",
    "id",
    "budgets",
    "member",
    "max_budget_in_team",
    "project_name",
    "user_dict",
    "end_user_id",
    "total_budget",
}
ADMIN_FIELDS = sorted({name for schema in SCHEMAS.values() for name in schema} | HANDLER_FIELDS)
PROXY_FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "user",
    "tools",
    "functions",
    "tool_choice",
    "response_format",
    "suffix",
    "temperature",
    "stop",
    "logit_bias",
    "metadata",
]
field_names = st.one_of(st.sampled_from(ADMIN_FIELDS + PROXY_FIELDS), st.text(max_size=12))
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(field_names, inner, max_size=4),
    max_leaves=12,
)
# Shapes a proxy body's structured fields get wrong (issue 13's list, and neighbours).
PROXY_SHAPES = [
    [None],
    [1],
    ["str"],
    [[]],
    [{}],
    [{"role": "user"}],
    [{"role": 5, "content": "x"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [None]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [{"type": "image_url"}]}],
    [{"role": "assistant", "tool_calls": "x"}],
    [{"role": "assistant", "tool_calls": [{"function": {"arguments": 5}}]}],
    [[1, -1]],
    [[2**40]],
    [5, "x"],
    {"include_usage": "yes"},
    {"include_usage": True},
    "x",
    5,
    2**53,
    {},
    [],
]
QUERY_VALUES = [
    "99999999999999999999999",
    "-1",
    "0",
    "1",
    "1000001",
    "1e3",
    "",
    " ",
    "٣",
    "²",
    "9999-12-31",
    "9999-12-30",
    "0001-01-01",
    "1970-01-01",
    "10000-01-01",
    "2024-02-30",
    "2024-13-01",
    "+2024-01-01",
    "20240101",
    "x" * 300,
    "🙂",
    "\x00",
    "team",
    "key",
    "model",
    "sk-",
]
QUERY_NAMES = [
    "key",
    "user_id",
    "team_id",
    "end_user_id",
    "budget_id",
    "page",
    "page_size",
    "start_date",
    "end_date",
    "group_by",
    "api_key",
    "end_user",
    "model",
    "request_id",
]
RAW_QUERIES = [
    "%ff%fe",
    "page=%00",
    "&&&",
    "=",
    "page",
    "page=1&page=99999999999999999999999",
    "start_date=9999-12-31&end_date=9999-12-31",
    "start_date=0001-01-01&end_date=0001-01-01",
    "start_date=1970-01-01&end_date=9999-12-31",
]
# Bodies that are not a JSON value at all, or too large, or too deep for the parser.
RAW_BODIES = [
    b"",
    b"{",
    b"nul",
    b'{"a": 1,}',
    b"\xff\xfe",
    b"[" * 5000 + b"]" * 5000,
    b'{"model": ' * 2000 + b"1" + b"}" * 2000,
    b'{"x": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}',
]
CLIENT_IDS = ["x" * 300, "x" * 201, "x" * 200, "", " ", "id-1"]
# Request lines and header lines stay under aiohttp's 8190-byte parser limit: past it aiohttp
# itself answers a plain-text 400 before the app sees the request, out of this test's reach.


@dataclass(frozen=True)
class Hostile:
    """One request's hostile parts: a JSON body (or raw bytes), a query string, headers."""

    body: bytes | None
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        body = None if self.body is None else self.body.decode(errors="replace")
        if body is not None and len(body) > 300:
            body = f"{body[:300]}... ({len(body)} bytes)"
        headers = [
            (k, v if len(v) <= 40 else f"{v[:20]}... ({len(v)} chars)") for k, v in self.headers
        ]
        return f"Hostile(body={body!r}, query={self.query[:300]!r}, headers={headers!r})"


def _json(value: Any) -> bytes:
    # The standard library writes any integer and 1e308; orjson would refuse both.
    return json.dumps(value).encode()


@dataclass(frozen=True)
class Known:
    """Ids that exist in the sidecar, so that fuzzed calls reach past 'not found'."""

    free_key: str  # a key no admin call can reach: the proxy routes' steady caller
    target_key: str  # a key with a user, a team and a budget, which admin calls change
    end_user: str  # the proxy bodies' end user, a customer
    ids: dict[str, list[str]]

    @property
    def every_id(self) -> list[str]:
        return [i for ids in self.ids.values() for i in ids]


# Values of the right type at and past the ends of their range: what validation must take
# or refuse by name, and what the engine must then hold. Keyed by the store's checker.
money_values = st.one_of(
    st.sampled_from([0, 1e-9, 1, 9007199.254740991, 9007199.254740993, 9007199.26, 1e10, 1e308]),
    st.floats(0, 1e7),
)
count_values = st.one_of(
    st.sampled_from([0, 1, 2**31, 2**53 - 1, 2**53, 2**60, 2**63 - 1]), st.integers(0, 10**6)
)
duration_values = st.sampled_from(
    [
        *("1s", "30s", "1m", "1h", "1d", "7d", "30d", "1mo", "1y", "9999y", "100000y"),
        *("99999999999999999999d", "0d", "-1d", "", "1 d", "1w", "1e3s", "1.5h"),
    ]
)
text_values = st.one_of(
    st.text(min_size=1, max_size=20), st.sampled_from(["x" * 256, "x" * 257, "🙂" * 256])
)
models_values = st.sampled_from(["m", "other"])
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "money": money_values,
    "count": count_values,
    "duration": duration_values,
    "text": text_values,
    "flag": st.booleans(),
    "names": st.lists(st.sampled_from(["m", "*", "openai/*", "other"]) | text_values, max_size=3),
    "mapping": st.dictionaries(st.text(max_size=8), junk, max_size=3),
    "model_counts": st.dictionaries(models_values, count_values, max_size=2),
    "model_budgets": st.dictionaries(
        models_values,
        st.fixed_dictionaries(
            {},
            optional={
                "max_budget": money_values,
                "budget_duration": duration_values,
                "tpm_limit": count_values,
                "rpm_limit": count_values,
            },
        ),
        max_size=2,
    ),
    "budget_windows": st.lists(
        st.fixed_dictionaries({"max_budget": money_values, "budget_duration": duration_values}),
        max_size=3,
    ),
    "members": st.lists(
        st.fixed_dictionaries(
            {"user_id": text_values},
            optional={
                "role": st.sampled_from(["admin", "user", "owner"]),
                "max_budget_in_team": money_values,
            },
        ),
        max_size=3,
    ),
}
# The same for fields the handlers read outside the entities' schemas.
HANDLER_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "member": PLAUSIBLE["members"] | PLAUSIBLE["members"].map(lambda m: m[0] if m else {}),
    "max_budget_in_team": money_values,
    "user_dict": st.dictionaries(
        text_values,
        st.fixed_dictionaries({"total_budget": money_values}, optional={"current_cost": junk}),
        max_size=3,
    ),
}
# The kind of entity an admin path's first segment acts on.
KIND_OF = {
    "key": "key",
    "user": "user",
    "team": "team",
    "customer": "customer",
    "end_user": "customer",
    "budget": "budget",
    "get_budget": "project",
    "set_budget": "project",
}


def _plausible_fields(segment: str) -> st.SearchStrategy[dict[str, Any]]:
    """One to three of a route's fields, each with an extreme value of its own type."""
    schema = SCHEMAS.get(KIND_OF.get(segment, ""), {})
    options = {name: PLAUSIBLE.get(check.__name__, junk) for name, check in schema.items()}
    options.update(HANDLER_PLAUSIBLE)
    names = st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=3, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({n: options[n] for n in chosen}))


# The field that names the entity a route acts on, by kind and the path's last segment
# ("*": any other), as admin.py and hosted_budgets.py read them.
ID_FIELD = {
    "key": {"delete": "keys", "*": "key"},
    "user": {"delete": "user_ids", "*": "user_id"},
    "team": {"delete": "team_ids", "*": "team_id"},
    "customer": {"delete": "user_ids", "block": "user_ids", "unblock": "user_ids", "*": "user_id"},
    "budget": {"delete": "id", "info": "budgets", "*": "budget_id"},
    "project": {"*": "project_name"},
}
# Fields naming another entity, which some routes read too.
OTHER_IDS = {"user_id": "user", "team_id": "team", "budget_id": "budget"}


def _id_values(known: Known, kind: str) -> st.SearchStrategy[Any]:
    one = weighted(
        (6, st.sampled_from(known.ids[kind])), (1, st.sampled_from(known.every_id)), (1, scalars)
    )
    return weighted((4, one), (1, st.lists(one, min_size=1, max_size=3)))


def _targeted(known: Known, path: str) -> st.SearchStrategy[dict[str, Any]]:
    """An object naming an existing entity (and sometimes another), with one to three fields
    that are extreme but may pass, or hostile."""
    segment, action = path.strip("/").split("/")[0], path.rsplit("/", 1)[-1]
    kind = KIND_OF.get(segment)
    if kind is None:  # a route this table does not know: any entity, by any name
        kind = "key"
        field = st.sampled_from(sorted({f for names in ID_FIELD.values() for f in names.values()}))
    else:
        field = st.just(ID_FIELD[kind].get(action, ID_FIELD[kind]["*"]))
    other = st.fixed_dictionaries(
        {}, optional={f: _id_values(known, k) for f, k in OTHER_IDS.items()}
    )
    ids = st.tuples(field, _id_values(known, kind), other).map(
        lambda drawn: {**drawn[2], drawn[0]: drawn[1]}
    )
    fields = weighted(
        (2, _plausible_fields(segment)),
        (1, st.dictionaries(field_names, junk, min_size=1, max_size=3)),
    )
    return weighted((4, st.tuples(ids, fields)), (1, st.tuples(other, fields))).map(
        lambda pair: {**pair[1], **pair[0]}
    )


def _headers(
    known: Known, method: str, proxy: bool
) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Mostly what a client of the route sends (the master key for admin routes, a key for
    proxy routes), so that the body and the query get past authentication; else hostile."""
    keys = [MASTER_KEY, known.free_key, known.target_key] if proxy else [MASTER_KEY]
    json_type = (("Content-Type", "application/json"),) if method == "POST" else ()
    usual = st.sampled_from(keys).map(lambda key: (("Authorization", f"Bearer {key}"), *json_type))
    hostile_auth = st.sampled_from(
        [
            (),
            (("x-api-key", known.free_key),),
            (("Authorization", f"Bearer {known.free_key}"),),
            (("Authorization", "Bearer sk-not-a-key"),),
            (("Authorization", "Bearer "),),
            (("Authorization", "Basic dXNlcjpwYXNz"),),
            (("Authorization", "Bearer " + "x" * 4000),),
        ]
    ).map(lambda auth: (*auth, *json_type))
    other_type = st.sampled_from(["text/plain", "application/json; charset=latin-1", ""]).map(
        lambda kind: (("Authorization", f"Bearer {MASTER_KEY}"), ("Content-Type", kind))
    )
    client_id = st.tuples(usual, st.sampled_from(CLIENT_IDS)).map(
        lambda pair: (*pair[0], ("x-request-id", pair[1]))
    )
    return weighted((7, usual), (1, hostile_auth), (1, other_type), (1, client_id))


def _queries(known: Known, path: str) -> st.SearchStrategy[str]:
    """Hostile parameters; for a route that reads an entity's id, often that id (an existing
    one) among them."""
    values = st.one_of(
        st.sampled_from(QUERY_VALUES), st.sampled_from(known.every_id), st.text(max_size=20)
    )
    names = st.one_of(st.sampled_from(QUERY_NAMES), st.text(max_size=8))
    pairs = st.lists(st.tuples(names, values), max_size=4)
    kind = KIND_OF.get(path.strip("/").split("/")[0])
    if kind is not None:
        own = st.tuples(
            st.just(ID_FIELD[kind]["*"]),
            weighted((3, st.sampled_from(known.ids[kind])), (1, values)),
        )
        pairs = weighted((1, pairs), (2, st.tuples(own, pairs).map(lambda t: [t[0], *t[1]])))
    return weighted((5, pairs.map(urlencode)), (1, st.sampled_from(RAW_QUERIES)))


def _admin_body(known: Known, path: str) -> st.SearchStrategy[bytes]:
    return weighted(
        (5, _targeted(known, path).map(_json)),
        (1, st.one_of(scalars, st.lists(junk, max_size=4)).map(_json)),  # not an object
        (2, st.dictionaries(field_names, junk, max_size=6).map(_json)),
        (1, st.sampled_from(RAW_BODIES)),
    )


VALID_PROXY = {
    "chat": {
        "model": "m",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
    },
    "completion": {"model": "m", "prompt": "hello there", "max_tokens": 4},
    "embedding": {"model": "m", "input": "hello there"},
}


# Proxy fields' values that are well-typed, at the ends of their range or unusual in shape.
PROXY_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.sampled_from([1, 16, 4096, 2**31 - 1, 2**31, 2**53 - 1, 2**53]),
    "max_completion_tokens": st.sampled_from([1, 16, 2**31, 2**53]),
    "n": st.sampled_from([1, 2, 128, 129, 2**53]),
    "best_of": st.sampled_from([0, 1, 20, 21]),
    "user": st.sampled_from(["", "ana@example.com", "x" * 256, "x" * 257]),
    "stream": st.booleans(),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": False}, {}]),
    "messages": st.sampled_from(
        [
            [],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": None, "name": "ana"}],
            [
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": ""}}]},
                {"role": "tool", "content": "r", "tool_call_id": "1"},
            ],
            [{"role": "user", "content": "x" * 100_000}],
        ]
    ),
    "prompt": st.sampled_from(["", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [], "x" * 100_000]),
    "input": st.sampled_from(["", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [], [[2**31 - 1]]]),
    "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    "response_format": st.just({"type": "json_schema", "json_schema": {"name": "s"}}),
    "temperature": st.floats(0, 2),
}


@st.composite
def _proxy_json(draw: st.DrawFn, known: Known, kind: str) -> Any:
    """A valid OpenAI request, sometimes streamed, sometimes naming an end user, with one
    field set to an unusual or a hostile value, or removed."""
    body: dict[str, Any] = dict(VALID_PROXY[kind])
    if draw(st.booleans()):
        body["stream"] = True
    if draw(st.booleans()):
        body["user"] = known.end_user
    name = draw(st.sampled_from([*body, *PROXY_FIELDS]) | st.text(max_size=12))
    plausible = PROXY_PLAUSIBLE.get(name, junk)
    change = draw(st.sampled_from(["drop", "plausible", "plausible", "shape", "junk"]))
    if change == "drop":
        body.pop(name, None)
    else:
        shapes = st.sampled_from(PROXY_SHAPES)
        body[name] = draw({"plausible": plausible, "shape": shapes, "junk": junk}[change])
    return body


def _proxy_body(known: Known, kind: str) -> st.SearchStrategy[bytes]:
    return weighted(
        (6, _proxy_json(known, kind).map(_json)),
        (1, st.one_of(scalars, st.lists(junk, max_size=4)).map(_json)),  # not an object
        (1, st.sampled_from(RAW_BODIES)),
    )


def hostile_requests(known: Known, method: str, path: str) -> st.SearchStrategy[Hostile]:
    kind = _proxy_kind(path)
    if method != "POST":
        body: st.SearchStrategy[bytes | None] = st.none()
    elif kind is not None:
        body = _proxy_body(known, kind)
    else:
        body = _admin_body(known, path)
    # POST routes read no query: an empty one is the usual case there
    query = (
        _queries(known, path)
        if method != "POST"
        else weighted((4, st.just("")), (1, _queries(known, path)))
    )
    return st.builds(Hostile, body, query, _headers(known, method, kind is not None))


# The issue's own cases, tried on every run whatever hypothesis draws.
EXPLICIT: dict[str, list[Hostile]] = {
    "/key/generate": [
        Hostile(_json({"duration": "99999999999999999999d"})),
        Hostile(_json({"max_budget": 1e308})),
        Hostile(_json({"max_budget": 1e10})),
        Hostile(_json({"rpm_limit": 2**63 - 1})),
        Hostile(_json({"budget_duration": "100000y"})),
        Hostile(_json({"model_max_budget": {"m": {"max_budget": 1e308}}})),
        Hostile(_json({"model_rpm_limit": {"m": 2**60}})),
        Hostile(_json({"budget_limits": [{"max_budget": 1, "budget_duration": "9999999999y"}]})),
    ],
    "/spend/logs": [
        Hostile(None, "page=99999999999999999999999"),
        Hostile(None, "start_date=9999-12-31&end_date=9999-12-31"),
    ],
    "/global/spend": [Hostile(None, "start_date=9999-12-31&end_date=9999-12-31")],
    "/global/spend/report": [Hostile(None, "start_date=9999-12-31&end_date=9999-12-31")],
}
PROXY_EXPLICIT: dict[str, list[dict[str, Any]]] = {
    "chat": [
        {"messages": [None]},
        {"messages": [1]},
        {"messages": ["str"]},
        {"max_tokens": 2**53},
        {"max_completion_tokens": 2**53},
        {"n": 2**53},
        {"stream": True, "stream_options": "x"},
        {"stream": True, "stream_options": [1]},
    ],
    # "messages" is not the route's: passed through, the upstream must answer it with a 4xx
    "completion": [{"prompt": 5}, {"max_tokens": 2**53}, {"messages": [None]}],
    "embedding": [{"input": 5}, {"messages": [None]}],
}


def _explicit(known: Known, method: str, path: str) -> list[Hostile]:
    master = (("Authorization", f"Bearer {MASTER_KEY}"), ("Content-Type", "application/json"))
    found = [Hostile(h.body, h.query, master) for h in EXPLICIT.get(path, [])]
    if method == "POST":
        found += [Hostile(_json(value), "", master) for value in ([1, 2], "x", 5, None)]
    kind = _proxy_kind(path)
    if kind is not None:
        base = VALID_PROXY[kind]
        found += [Hostile(_json({**base, **change}), "", master) for change in PROXY_EXPLICIT[kind]]
        found.append(Hostile(_json(base), "", (*master, ("x-request-id", "x" * 300))))
    return found


# -- the running sidecar ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    logged: list[str]  # what the sidecar logged at ERROR while answering


class ErrorLog(logging.Handler):
    """The sidecar's ERROR records, each as its message and where its exception was raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            line += f" | {type(exc).__name__}: {exc} at {frame.filename}:{frame.lineno}"
        self.lines.append(line[:1000])


class Sidecar:
    """The sidecar on its own event loop; ``call`` waits for an answer at most CALL_BOUND_S."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, base: str, session: aiohttp.ClientSession
    ) -> None:
        self.loop, self.base, self.session = loop, base, session
        self.errors = ErrorLog()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(CALL_BOUND_S + 5)

    def call(self, method: str, path: str, request: Hostile) -> Answer:
        self.errors.lines.clear()
        try:
            status, body = self.run(self._call(method, path, request))
        except TimeoutError:
            raise AssertionError(
                f"{method} {path} {request!r}: no answer within {CALL_BOUND_S:g} s; sidecar "
                f"logged {self.errors.lines}"
            ) from None
        return Answer(status, body, list(self.errors.lines))

    async def _call(self, method: str, path: str, request: Hostile) -> tuple[int, bytes]:
        url = URL(self.base + path + (f"?{request.query}" if request.query else ""), encoded=True)
        # a stream, not bytes: aiohttp warns that a large bytes body blocks the loop
        body = None if request.body is None else io.BytesIO(request.body)
        async with asyncio.timeout(CALL_BOUND_S):
            async with self.session.request(
                method, url, data=body, headers=dict(request.headers)
            ) as response:
                return response.status, await response.read()


def _settings(prefix: str, upstream: str) -> Settings:
    # The deployment's tpm refuses any request that may generate more than it: the fake
    # upstream writes max_tokens words, and 2**31 of them would be the hang, not the sidecar.
    model = Deployment(
        "m",
        "openai/m",
        api_base=upstream,
        tpm=200_000,
        input_cost_per_token=1e-6,
        output_cost_per_token=2e-6,
    )
    return Settings(
        master_key=MASTER_KEY,
        key_prefix=prefix,
        default_max_tokens=16,
        upstream_timeout_s=5,
        models=(model,),
    )


async def _populate(admin: Admin) -> Known:
    """Entities of every kind, new for each route, so that one route's deletes leave the
    next route something to work on."""
    tag = uuid.uuid4().hex[:6]
    user, team, budget = f"fz-user-{tag}", f"fz-team-{tag}", f"fz-budget-{tag}"
    customer, project, end_user = f"fz-customer-{tag}", f"fz-project-{tag}", f"fz-end-{tag}"
    await admin.post("/budget/new", {"budget_id": budget, "max_budget": 100})
    await admin.post("/user/new", {"user_id": user})
    await admin.post("/team/new", {"team_id": team, "members": [{"user_id": user}]})
    await admin.post("/customer/new", {"user_id": customer})
    await admin.post("/set_budget", {"project_name": project, "user_dict": {}})
    free = (await admin.post("/key/generate", {}))["key"]
    owned = {"user_id": user, "team_id": team, "budget_id": budget}
    target = (await admin.post("/key/generate", owned))["key"]
    ids = {
        "key": [target, hash_key(target)],
        "user": [user],
        "team": [team],
        "customer": [customer, end_user],
        "budget": [budget],
        "project": [project],
    }
    return Known(free, target, end_user, ids)


async def _serve(redis_url: str, ready: Future[Sidecar], stop: asyncio.Event) -> None:
    async with running_upstream() as upstream:
        prefix = f"t:fuzz-{uuid.uuid4().hex[:8]}:"
        async with (
            running_sidecar(_settings(prefix, upstream), redis_url) as base,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
        ):
            ready.set_result(Sidecar(asyncio.get_running_loop(), base, session))
            await stop.wait()


@pytest.fixture(scope="module")
def sidecar(redis_url: str) -> Iterator[Sidecar]:
    ready: Future[Sidecar] = Future()
    stop = asyncio.Event()

    def run() -> None:
        try:
            asyncio.run(_serve(redis_url, ready, stop))
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    running = ready.result(30)
    log = logging.getLogger("ratelimiter")
    log.addHandler(running.errors)
    yield running
    log.removeHandler(running.errors)
    running.loop.call_soon_threadsafe(stop.set)
    thread.join(15)


@pytest.fixture
def known(sidecar: Sidecar) -> Known:
    return sidecar.run(_populate(Admin(sidecar.session, sidecar.base)))


# -- the checks -------------------------------------------------------------------------


def _anthropic_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict) or set(payload) != {"type", "error"}:
        return "an error outside Anthropic's envelope"
    error = payload["error"]
    if (
        payload["type"] != "error"
        or not isinstance(error, dict)
        or set(error)
        != {
            "type",
            "message",
        }
    ):
        return "an error outside Anthropic's envelope"
    if not isinstance(error["message"], str) or "Traceback" in error["message"]:
        return "an error without a message, or with a traceback"
    return None


def _problem(answer: Answer, path: str) -> str | None:
    """What is wrong with an answer, or None. Anthropic's routes answer in Anthropic's
    envelope ({"type": "error", "error": {"type", "message"}}), the others in OpenAI's."""
    if answer.status >= 500:
        return "a 5xx, although Redis and the upstream are up"
    if answer.status < 400:
        return None
    try:
        payload = json.loads(answer.body)
    except ValueError:
        return "an error that is not JSON"
    if path.endswith(("/messages", "/messages/count_tokens")):
        return _anthropic_problem(payload)
    if not isinstance(payload, dict) or set(payload) != {"error"}:
        return "an error outside OpenAI's envelope"
    error = payload["error"]
    if not isinstance(error, dict) or set(error) != ENVELOPE:
        return "an error outside OpenAI's envelope"
    if not isinstance(error["message"], str) or not error["message"].strip():
        return "an error without a message"
    if not isinstance(error["type"], str) or "Traceback" in error["message"]:
        return "an error without a type, or with a traceback"
    return None


def check(sidecar: Sidecar, method: str, path: str, request: Hostile) -> Answer:
    answer = sidecar.call(method, path, request)
    problem = _problem(answer, path)
    assert problem is None, (
        f"{method} {path} {request!r} answered {answer.status}: {problem}. "
        f"Body: {answer.body[:500]!r}. Sidecar logged: {answer.logged}"
    )
    return answer


def _then_proxied(sidecar: Sidecar, known: Known) -> None:
    """After an admin change was accepted, the key it may have changed still gets a 4xx or
    a 2xx, never a 5xx: a value the admin API takes must not break the requests it limits."""
    headers = (
        ("Authorization", f"Bearer {known.target_key}"),
        ("Content-Type", "application/json"),
    )
    check(sidecar, "POST", "/v1/chat/completions", Hostile(_json(VALID_PROXY["chat"]), "", headers))


def _fuzz(
    sidecar: Sidecar, known: Known, method: str, path: str, examples: int
) -> Callable[[], None]:
    @settings(max_examples=examples, **HYPOTHESIS)
    @given(request=hostile_requests(known, method, path))
    def fuzz(request: Hostile) -> None:
        answer = check(sidecar, method, path, request)
        if method == "POST" and _proxy_kind(path) is None and answer.status < 300:
            _then_proxied(sidecar, known)

    for request in _explicit(known, method, path):
        fuzz = example(request=request)(fuzz)
    return fuzz


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_a_hostile_request_gets_a_4xx_in_the_envelope_never_a_5xx_or_a_hang(
    sidecar: Sidecar, known: Known, method: str, path: str
) -> None:
    examples = 100 if _proxy_kind(path) else 50
    _fuzz(sidecar, known, method, path, examples)()
