"""Model routing: key/user ``aliases`` and team ``model_aliases``, and wildcard ``model_list``
entries, through the sidecar over real HTTP (the fake upstream echoes the model it was sent)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratelimiter.errors import EntityError
from ratelimiter.gateway.config import ConfigError, Deployment, Settings, load_config
from ratelimiter.gateway.resolver import Caller, check_model_access
from ratelimiter.gateway.routing import Pattern, listed_names, pattern_regex, route
from ratelimiter.testing.fake_upstream import FakeUpstream

from ..conftest import MASTER_KEY, MESSAGES, Admin, running_sidecar, running_upstream


def _models(upstream: str, *, catch_all: bool) -> tuple[Deployment, ...]:
    models = [
        Deployment(
            "gpt-4o",
            "openai/gpt-4o",
            api_base=upstream,
            input_cost_per_token=1e-6,
            output_cost_per_token=2e-6,
        ),
        Deployment("gpt-4o-mini", "openai/gpt-4o-mini", api_base=upstream),
        Deployment("openai/*", "openai/*", api_base=upstream, rpm=1),
        Deployment("openai/gpt-4.1*", "openai/gpt-4.1*", api_base=upstream),
    ]
    if catch_all:
        models.append(Deployment("*", "openai/gpt-4o-mini", api_base=upstream, rpm=1))
    return tuple(replace(d, index=i) for i, d in enumerate(models))


class Routed:
    def __init__(self, base: str, admin: Admin) -> None:
        self.base, self.admin = base, admin
        self.clients: list[openai.AsyncOpenAI] = []

    def client(self, key: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    async def key(self, **fields: object) -> str:
        return (await self.admin.post("/key/generate", fields))["key"]

    async def served(self, key: str, model: str) -> str:
        """The model the upstream was sent for a request asking for ``model``."""
        reply = await self.client(key).chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=4
        )
        return reply.model


@contextlib.asynccontextmanager
async def routed(ns: str, redis_url: str, *, catch_all: bool) -> AsyncIterator[Routed]:
    async with running_upstream(FakeUpstream(seed=3)) as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            default_max_tokens=16,
            models=_models(upstream, catch_all=catch_all),
        )
        async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as s:
            stack = Routed(base, Admin(s, base))
            yield stack
            for client in stack.clients:
                await client.close()


@pytest.fixture
async def aliased(ns: str, redis_url: str) -> AsyncIterator[Routed]:
    async with routed(ns, redis_url, catch_all=False) as stack:
        yield stack


@pytest.fixture
async def wild(ns: str, redis_url: str) -> AsyncIterator[Routed]:
    async with routed(ns, redis_url, catch_all=True) as stack:
        yield stack


# -- aliases ---------------------------------------------------------------------------


async def test_a_key_alias_is_served_by_its_target_and_counts_there(aliased: Routed) -> None:
    key = await aliased.key(aliases={"gpt-4": "gpt-4o"}, model_rpm_limit={"gpt-4o": 1})
    assert await aliased.served(key, "gpt-4") == "gpt-4o"  # the body upstream names the target
    (entry,) = await aliased.admin.get("/spend/logs", api_key=key)
    assert (entry["model"], entry["deployment"]) == ("gpt-4o", "gpt-4o#0")
    assert entry["spend"] == pytest.approx(10e-6 + 4 * 2e-6)  # the target's price
    # the key x model limit is the served model's: asked for by either name, it is spent
    for name in ("gpt-4o", "gpt-4"):
        with pytest.raises(openai.RateLimitError):
            await aliased.served(key, name)


async def test_the_team_alias_wins_over_the_key_and_the_key_over_its_user(
    aliased: Routed,
) -> None:
    await aliased.admin.post("/team/new", {"team_id": "t", "model_aliases": {"fast": "gpt-4o"}})
    await aliased.admin.post(
        "/user/new", {"user_id": "u", "aliases": {"fast": "gpt-4o", "slow": "gpt-4o"}}
    )
    key = await aliased.key(
        team_id="t", user_id="u", aliases={"fast": "gpt-4o-mini", "slow": "gpt-4o-mini"}
    )
    assert await aliased.served(key, "fast") == "gpt-4o"  # team over key (LiteLLM's merge)
    assert await aliased.served(key, "slow") == "gpt-4o-mini"  # key over user
    plain = await aliased.key(user_id="u")
    assert await aliased.served(plain, "slow") == "gpt-4o"  # the user's, for its keys


async def test_access_is_checked_on_the_alias_or_its_target(aliased: Routed) -> None:
    by_alias = await aliased.key(models=["gpt-4"], aliases={"gpt-4": "gpt-4o-mini"})
    assert await aliased.served(by_alias, "gpt-4") == "gpt-4o-mini"
    with pytest.raises(openai.PermissionDeniedError):  # the list names the alias only
        await aliased.served(by_alias, "gpt-4o-mini")
    by_target = await aliased.key(models=["gpt-4o-mini"], aliases={"gpt-4": "gpt-4o-mini"})
    assert await aliased.served(by_target, "gpt-4") == "gpt-4o-mini"
    neither = await aliased.key(models=["gpt-4o"], aliases={"gpt-4": "gpt-4o-mini"})
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await aliased.served(neither, "gpt-4")
    assert "Tried to access gpt-4 " in denied.value.response.json()["error"]["message"]


async def test_a_team_list_allows_the_team_aliases_but_a_key_list_does_not(
    aliased: Routed,
) -> None:
    await aliased.admin.post(
        "/team/new",
        {"team_id": "t", "models": ["gpt-4o-mini"], "model_aliases": {"big": "gpt-4o"}},
    )
    key = await aliased.key(team_id="t")
    assert await aliased.served(key, "big") == "gpt-4o"
    narrow = await aliased.key(team_id="t", models=["gpt-4o-mini"])
    with pytest.raises(openai.PermissionDeniedError):
        await aliased.served(narrow, "big")


async def test_aliases_apply_once_so_a_cycle_swaps(aliased: Routed) -> None:
    key = await aliased.key(aliases={"gpt-4o": "gpt-4o-mini", "gpt-4o-mini": "gpt-4o"})
    assert await aliased.served(key, "gpt-4o") == "gpt-4o-mini"
    assert await aliased.served(key, "gpt-4o-mini") == "gpt-4o"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/key/generate", {"aliases": {"gpt-4": "nope"}}, "aliases.gpt-4: 'nope' is not served"),
        # an alias to an alias: targets are models, never other aliases
        (
            "/key/generate",
            {"aliases": {"x": "y", "y": "gpt-4o"}},
            "aliases.x: 'y' is not served",
        ),
        ("/user/new", {"aliases": {"a": "b"}}, "aliases.a: 'b' is not served"),
        ("/team/new", {"model_aliases": {"a": "b"}}, "model_aliases.a: 'b' is not served"),
        ("/key/generate", {"aliases": {"gpt-*": "gpt-4o"}}, "aliases: an alias is a model name"),
        ("/key/generate", {"aliases": {"a": "openai/*"}}, "aliases.a: must name the model"),
        ("/key/generate", {"aliases": {"a": 5}}, "aliases.a: must name the model"),
        ("/key/generate", {"aliases": {"": "gpt-4o"}}, "aliases: an alias is a model name"),
        ("/key/generate", {"aliases": {"a" * 300: "gpt-4o"}}, "an alias is a model name"),
        ("/key/generate", {"aliases": ["gpt-4o"]}, "aliases: must be an object"),
        (
            "/key/generate",
            {"aliases": {f"m{i}": "gpt-4o" for i in range(1001)}},
            "aliases: at most 1000 aliases",
        ),
    ],
)
async def test_bad_aliases_are_a_400_naming_the_alias(
    aliased: Routed, path: str, body: dict, message: str
) -> None:
    status, payload = await aliased.admin.call("POST", path, body)
    assert status == 400, payload
    assert message in payload["error"]["message"]


async def test_a_models_list_may_name_an_alias(aliased: Routed) -> None:
    await aliased.admin.post("/team/new", {"team_id": "t", "model_aliases": {"big": "gpt-4o"}})
    await aliased.key(models=["mine"], aliases={"mine": "gpt-4o"})
    await aliased.key(models=["big"], team_id="t")
    status, payload = await aliased.admin.call("POST", "/key/generate", {"models": ["big"]})
    assert status == 400 and "'big' matches no model" in payload["error"]["message"]


# -- wildcards -------------------------------------------------------------------------


async def test_a_wildcard_entry_fills_in_the_model_and_prices_it(wild: Routed) -> None:
    key = await wild.key()
    assert await wild.served(key, "gpt-4o") == "gpt-4o"  # an exact name wins over patterns
    assert await wild.served(key, "openai/gpt-4o") == "gpt-4o"  # openai/* -> openai/gpt-4o
    assert await wild.served(key, "openai/gpt-4.1-mini") == "gpt-4.1-mini"
    assert await wild.served(key, "anything-else") == "gpt-4o-mini"  # * catches the rest
    logs = await wild.admin.get("/spend/logs", api_key=key)
    by_model = {entry["model"]: entry for entry in logs}
    assert by_model["openai/gpt-4o"]["deployment"] == "openai/*#2:openai/gpt-4o"
    # the table's gpt-4o price: 10 prompt tokens at $2.50/M, 4 completion at $10/M
    assert by_model["openai/gpt-4o"]["spend"] == pytest.approx(10 * 2.5e-6 + 4 * 10e-6)
    assert by_model["openai/gpt-4.1-mini"]["deployment"] == "openai/gpt-4.1*#3:openai/gpt-4.1-mini"
    assert by_model["anything-else"]["deployment"] == "*#4:openai/gpt-4o-mini"


async def test_a_wildcard_deployment_limit_counts_per_model_it_serves(wild: Routed) -> None:
    key = await wild.key()
    assert await wild.served(key, "openai/gpt-4o") == "gpt-4o"
    with pytest.raises(openai.RateLimitError) as refused:  # rpm 1 for openai/gpt-4o
        await wild.served(key, "openai/gpt-4o")
    assert refused.value.response.json()["error"]["type"] == "requests"
    assert await wild.served(key, "openai/gpt-4-turbo") == "gpt-4-turbo"  # its own window
    # names a client makes up share the window of the one model they are sent to
    assert await wild.served(key, "made-up-1") == "gpt-4o-mini"
    with pytest.raises(openai.RateLimitError):
        await wild.served(key, "made-up-2")


async def test_key_model_lists_work_with_wildcard_deployments(wild: Routed) -> None:
    key = await wild.key(models=["openai/*"])
    assert await wild.served(key, "openai/gpt-4o") == "gpt-4o"
    # served by * with model openai/gpt-4o-mini: the list allows the model it is sent to
    assert await wild.served(key, "whatever") == "gpt-4o-mini"
    narrow = await wild.key(models=["openai/gpt-4.1*"])
    assert await wild.served(narrow, "openai/gpt-4.1") == "gpt-4.1"
    with pytest.raises(openai.PermissionDeniedError):
        await wild.served(narrow, "openai/gpt-4o")
    # a name only a wildcard serves is a valid models entry
    await wild.key(models=["openai/o3-mini"])


async def test_v1_models_lists_the_known_models_a_wildcard_serves(wild: Routed) -> None:
    listed = (await wild.admin.get("/v1/models"))["data"]
    names = [m["id"] for m in listed]
    assert names[:2] == ["gpt-4o", "gpt-4o-mini"]
    assert {"openai/gpt-4o", "openai/o3-mini", "openai/gpt-4.1-mini"} <= set(names)
    assert "openai/*" not in names and "*" not in names
    assert not any("claude" in n for n in names)  # not an openai model
    routes = await wild.admin.get("/v1/models", return_wildcard_routes="true")
    assert {"openai/*", "openai/gpt-4.1*", "*"} <= {m["id"] for m in routes["data"]}
    key = await wild.key(models=["openai/gpt-4.1*"])
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{wild.base}/v1/models", headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        mine = {m["id"] for m in (await response.json())["data"]}
    assert mine == {"openai/gpt-4.1", "openai/gpt-4.1-mini", "openai/gpt-4.1-nano"}


async def test_without_a_catch_all_an_unmatched_name_is_a_404(aliased: Routed) -> None:
    with pytest.raises(openai.NotFoundError):
        await aliased.served(await aliased.key(), "anthropic/claude-3-5-haiku")


def test_routing_order_is_litellms() -> None:
    """Exact names first; then the longer pattern; equally specific ones in config order."""
    models = (
        Deployment("*", "openai/*", index=0),
        Deployment("openai/*", "openai/*", index=1),
        Deployment("openai/gpt-4o", "openai/gpt-4o", index=2),
        Deployment("openai/gpt-*", "openai/gpt-*", index=3),
        Deployment("azure/*", "openai/*", index=4),
        Deployment("other/*", "openai/*", index=5),
        Deployment("other/*", "openai/*", index=6),
    )
    settings = Settings(master_key=MASTER_KEY, models=models)

    def where(name: str) -> list[int]:
        return [d.index for d in route(settings, name)]

    assert where("openai/gpt-4o") == [2]
    assert where("openai/gpt-4.1") == [3]
    assert where("openai/o3") == [1]
    assert where("azure/o3") == [4]
    assert where("other/x") == [5, 6]  # one pattern, two deployments: tried in order
    assert where("x/openai/gpt-4") == [0]  # patterns match the whole name, not its start
    (filled,) = route(settings, "openai/o3-mini")
    assert (filled.model_name, filled.pattern) == ("openai/o3-mini", "openai/*")
    assert filled.model == "openai/o3-mini"
    assert filled.price[:2] == (1.1e-6, 4.4e-6)  # the filled model's, from genai-prices
    assert route(Settings(master_key=MASTER_KEY, models=models[1:]), "x/openai/gpt-4") == []
    assert "openai/gpt-4o" in listed_names(settings)


# -- config ----------------------------------------------------------------------------

_CONFIG = """\
general_settings:
  master_key: sk-a-long-random-test-key-7f3a9c
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
  - model_name: {name}
    litellm_params:
      model: {model}
