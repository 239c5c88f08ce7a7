"""Refusals worded as LiteLLM words them, read with the regular expressions its users match
them with, through the sidecar and the official openai client."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import openai
import orjson
import pytest
from aiohttp import web

from ratelimiter.engine import Decision, LimitState
from ratelimiter.engine.limits import Budget, Concurrency, SlidingWindow
from ratelimiter.gateway.store import hash_key
from ratelimiter.pricing import nano
from ratelimiter.responses import refusal

from ..conftest import MESSAGES, Stack

# As LiteLLM users match them: a budget's figures (after checking for the prefix)...
BUDGET = "Budget has been exceeded!"
CURRENT_COST = re.compile(r"Current cost: ([\d.]+)")
MAX_BUDGET = re.compile(r"Max budget: ([\d.]+)")
# ...a rate limit's scope, kind and limit...
RATE_LIMIT = re.compile(r"Rate limit exceeded for (\w+):.+Limit type: (\w+).+Current limit: (\d+)")
# ...and LiteLLM's whole rate-limit sentence, field by field.
RATE_SENTENCE = re.compile(
    r"^Rate limit exceeded for (\w+): (\S+)\. Limit type: (\w+)\. "
    r"Current limit: (\d+), Remaining: (\d+)\. "
    r"Limit resets at: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC"
)
MODEL_DENIED = re.compile(
    r"^(\w+) not allowed to access model\. This \1 can only access models=\[(.*)\]\. "
    r"Tried to access (\S+)"
)


async def refused(client: openai.AsyncOpenAI, **fields: object) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **fields)  # type: ignore[call-overload]
    return raised.value


def budget_figures(message: str) -> tuple[float, float]:
    assert message.startswith(BUDGET)
    current, maximum = CURRENT_COST.search(message), MAX_BUDGET.search(message)
    assert current is not None and maximum is not None
    return float(current.group(1)), float(maximum.group(1))


async def test_a_key_budget_says_whose_it_is_what_was_spent_and_when_it_resets(
    stack: Stack,
) -> None:
    key = await stack.key(max_budget=0.00003, budget_duration="1d")
    client = stack.client(key, retries=2)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    error = await refused(client, max_tokens=4)
    body = error.response.json()["error"]
    assert (error.status_code, body["type"]) == (429, "budget_exceeded")
    assert error.response.headers["x-should-retry"] == "false"
    message = body["message"]
    assert message.startswith(f"{BUDGET} Key={hash_key(key)} Current cost: ")
    assert budget_figures(message) == (pytest.approx(10e-6 + 4 * 2e-6), 0.00003)
    assert "the key budget of $0.00003 per 1d resets at 20" in message
    assert re.search(r"; this request could cost up to \$0\.0000\d+\) ", message)
    # $0.000012 is left, less than the 17-token prompt's $0.000017
    assert message.endswith("Nothing fits now: what is left does not cover even the prompt.")
    assert 0 < int(error.response.headers["retry-after"]) <= 86_400


async def test_a_budget_without_a_duration_never_resets_and_sends_no_retry_after(
    stack: Stack,
) -> None:
    client = stack.client(await stack.key(max_budget=0.00003))
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    error = await refused(client, max_tokens=4)
    message = error.response.json()["error"]["message"]
    assert budget_figures(message) == (pytest.approx(0.000018), 0.00003)
    assert "the key budget of $0.00003 never resets" in message
    assert "100y" not in message and "resets at" not in message
    headers = error.response.headers
    assert "retry-after" not in headers and "retry-after-ms" not in headers
    assert headers["x-should-retry"] == "false"


async def test_team_user_and_end_user_budgets_name_their_scope(stack: Stack) -> None:
    team = (await stack.admin.post("/team/new", {"max_budget": 0}))["team_id"]
    await stack.admin.post("/user/new", {"user_id": "ana", "max_budget": 0})
    await stack.admin.post("/customer/new", {"user_id": "cust-1", "max_budget": 0})
    cases = [
        (await stack.key(team_id=team), {}, f"Team={team} "),
        (await stack.key(user_id="ana"), {}, "User=ana "),
        (await stack.key(), {"user": "cust-1"}, "End User=cust-1 "),
    ]
    for key, fields, owner in cases:
        message = (await refused(stack.client(key), **fields)).response.json()["error"]["message"]
        assert message.startswith(f"{BUDGET} {owner}Current cost: 0.0, Max budget: 0.0 (")
        assert budget_figures(message) == (0.0, 0.0)


async def test_a_team_members_budget_names_the_user_in_the_team(stack: Stack) -> None:
    team = (await stack.admin.post("/team/new", {}))["team_id"]
    await stack.admin.post("/user/new", {"user_id": "bo"})
    member = {"team_id": team, "member": {"user_id": "bo", "role": "user"}}
    await stack.admin.post("/team/member_add", {**member, "max_budget_in_team": 0})
    key = await stack.key(user_id="bo", team_id=team)
    message = (await refused(stack.client(key))).response.json()["error"]["message"]
    assert message.startswith(f"{BUDGET} User=bo in Team={team} Current cost: 0.0, ")


async def test_rate_limits_read_as_litellms(stack: Stack) -> None:
    key = await stack.key(rpm_limit=1, model_rpm_limit={"gpt-4o": 5})
    client = stack.client(key)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    error = await refused(client)
    body = error.response.json()["error"]
    assert (error.status_code, body["type"], body["code"]) == (
        429,
        "requests",
        "rate_limit_exceeded",
    )
    match = RATE_SENTENCE.match(body["message"])
    assert match is not None, body["message"]
    assert match.groups()[:5] == ("api_key", hash_key(key), "requests", "1", "0")
    resets = datetime.strptime(match.group(6), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert 58 <= (resets - datetime.now(UTC)).total_seconds() <= 62
    assert body["message"].endswith(
        "The key allows 1 request per minute; retry in "
        + (f"{int(error.response.headers['retry-after-ms']) / 1000:.1f}s.")
    )
    assert error.response.headers["rate_limit_type"] == "requests"
    assert 59 <= int(error.response.headers["retry-after"]) <= 61


@pytest.mark.parametrize(
    ("fields", "scope", "kind", "limit"),
    [
        ({"tpm_limit": 30}, "api_key", "tokens", "30"),
        ({"model_rpm_limit": {"gpt-4o": 1}}, "model_per_key", "requests", "1"),
        ({"model_tpm_limit": {"gpt-4o": 30}}, "model_per_key", "tokens", "30"),
    ],
)
async def test_each_kind_and_scope_of_rate_limit(
    stack: Stack, fields: dict[str, object], scope: str, kind: str, limit: str
) -> None:
    key = await stack.key(**fields)
    client = stack.client(key)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    # bounded, so held in full: a request without max_tokens would take what is left
    message = (await refused(client, max_tokens=16)).response.json()["error"]["message"]
    match = RATE_LIMIT.search(message)
    assert match is not None and match.groups() == (scope, kind, limit), message
    suffix = ":gpt-4o" if scope == "model_per_key" else ""
    assert f"for {scope}: {hash_key(key)}{suffix}. " in message


async def test_max_parallel_requests_reads_as_litellms(stack: Stack) -> None:
    client = stack.client(await stack.key(max_parallel_requests=1))
    stack.fake.chunk_delay_ms = 20
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=20, stream=True
    )
    error = await refused(client)
    match = RATE_LIMIT.search(error.response.json()["error"]["message"])
    assert match is not None and match.groups() == ("api_key", "max_parallel_requests", "1")
    assert "allows 1 request in parallel" in error.response.json()["error"]["message"]
    assert [c async for c in stream]


async def test_model_access_denial_is_litellms_403(stack: Stack) -> None:
    key = await stack.key(models=["embed", "openai/*-mini"])
    with pytest.raises(openai.PermissionDeniedError) as raised:
        await stack.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    error = raised.value.response.json()["error"]
    match = MODEL_DENIED.match(error["message"])
    assert match is not None, error["message"]
    assert match.groups() == ("key", "'embed', 'openai/*-mini'", "gpt-4o")
    assert (error["param"], raised.value.status_code) == ("model", 403)
    assert error["type"] == "key_model_access_denied"
    team = (await stack.admin.post("/team/new", {"models": ["embed"]}))["team_id"]
    with pytest.raises(
        openai.PermissionDeniedError, match=r"403 - team not allowed to access model\. This team"
    ):
        await stack.client(await stack.key(team_id=team)).chat.completions.create(
            model="gpt-4o", messages=MESSAGES
        )


def decision(
    limit: Budget | SlidingWindow | Concurrency, state: LimitState, retry: int | None
) -> Decision:
    return Decision(False, "req-1", (state,), refused=limit, reason="full", retry_after_ms=retry)


def test_a_request_that_can_never_fit_says_so_and_sends_no_retry_after() -> None:
    tokens = SlidingWindow("p{key:abc}:tpm", 100, "1m", 400, measure="tokens", name="key:tokens")
    response = refusal(decision(tokens, LimitState(tokens, 100, 0), None), "req-1")
    message = message_of(response)
    assert RATE_LIMIT.search(message) is not None
    assert message.endswith(
        "The key allows 100 tokens per minute; this request needs 400 tokens, so it cannot succeed."
    )
    assert "retry-after" not in response.headers and response.headers["x-should-retry"] == "false"
    budget = Budget("p{team:t1}:spend:1mo", nano(2), "1mo", nano(3), name="team:budget")
    response = refusal(decision(budget, LimitState(budget, nano(2), 5_000), None), "req-2")
    message = message_of(response)
    assert message.startswith(f"{BUDGET} Team=t1 Current cost: 0.0, Max budget: 2.0 (")
    assert "could cost up to $3.0, more than the whole budget, so it cannot succeed" in message


def test_the_proxy_wide_budget_names_no_one() -> None:
    budget = Budget("p{proxy:all}:spend:1d", nano(10), "1d", nano(1), name="proxy:budget")
    message = message_of(refusal(decision(budget, LimitState(budget, 0, 60_000), 60_000), "r"))
    assert message.startswith(f"{BUDGET} Current cost: 10.0, Max budget: 10.0 (the proxy ")


def test_a_never_resetting_budget_given_in_any_unit_hides_its_decades() -> None:
    for period in ("100y", "1200mo", "36525d", "3155760000s"):
        budget = Budget("p{user:u}:spend", nano(1), period, nano(1), name="user:budget")
        forty_three_years = 43 * 365 * 86_400_000
        state = LimitState(budget, 0, forty_three_years)
        response = refusal(decision(budget, state, forty_three_years), "req-1")
        message = message_of(response)
        assert budget_figures(message) == (1.0, 1.0)
        assert "never resets" in message and "resets at" not in message, message
        assert "retry-after" not in response.headers


def message_of(response: web.Response) -> str:
    assert isinstance(response.body, bytes)
    return orjson.loads(response.body)["error"]["message"]


async def test_a_bounded_refusal_names_the_largest_max_tokens_that_fits(stack: Stack) -> None:
    """DESIGN: a refusal says the largest max_tokens that would fit now."""
    client = stack.client(await stack.key(tpm_limit=30))
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    # 14 used, 16 left; the prompt is estimated at 17 tokens: nothing fits
    message = (await refused(client, max_tokens=16)).response.json()["error"]["message"]
    assert message.endswith("Nothing fits now: what is left does not cover even the prompt.")
    roomy = stack.client(await stack.key(tpm_limit=40))
    error = await refused(roomy, max_tokens=30)  # 17 + 30 > 40: 23 would fit
    assert error.response.json()["error"]["message"].endswith(
        "The largest max_tokens that fits now is 23."
    )
    await roomy.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=23)
