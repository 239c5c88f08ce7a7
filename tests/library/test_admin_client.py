"""The async admin client against a running sidecar: every entity, spend, and the API's errors
as exceptions."""

from __future__ import annotations

import openai
import pytest

from ratelimiter.library.admin_client import (
    AdminClient,
    AuthenticationError,
    BadRequest,
    Conflict,
    NotFound,
)

from ..conftest import MASTER_KEY, MESSAGES, Stack


async def test_budgets_customers_keys_and_their_spend(stack: Stack, ns: str) -> None:
    async with AdminClient(stack.base, MASTER_KEY) as admin:
        await admin.new_budget(f"b-{ns}", max_budget=1, rpm_limit=100, budget_duration="monthly")
        assert (await admin.budget_info(f"b-{ns}"))[0]["max_budget"] == 1
        assert any(b["budget_id"] == f"b-{ns}" for b in await admin.list_budgets())
        await admin.update_budget(f"b-{ns}", max_budget=2)

        await admin.new_customer(f"c-{ns}", budget_id=f"b-{ns}")
        customer = await admin.customer_info(f"c-{ns}")
        assert customer.id == f"c-{ns}" and customer.fields["budget_id"] == f"b-{ns}"
        assert await admin.block_customers(f"c-{ns}") == [f"c-{ns}"]
        assert await admin.unblock_customers(f"c-{ns}") == [f"c-{ns}"]

        team = await admin.new_team(f"t-{ns}", max_budget=10)
        assert team["team_id"] == f"t-{ns}"
        user = await admin.new_user(f"u-{ns}", max_budget=3)
        assert user.key.startswith("sk-") and user.fields["user_id"] == f"u-{ns}"
        await admin.add_team_member(f"t-{ns}", f"u-{ns}", max_budget_in_team=1)
        assert (await admin.team_info(f"t-{ns}")).fields["members"][0]["user_id"] == f"u-{ns}"

        key = await admin.generate_key(
            max_budget=0.5, budget_duration="daily", user_id=f"u-{ns}", team_id=f"t-{ns}"
        )
        assert key.key.startswith("sk-") and len(key.token) == 64
        await stack.client(key.key).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=4
        )
        info = await admin.key_info(key.key)
        spent = 10 * 1e-6 + 4 * 2e-6
        assert info.id == key.token and info.spend == pytest.approx(spent)
        (window,) = info.budget_windows
        assert window.budget_duration == "1d" and window.max_budget == 0.5
        assert window.remaining == pytest.approx(0.5 - spent) and window.budget_reset_at
        assert (await admin.user_info(f"u-{ns}")).spend == pytest.approx(spent)

        logs = await admin.spend_logs(api_key=key.key)
        assert len(logs) == 1 and logs[0]["spend"] == pytest.approx(spent)
        assert key.token in await admin.list_keys()
        await admin.update_key(key.key, rpm_limit=5)
        assert (await admin.key_info(key.token)).fields["rpm_limit"] == 5
        await admin.block_key(key.key)
        with pytest.raises(openai.PermissionDeniedError):
            await stack.client(key.key).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=4
            )
        await admin.unblock_key(key.key)
        assert await admin.delete_keys(key.key) == [key.key]
        await admin.remove_team_member(f"t-{ns}", f"u-{ns}")
        assert await admin.delete_teams(f"t-{ns}") == [f"t-{ns}"]
        assert await admin.delete_users(f"u-{ns}") == [f"u-{ns}"]
        assert await admin.delete_customers(f"c-{ns}") == [f"c-{ns}"]
        assert await admin.delete_budget(f"b-{ns}") == [f"b-{ns}"]
        assert (await admin.global_spend())["spend"] >= spent


async def test_errors_are_exceptions_with_the_apis_message(stack: Stack, ns: str) -> None:
    async with AdminClient(stack.base, "sk-not-the-master-key-at-all") as intruder:
        with pytest.raises(AuthenticationError, match="401"):
            await intruder.list_keys()
    async with AdminClient(stack.base, MASTER_KEY) as admin:
        with pytest.raises(NotFound, match="not found") as missing:
            await admin.key_info("sk-no-such-key")
        assert missing.value.status == 404
        await admin.new_budget(f"dup-{ns}", max_budget=1)
        with pytest.raises(Conflict):
            await admin.new_budget(f"dup-{ns}", max_budget=1)
        with pytest.raises(BadRequest) as bad:
            await admin.generate_key(budget_duration="fortnightly")
        assert bad.value.param == "budget_duration" and "fortnightly" in bad.value.message


def test_fields_a_newer_sidecar_adds_are_ignored() -> None:
    from ratelimiter.library.admin_client import _info

    window = {
        "budget_duration": "1d",
        "max_budget": 1.0,
        "spend": 0.5,
        "remaining": 0.5,
        "budget_reset_at": None,
        "held": 0.1,
    }
    info = _info("k", {"spend": 0.5, "budget_windows": [window]})
    assert info.budget_windows[0].spend == 0.5