"""


@pytest.mark.parametrize(
    ("name", "model", "line", "message"),
    [
        ("fixed", "openai/*", 9, "litellm_params.model: 'openai/*' has a * but model_name 'fixed'"),
        ("a/*/*", "openai/*", 9, "has 1 * but model_name 'a/*/*' has 2"),
        ("openai/**", "openai/*", 7, "model_list[1].model_name: 'openai/**' has two * in a row"),
        # no api_base: the line of the nearest setting the file has, litellm_params
        ("*", "*", 8, "model_list[1].litellm_params.api_base: is required for '*'"),
    ],
)
def test_bad_wildcard_entries_are_config_errors_with_their_line(
    tmp_path: Path, name: str, model: str, line: int, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_CONFIG.format(name=f'"{name}"', model=f'"{model}"'))
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        load_config(path, env={})
    assert str(raised.value).startswith(f"{path}: model_list[1]")
    assert str(raised.value).endswith(f"(line {line})")


def test_good_wildcard_entries_load(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_CONFIG.format(name='"*"', model="openai/gpt-4o-mini"))
    settings = load_config(path, env={})
    assert [d.index for d in route(settings, "anything")] == [1]
    path.write_text(_CONFIG.format(name='"openai/*"', model='"openai/*"'))
    assert route(load_config(path, env={}), "openai/o3-mini")[0].model == "openai/o3-mini"


@given(
    pattern=st.lists(st.text("ab/", max_size=3), min_size=2, max_size=5).map("*".join),
    name=st.text("ab/*", max_size=12),
)
def test_a_pattern_matches_as_litellms_regex_would(pattern: str, name: str) -> None:
    """Each * as the group (.*) of a regex matching the whole name: the same groups."""
    found = re.fullmatch(pattern_regex(pattern), name)
    assert Pattern(tuple(pattern.split("*"))).match(name) == (found.groups() if found else None)


def test_a_hostile_name_against_many_wildcards_is_quick() -> None:
    """A backtracking regex would take 256**5 steps here."""
    pattern = Pattern(("a",) * 5 + ("b",))
    started = time.perf_counter()
    assert pattern.match("a" * 256) is None
    assert time.perf_counter() - started < 0.05


def test_an_access_group_on_a_wildcard_entry_covers_the_names_it_serves() -> None:
    models = (
        Deployment("gpt-4o", "openai/gpt-4o", index=0),
        Deployment("openai/*", "openai/*", access_groups=("cheap",), index=1),
    )
    settings = Settings(master_key=MASTER_KEY, models=models)
    caller = Caller(False, "t", {"models": ["cheap"]})
    check_model_access(caller, route(settings, "openai/gpt-4o-mini")[0], settings)
    with pytest.raises(EntityError, match="Tried to access gpt-4o "):
        check_model_access(caller, route(settings, "gpt-4o")[0], settings)
