"""Shadow mode in the admin UI: which entities and limits are in shadow (a badge on the Keys,
Users, Teams and Budgets pages, fields in their dialogs), and the would-be 429s of shadow
limits beside the real ones on the Spend page's live panel, summed over sidecars."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from ..conftest import MASTER_KEY, one_model, running_sidecar, running_upstream
from .test_ui import (  # noqa: F401 (fixtures)
    assert_layout,
    needs_chromium,
    open_page,
    page,
    playwright_api,
    shot,
    sidecar,
    sign_in,
)

ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body, headers=ADMIN) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def chat(session: aiohttp.ClientSession, base: str, key: str, model: str) -> str | None:
    async with session.post(
        f"{base}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200
        return response.headers.get("x-ratelimit-shadow-refused")


@needs_chromium
async def test_shadow_limits_and_their_would_be_refusals_are_shown(
    sidecar: str,  # noqa: F811
    page: object,  # noqa: F811
) -> None:
    p = page
    async with aiohttp.ClientSession() as session:
        key = (
            await post(
                session,
                f"{sidecar}/key/generate",
                {"key_alias": "trial", "rpm_limit": 1, "shadow_limits": ["rpm_limit"]},
            )
        )["key"]
        await post(session, f"{sidecar}/team/new", {"team_id": "canary", "shadow_mode": True})
        would = [await chat(session, sidecar, key, "gpt-4o") for _ in range(3)]
    assert would == [None, "key:requests", "key:requests"]
    await sign_in(p, sidecar)
    await open_page(p, sidecar, "keys")
    row = p.locator("#page tr", has_text="trial")  # type: ignore[attr-defined]
    cell = row.locator("td[data-label=Shadow]")
    await playwright_api.expect(cell).to_have_text("shadow: rpm_limit2 would-be 429s today")
    await assert_layout(p, "keys with a shadow column")
    await shot(p, "keys-shadow")
    # Enforced again from the Edit dialog: the badge says so.
    await row.locator("text=Edit").click()
    await p.fill("#field-shadow_limits", "")  # type: ignore[attr-defined]
    await p.select_option("#field-shadow_mode", "false")  # type: ignore[attr-defined]
    await p.keyboard.press("Enter")  # type: ignore[attr-defined]
    # today's would-be refusals stay in view once it is enforced
    await playwright_api.expect(cell).to_have_text("enforced2 would-be 429s today")
    await open_page(p, sidecar, "teams")
    team = p.locator("#page tr", has_text="canary")  # type: ignore[attr-defined]
    await playwright_api.expect(team.locator("td[data-label=Shadow]")).to_have_text(
        "shadow: all limits"
    )
    await assert_layout(p, "teams with a shadow column")
    await open_page(p, sidecar, "spend")
    panel = p.locator("#live-shadow-429")  # type: ignore[attr-defined]
    await playwright_api.expect(panel).to_contain_text("window_full (key): 2", timeout=10_000)
    await assert_layout(p, "spend with shadow refusals")
    await shot(p, "spend-shadow")


async def test_live_shadow_refusals_are_summed_over_sidecars(ns: str, redis_url: str) -> None:
    async with running_upstream() as upstream:
        settings = one_model(ns, upstream)
        async with (
            running_sidecar(settings, redis_url) as one,
            running_sidecar(settings, redis_url) as two,
            aiohttp.ClientSession() as session,
        ):
            body = {"rpm_limit": 2, "shadow_mode": True}
            key = (await post(session, f"{one}/key/generate", body))["key"]
            would = [await chat(session, base, key, "m") for base in (one, two, one, two, one)]
            assert would == [None, None, "key:requests", "key:requests", "key:requests"]
            for _ in range(50):
                async with session.get(f"{two}/ui/api/live", headers=ADMIN) as response:
                    live = await response.json()
                if live["sidecars"] == 2 and sum(live["shadow_refused"].values()) == 3:
                    break
                await asyncio.sleep(0.1)
            assert live["shadow_refused"] == {"window_full (key)": 3}, live
            assert live["recent_shadow_refused"] == {"window_full (key)": 3}, live
            assert live["refused"] == {}, live  # nobody was refused
            async with session.get(f"{one}/ui/api/shadow") as response:
                assert response.status == 401  # the report needs the master key
