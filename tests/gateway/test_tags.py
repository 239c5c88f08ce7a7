"""Tag budgets through the running sidecar: /tag/* in LiteLLM's shapes, a request's tags from
the x-litellm-tags header and the body, the key's tags forced and restricting, each tag entity
a scope enforced atomically with the others, and tag spend that matches the ledger."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.reconcile import check
from ratelimiter.gateway.store import Store
from ratelimiter.gateway.tags import MAX_REQUEST_TAGS, MAX_TAG_SCOPES
from ratelimiter.testing.fake_upstream import FakeUpstream

from ..conftest import MASTER_KEY, MESSAGES, Admin, Stack, running_sidecar, running_upstream

BUDGET = "Budget has been exceeded! Tag="
RATE = re.compile(r"^Rate limit exceeded for tag: (\S+)\. Limit type: (\w+)\. Current limit: (\d+)")


async def chat(
    stack: Stack,
    key: str = MASTER_KEY,
    header: str | None = None,
    base: str | None = None,
    **body: object,
) -> tuple[int, dict]:
    """One chat request over plain HTTP, so that headers and hostile bodies go as sent (to
    ``base``, another sidecar, when given)."""
    headers = {"Authorization": f"Bearer {key}"}
    if header is not None:
        headers["x-litellm-tags"] = header
    payload = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4, **body}
    async with stack.admin.session.post(
        f"{base or stack.base}/v1/chat/completions", json=payload, headers=headers
    ) as response:
        return response.status, await response.json(content_type=None)


async def test_tags_are_created_read_updated_listed_and_deleted_in_litellms_shapes(
    stack: Stack,
) -> None:
    admin = stack.admin
    made = await admin.post(
        "/tag/new",
        {
            "name": "engineering",
            "description": "Engineering cost centre",
            "max_budget": 500.0,
            "budget_duration": "30d",
            "rpm_limit": 100,
            "models": ["gpt-4o"],
        },
    )
    assert made["message"] == "Tag engineering created successfully"
    tag = made["tag"]
    assert (tag["name"], tag["description"], tag["models"]) == (
        "engineering",
        "Engineering cost centre",
        ["gpt-4o"],
    )
    assert tag["litellm_budget_table"]["max_budget"] == 500.0
    assert tag["spend"] == 0.0 and tag["budget_reset_at"] and tag["created_at"]

    status, body = await admin.call("POST", "/tag/new", {"name": "engineering"})
    assert (status, body["error"]["message"]) == (400, "Tag engineering already exists")

    updated = await admin.post("/tag/update", {"name": "engineering", "max_budget": 750.0})
    assert updated["message"] == "Tag engineering updated successfully"
    assert updated["tag"]["max_budget"] == 750.0 and updated["tag"]["rpm_limit"] == 100

    info = await admin.post("/tag/info", {"names": ["engineering"]})
    assert set(info) == {"engineering"}
    assert info["engineering"]["litellm_budget_table"]["max_budget"] == 750.0
    assert info["engineering"]["description"] == "Engineering cost centre"

    status, body = await admin.call("POST", "/tag/info", {"names": ["engineering", "nope"]})
    assert (status, body["error"]["message"]) == (404, "Tags not found: ['nope']")

    listed = await admin.get("/tag/list")
    assert [t["name"] for t in listed] == ["engineering"]

    deleted = await admin.post("/tag/delete", {"name": "engineering"})
    assert deleted == {"message": "Tag engineering deleted successfully"}
    status, body = await admin.call("POST", "/tag/delete", {"name": "engineering"})
    assert (status, body["error"]["message"]) == (404, "Tag engineering not found")
    assert await admin.get("/tag/list") == []


async def test_tag_admin_refuses_hostile_bodies_and_non_admins(stack: Stack) -> None:
    admin = stack.admin
    for body, param in [
        ({}, "name"),
        ({"name": None}, "name"),
        ({"name": ""}, "name"),
        ({"name": "a{b}"}, "name"),
        ({"name": "a,b"}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"name": "bell\x07"}, "name"),
        ({"name": 7}, "name"),
        ({"name": "t", "max_budget": -1}, "max_budget"),
        ({"name": "t", "rpm_limit": "5"}, "rpm_limit"),
        ({"name": "t", "budget_duration": "soon"}, "budget_duration"),
        ({"name": "t", "colour": "red"}, "colour"),
        ({"name": "t", "budget_id": "missing"}, "budget_id"),
    ]:
        status, answer = await admin.call("POST", "/tag/new", body)
        assert status in (400, 404), (body, answer)
        assert answer["error"]["param"] == param, (body, answer)
    assert await admin.get("/tag/list") == []
    for body in ({"name": None, "max_budget": 1}, {"max_budget": 1}, {"name": "never-made"}):
        status, answer = await admin.call("POST", "/tag/update", body)
        assert status in (400, 404) and answer["error"]["param"] == "name", (body, answer)
    key = await stack.key()
    outsider = Admin(admin.session, admin.base, key)
    status, answer = await outsider.call("POST", "/tag/new", {"name": "t"})
    assert status == 401 and "Only proxy admin" in answer["error"]["message"]
    status, _ = await outsider.call("GET", "/tag/list")
    assert status == 401


async def test_the_openapi_document_describes_the_tag_routes(stack: Stack) -> None:
    document = await stack.admin.get("/openapi.json")
    paths = document["paths"]
    for path in ("/tag/new", "/tag/update", "/tag/info", "/tag/delete"):
        assert "post" in paths[path], path
    assert "get" in paths["/tag/list"] and "get" in paths["/spend/tags"]
    fields = document["components"]["schemas"]["TagNewRequest"]["properties"]
    for name in (
        "name",
        "description",
        "models",
        "model_info",
        "budget_id",
        "max_budget",
        "soft_budget",
        "max_parallel_requests",
        "tpm_limit",
        "rpm_limit",
        "model_max_budget",
        "budget_duration",
    ):
        assert name in fields, name
    assert "spend" in document["components"]["schemas"]["TagUpdateRequest"]["properties"]


@pytest.fixture
async def second(stack: Stack, redis_url: str) -> AsyncIterator[str]:
    """Another sidecar on the same Redis and upstream, as a second replica."""
    async with running_sidecar(stack.settings, redis_url) as base:
        yield base


async def test_a_tag_budget_is_hard_under_concurrent_requests_to_two_sidecars(
    stack: Stack, second: str
) -> None:
    # each request holds its estimate ($0.000025 with max_tokens=4), so $0.0001 admits 4 at
    # most while they are all in flight, and spends $0.000018 each
    await stack.admin.post("/tag/new", {"name": "eng", "max_budget": 0.0001})
    stack.fake.latency_ms = 300
    keys = [await stack.key(), await stack.key()]  # two keys: only the tag is shared
    answers = await asyncio.gather(
        *(
            chat(stack, keys[i % 2], header="eng", base=(stack.base, second)[i % 2])
            for i in range(12)
        )
    )
    admitted = [body for status, body in answers if status == 200]
    refused = [body for status, body in answers if status != 200]
    assert 1 <= len(admitted) <= 4
    for body in refused:
        assert body["error"]["type"] == "budget_exceeded"
        assert body["error"]["message"].startswith(f"{BUDGET}eng Current cost: ")
        assert "Max budget: 0.0001" in body["error"]["message"]
    info = (await stack.admin.post("/tag/info", {"names": ["eng"]}))["eng"]
    assert info["spend"] == pytest.approx(len(admitted) * 0.000018)
    assert info["spend"] <= 0.0001
    # the key's own spend is the same: the tag was one more scope of the same admission
    logs = await stack.admin.get("/spend/logs")
    assert sum(row["spend"] for row in logs) == pytest.approx(info["spend"])
    assert await check(stack.engine, stack.settings) == []  # counters == ledger


async def test_a_tags_rpm_is_shared_by_every_key_and_refused_as_litellm_words_it(
    stack: Stack,
) -> None:
    await stack.admin.post("/tag/new", {"name": "batch", "rpm_limit": 2})
    first, second = await stack.key(), await stack.key()
    assert (await chat(stack, first, header="batch"))[0] == 200
    assert (await chat(stack, second, metadata={"tags": ["batch"]}))[0] == 200
    status, body = await chat(stack, first, header=" batch , other ")
    assert status == 429
    match = RATE.match(body["error"]["message"])
    assert match is not None and match.groups() == ("batch", "requests", "2")
    # without the tag, the same key passes: only the tag's scope was full
    assert (await chat(stack, first))[0] == 200


async def test_header_and_body_tags_are_one_set_recorded_and_not_forwarded(
    stack: Stack,
) -> None:
    key = await stack.key()
    status, _ = await chat(
        stack,
        key,
        header="from-header",
        metadata={"tags": ["from-metadata", "from-header"], "note": "kept"},
    )
    assert status == 200
    # the upstream gets the client's other metadata, never the tags
    assert stack.fake.last_body["metadata"] == {"note": "kept"}
    status, _ = await chat(stack, key, header="from-header", tags=["from-body"])
    assert status == 200
    forwarded = stack.fake.last_body
    assert "tags" not in forwarded and "metadata" not in forwarded
    logs = await stack.admin.get("/spend/logs")
    assert sorted(tuple(row["request_tags"]) for row in logs) == [
        ("from-header", "from-body"),
        ("from-header", "from-metadata"),
    ]


async def test_a_keys_tags_are_forced_and_keep_it_off_other_tag_budgets(stack: Stack) -> None:
    await stack.admin.post("/tag/new", {"name": "eng", "max_budget": 1.0})
    await stack.admin.post("/tag/new", {"name": "mkt", "max_budget": 1.0})
    key = await stack.key(tags=["eng"])
    assert (await chat(stack, key))[0] == 200  # no tag sent: charged to eng all the same
    assert (await chat(stack, key, header="feature-x"))[0] == 200  # a label may be added
    status, body = await chat(stack, key, header="mkt")
    assert status == 403 and body["error"]["param"] == "x-litellm-tags"
    assert "tag 'mkt'" in body["error"]["message"]
    status, body = await chat(stack, key, metadata={"tags": ["mkt"]})
    assert (status, body["error"]["param"]) == (403, "metadata.tags")
    info = await stack.admin.post("/tag/info", {"names": ["eng", "mkt"]})
    assert info["eng"]["spend"] == pytest.approx(2 * 0.000018)
    assert info["mkt"]["spend"] == 0.0
    # a key's metadata.tags count as its tags too, as in LiteLLM
    other = await stack.key(metadata={"tags": ["mkt"]})
    assert (await chat(stack, other))[0] == 200
    info = await stack.admin.post("/tag/info", {"names": ["mkt"]})
    assert info["mkt"]["spend"] == pytest.approx(0.000018)
    status, body = await stack.admin.call("POST", "/key/generate", {"tags": ["a{b"]})
    assert (status, body["error"]["param"]) == (400, "tags[0]")


@pytest.mark.parametrize(
    ("tags", "body", "param"),
    [
        (",".join(f"t{i}" for i in range(MAX_REQUEST_TAGS + 1)), {}, "x-litellm-tags"),
        ("x" * 129, {}, "x-litellm-tags"),
        ("a{b}", {}, "x-litellm-tags"),
        ("x," * 2_500, {}, "x-litellm-tags"),
        (None, {"tags": "eng"}, "tags"),
        (None, {"tags": [1]}, "tags[0]"),
        (None, {"tags": ["bell\x07"]}, "tags[0]"),
        (None, {"metadata": {"tags": {"a": 1}}}, "metadata.tags"),
        (None, {"metadata": {"tags": [""]}}, "metadata.tags[0]"),
    ],
    ids=lambda value: str(value)[:24],
)
async def test_hostile_tags_are_a_400_naming_where_and_consume_nothing(
    stack: Stack, tags: str | None, body: dict, param: str
) -> None:
    await stack.admin.post("/tag/new", {"name": "eng", "rpm_limit": 1})
    key = await stack.key(rpm_limit=1)
    status, answer = await chat(stack, key, header=tags, **body)
    assert (status, answer["error"]["param"]) == (400, param), answer
    # the refused request took nothing: the key's and the tag's one request is still there
    assert (await chat(stack, key, header="eng"))[0] == 200


async def test_more_tag_entities_than_the_bound_is_a_400(stack: Stack) -> None:
    names = [f"cc{i}" for i in range(MAX_TAG_SCOPES + 1)]
    for name in names:
        await stack.admin.post("/tag/new", {"name": name})
    status, body = await chat(stack, header=",".join(names))
    assert (status, body["error"]["param"]) == (400, "tags")
    assert (await chat(stack, header=",".join(names[:MAX_TAG_SCOPES])))[0] == 200


async def test_spend_per_tag_matches_the_ledger(stack: Stack) -> None:
    key = await stack.key()
    assert (await chat(stack, key, header="eng"))[0] == 200  # a label, before the tag is made
    await stack.admin.post("/tag/new", {"name": "eng", "max_budget": 5, "budget_duration": "1d"})
    for tags in ("eng", "eng,adhoc", "adhoc", None):
        assert (await chat(stack, key, header=tags))[0] == 200
    logs = await stack.admin.get("/spend/logs")
    by_tag: dict[str, float] = {}
    for row in logs:
        for tag in row["request_tags"]:
            by_tag[tag] = by_tag.get(tag, 0.0) + row["spend"]
    info = (await stack.admin.post("/tag/info", {"names": ["eng"]}))["eng"]
    # lifetime spend counts the label's request too; the budget only those since it was made
    assert info["spend"] == pytest.approx(by_tag["eng"])
    first = logs[-1]["spend"]  # newest first: the label's request is the last row
    assert info["budget_windows"][0]["spend"] == pytest.approx(by_tag["eng"] - first)
    assert await check(stack.engine, stack.settings) == []
    spend_tags = {r["individual_request_tag"]: r for r in await stack.admin.get("/spend/tags")}
    assert spend_tags["eng"]["log_count"] == 3 and spend_tags["adhoc"]["log_count"] == 2
    assert spend_tags["adhoc"]["total_spend"] == pytest.approx(by_tag["adhoc"])
    listed = {t["name"]: t for t in await stack.admin.get("/tag/list")}
    assert listed["eng"]["spend"] == pytest.approx(by_tag["eng"])
    assert listed["adhoc"]["description"].startswith("This is just a spend tag")
    assert listed["adhoc"]["spend"] == pytest.approx(by_tag["adhoc"])
    # spend set on update, as LiteLLM's TagUpdateRequest.spend: 0 starts the tag again
    await stack.admin.post("/tag/update", {"name": "eng", "spend": 0})
    info = (await stack.admin.post("/tag/info", {"names": ["eng"]}))["eng"]
    assert info["spend"] == 0.0 and info["budget_windows"][0]["spend"] == 0.0


@pytest.fixture
async def rejecting(stack: Stack, redis_url: str) -> AsyncIterator[str]:
    """A second sidecar on the same Redis with reject_clientside_metadata_tags."""
    settings = dataclasses.replace(stack.settings, reject_clientside_metadata_tags=True)
    async with running_sidecar(settings, redis_url) as base:
        yield base


async def test_reject_clientside_metadata_tags_refuses_every_client_tag(
    stack: Stack, rejecting: str
) -> None:
    key = await stack.key(tags=["eng"])
    async with aiohttp.ClientSession() as session:
        for headers, body, param in [
            ({"x-litellm-tags": "a"}, {}, "x-litellm-tags"),
            ({}, {"tags": ["a"]}, "tags"),
            ({}, {"metadata": {"tags": ["a"]}}, "metadata.tags"),
        ]:
            async with session.post(
                f"{rejecting}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES, **body},
                headers={"Authorization": f"Bearer {key}", **headers},
            ) as response:
                answer = await response.json()
            assert response.status == 400
            assert answer["error"]["param"] == param
            assert answer["error"]["message"].startswith(f"Client-side '{param}' not allowed")
    client = openai.AsyncOpenAI(base_url=f"{rejecting}/v1", api_key=key, max_retries=0)
    async with client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    logs = await stack.admin.get("/spend/logs")
    assert [row["request_tags"] for row in logs] == [["eng"]]


@pytest.fixture
async def every_surface(ns: str, redis_url: str) -> AsyncIterator[tuple[str, Admin, FakeUpstream]]:
    """A sidecar serving an OpenAI-format and an Anthropic-format model, on a fake upstream."""
    fake = FakeUpstream(seed=5)
    async with running_upstream(fake) as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            default_max_tokens=16,
            models=(
                Deployment(
                    "gpt-4o",
                    "openai/gpt-4o",
                    api_base=upstream,
                    input_cost_per_token=1e-6,
                    output_cost_per_token=2e-6,
                ),
                Deployment(
                    "claude",
                    "anthropic/claude-haiku-4-5",
                    api_base=upstream,
                    input_cost_per_token=1e-6,
                    output_cost_per_token=2e-6,
                    index=1,
                ),
            ),
        )
        async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as s:
            yield base, Admin(s, base), fake


SURFACE_CALLS = [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hello"}),
    ("/v1/embeddings", {"model": "gpt-4o", "input": "hello"}),
    ("/v1/responses", {"model": "gpt-4o", "input": "hello", "max_output_tokens": 4}),
    ("/v1/messages", {"model": "claude", "messages": MESSAGES, "max_tokens": 4}),
]


async def test_every_surface_reads_the_tags_and_meets_the_tags_limits(
    every_surface: tuple[str, Admin, FakeUpstream],
) -> None:
    base, admin, fake = every_surface
    await admin.post("/tag/new", {"name": "eng", "rpm_limit": len(SURFACE_CALLS)})
    key = (await admin.post("/key/generate", {}))["key"]
    auth = {"Authorization": f"Bearer {key}"}
    ways = [
        ({"x-litellm-tags": "eng"}, {}),
        ({}, {"tags": ["eng"]}),
        ({}, {"metadata": {"tags": ["eng"], "user_id": "u-1"}}),
    ]
    for i, (path, body) in enumerate(SURFACE_CALLS):
        headers, extra = ways[i % len(ways)]
        async with admin.session.post(
            base + path, json={**body, **extra}, headers={**auth, **headers}
        ) as response:
            assert response.status == 200, (path, await response.text())
        assert "tags" not in fake.last_body and "tags" not in fake.last_body.get("metadata", {})
    # every surface counted in the tag's window: the next request of any is refused, in the
    # surface's own error form
    async with admin.session.post(
        base + "/v1/messages",
        json={**SURFACE_CALLS[-1][1]},
        headers={**auth, "x-litellm-tags": "eng"},
    ) as response:
        answer = await response.json()
    assert response.status == 429 and answer["type"] == "error"
    assert RATE.match(answer["error"]["message"])
    logs = await admin.get("/spend/logs")
    assert len(logs) == len(SURFACE_CALLS)
    assert all(row["request_tags"] == ["eng"] for row in logs)


async def test_only_an_admin_changes_a_keys_tags(stack: Stack) -> None:
    await stack.admin.post("/user/new", {"user_id": "ann", "user_role": "internal_user"})
    own = await stack.key(user_id="ann")
    tagged = await stack.key(user_id="ann", tags=["eng"], metadata={"tags": ["eng-meta"]})
    ann = Admin(stack.admin.session, stack.base, own)
    for body, param in [
        ({"tags": []}, "tags"),
        ({"metadata": {}}, "metadata.tags"),
        ({"metadata": {"tags": ["other"]}}, "metadata.tags"),
    ]:
        status, answer = await ann.call("POST", "/key/update", {"key": tagged, **body})
        assert (status, answer["error"]["param"]) == (403, param), answer
    # other metadata may change, its tags kept
    status, _ = await ann.call(
        "POST", "/key/update", {"key": tagged, "metadata": {"tags": ["eng-meta"], "note": "x"}}
    )
    assert status == 200


async def test_the_spend_report_groups_by_tag(stack: Stack) -> None:
    key = await stack.key()
    for header in ("eng,web", "eng", None):
        assert (await chat(stack, key, header=header))[0] == 200
    (day,) = await stack.admin.get("/global/spend/report", group_by="tag")
    rows = {row["tag"]: row for row in day["tags"]}
    assert set(rows) == {"eng", "web"}
    each = 0.000018  # 10 prompt and 4 completion tokens
    assert rows["eng"]["total_spend"] == pytest.approx(2 * each)
    assert rows["web"]["total_spend"] == pytest.approx(each)
    assert rows["eng"]["metadata"][0]["model"] == "gpt-4o"
    status, body = await stack.admin.call("GET", "/global/spend/report", group_by="colour")
    assert status == 400 and "tag" in body["error"]["message"]


async def test_a_tag_made_through_one_sidecar_is_a_scope_on_the_others_at_once(
    stack: Stack,
) -> None:
    """Another sidecar's set of tag entities, cached for a minute here, is invalidated by the
    change's message: a made-up tag stays free of Redis calls, a new one is seen at once."""
    watcher = Store(stack.engine.redis, prefix=stack.settings.key_prefix, cache_ttl_s=60)
    before = await _listeners(watcher)
    listening = asyncio.create_task(watcher.listen())
    try:
        async with asyncio.timeout(10):  # subscribed, so that what follows is the message's
            while await _listeners(watcher) == before:
                await asyncio.sleep(0.01)
        assert await watcher.known("tag") == frozenset()
        await stack.admin.post("/tag/new", {"name": "fresh"})
        async with asyncio.timeout(10):  # far below the cache's minute
            while "fresh" not in await watcher.known("tag"):
                await asyncio.sleep(0.01)
        await stack.admin.post("/tag/delete", {"name": "fresh"})
        async with asyncio.timeout(10):
            while "fresh" in await watcher.known("tag"):
                await asyncio.sleep(0.01)
    finally:
        listening.cancel()


async def _listeners(store: Store) -> int:
    ((_, count),) = await store.redis.pubsub_numsub(store.channel)
    return int(count)


async def test_tag_list_takes_litellms_date_window(stack: Stack) -> None:
    assert (await chat(stack, header="seen-today"))[0] == 200
    listed = await stack.admin.get("/tag/list", start_date="2000-01-01", end_date="2000-01-31")
    assert listed == []  # nothing was carried then
    assert [t["name"] for t in await stack.admin.get("/tag/list")] == ["seen-today"]
    status, body = await stack.admin.call("GET", "/tag/list", start_date="yesterday")
    assert (status, body["error"]["param"]) == (400, "start_date")
