"""The admin UI in a real headless Chromium (Debian's package, driven by Playwright) against a
real sidecar: sign in, create a budget through the dialog, see a duplicate refused beside its
field, create a key on that budget, send traffic, see the spend. Screenshots of every page go
to tests/artifacts/ui/."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ratelimiter.gateway.config import Deployment, Settings

from ..conftest import MASTER_KEY, one_model, running_sidecar, running_upstream

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
STATIC = Path(__file__).resolve().parents[2] / "ratelimiter" / "gateway" / "static"

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install Debian's package with apt-get install chromium"
)


@pytest.fixture
async def sidecar(ns: str, redis_url: str) -> AsyncIterator[str]:
    async with running_upstream() as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            models=(
                Deployment(
                    "gpt-4o",
                    "openai/gpt-4o",
                    api_base=upstream,
                    input_cost_per_token=1e-6,
                    output_cost_per_token=2e-6,
                    access_groups=("general",),
                ),
            ),
        )
        async with running_sidecar(settings, redis_url) as base:
            yield base


@pytest.fixture
async def page() -> AsyncIterator[object]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = await browser.new_context(viewport={"width": 1280, "height": 860})
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # The browser logs the API's refusals the test provokes (wrong key, duplicate id) as
        # failed loads; the page handles them. Anything else is a fault.
        page.on(
            "console",
            lambda m: (
                m.type == "error"
                and "responded with a status of 4" not in m.text
                and errors.append(m.text)
            ),
        )
        page.on("dialog", lambda d: d.accept())  # the confirm() before a delete or block
        yield page
        await browser.close()
        assert not errors, errors  # no script error, no CSP violation


async def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


@needs_chromium
async def test_budget_key_traffic_and_spend(sidecar: str, page: object, ns: str) -> None:
    p = page  # a Playwright Page
    await p.goto(f"{sidecar}/ui")  # type: ignore[attr-defined]
    await p.fill("#master-key", "sk-wrong-key-0000000000")
    await p.click("#sign-in-form button")
    await playwright_api.expect(p.locator("#sign-in-error")).to_have_text(
        "That is not the master key."
    )
    await p.fill("#master-key", MASTER_KEY)
    await p.keyboard.press("Enter")
    await playwright_api.expect(p.locator("#nav")).to_be_visible()
    assert await p.evaluate("sessionStorage.length") == 1  # held for this tab only

    # A budget, through the dialog, by keyboard where a user would use it.
    budget = f"starter-{ns}"
    await p.click("#create-budget")
    dialog = p.locator("#dialog")
    await playwright_api.expect(dialog).to_be_visible()
    assert await p.evaluate("document.activeElement.id") == "field-budget_id"
    await p.keyboard.type(budget)
    await p.fill("#field-max_budget", "5")
    await p.fill("#field-soft_budget", "4")
    await p.fill("#field-tpm_limit", "100000")
    await p.fill("#field-rpm_limit", "100")
    await p.fill("#field-max_parallel_requests", "4")
    await p.select_option("#field-budget_duration", "monthly")
    await shot(p, "budget-dialog")
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(dialog).to_be_hidden()
    row = p.locator("tr", has_text=budget)
    await playwright_api.expect(row).to_contain_text("$5.00")
    await playwright_api.expect(row).to_contain_text("monthly")
    await playwright_api.expect(row).to_contain_text("0 keys, 0 customers")
    await shot(p, "budgets")

    # The same id again: the API's refusal is shown beside the field, and Escape closes.
    await p.click("#create-budget")
    await p.fill("#field-budget_id", budget)
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(p.locator("#field-budget_id-error")).to_contain_text(
        "already exists"
    )
    assert await p.get_attribute("#field-budget_id", "aria-invalid") == "true"
    await shot(p, "budget-duplicate")
    await p.keyboard.press("Escape")
    await playwright_api.expect(dialog).to_be_hidden()

    # A key on that budget, shown once.
    await p.click("text=Keys")
    await p.click("#create-key")
    await p.fill("#field-key_alias", "ann")
    await p.select_option("#field-budget_id", budget)
    await p.click("#dialog button[type=submit]")
    key = (await p.text_content("#new-key")) or ""
    assert re.fullmatch(r"sk-\S{20,}", key), key
    await shot(p, "key-shown-once")
    await p.click("#copy-key")
    await playwright_api.expect(p.locator("#dialog [role=status]")).not_to_be_empty()
    await p.click("text=Done")
    key_row = p.locator("tr", has_text="ann")
    await playwright_api.expect(key_row).to_contain_text(budget)
    await key_row.locator("text=Edit").click()
    assert await p.input_value("#field-budget_id") == budget  # the dialog shows what is set
    await p.fill("#field-rpm_limit", "7")
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(key_row).to_contain_text("7 / — / —")

    # Traffic through the proxy, then the spend where people look for it.
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                f"{sidecar}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                assert response.status == 200
    await p.click("text=Budgets")
    await playwright_api.expect(p.locator("tr", has_text=budget)).to_contain_text("1 keys")
    await p.click("text=Keys")
    await playwright_api.expect(p.locator("tr", has_text="ann")).to_contain_text(
        "of $5.00 / monthly"
    )
    await shot(p, "keys")
    await p.click("text=Spend")
    await playwright_api.expect(p.locator("#total-spend")).not_to_have_text("$0.000000")
    await playwright_api.expect(p.locator("section.card", has_text="Top models")).to_contain_text(
        "gpt-4o"
    )
    await playwright_api.expect(p.locator("svg.chart rect.bar")).to_have_count(30)
    await playwright_api.expect(p.locator("#live-rps")).to_have_text(re.compile(r"/s$"))
    await shot(p, "spend")
    for name in ("users", "teams", "customers", "models"):
        await p.click(f"#nav >> text={name.title()}")
        await playwright_api.expect(p.locator("#page h1")).to_have_text(name.title())
        await shot(p, name)
    await playwright_api.expect(p.locator("tr", has_text="openai/gpt-4o")).to_contain_text(
        "general"
    )


@needs_chromium
async def test_phone_width_and_keyboard(sidecar: str, page: object) -> None:
    p = page
    await p.set_viewport_size({"width": 390, "height": 800})  # type: ignore[attr-defined]
    await p.goto(f"{sidecar}/ui/")
    await p.fill("#master-key", MASTER_KEY)
    await p.keyboard.press("Enter")
    await playwright_api.expect(p.locator("#nav")).to_be_visible()
    for name in ("budgets", "keys", "spend"):
        await p.goto(f"{sidecar}/ui/#/{name}")
        await playwright_api.expect(p.locator("#page h1")).to_be_visible()
        # Wide tables scroll inside their card; the page itself never scrolls sideways.
        assert await p.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        await shot(p, f"phone-{name}")
    # By keyboard from the top of a fresh page: the skip link first, then the sections.
    await p.reload()
    await playwright_api.expect(p.locator("#page h1")).to_have_text("Spend")
    await p.keyboard.press("Tab")
    assert await p.evaluate("document.activeElement.textContent") == "Skip to content"
    await p.keyboard.press("Tab")
    assert await p.evaluate("document.activeElement.textContent") == "Budgets"
    await p.keyboard.press("Enter")
    await playwright_api.expect(p.locator("#page h1")).to_have_text("Budgets")


async def test_the_ui_loads_nothing_from_elsewhere(sidecar: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sidecar}/ui/") as response:
            assert response.status == 200
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        async with session.get(f"{sidecar}/ui/api/budgets") as response:
            assert response.status == 401  # the data needs the master key
        async with session.get(f"{sidecar}/ui/static/nothing.js") as response:
            assert response.status == 404
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (path.name, urls)


async def test_live_counts_are_summed_over_sidecars(ns: str, redis_url: str) -> None:
    """Behind a load balancer the page's polls reach any sidecar; each answers with the sum."""
    async with running_upstream() as upstream:
        settings = one_model(ns, upstream)
        async with (
            running_sidecar(settings, redis_url) as one,
            running_sidecar(settings, redis_url) as two,
            aiohttp.ClientSession() as session,
        ):
            admin = {"Authorization": f"Bearer {MASTER_KEY}"}
            async with session.post(
                f"{one}/key/generate", json={"rpm_limit": 3}, headers=admin
            ) as r:
                key = (await r.json())["key"]
            for base in (one, two, one, two, one):  # 3 admitted, 2 refused
                async with session.post(
                    f"{base}/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {key}"},
                ) as r:
                    await r.read()
            for _ in range(50):
                async with session.get(f"{two}/ui/api/live", headers=admin) as r:
                    live = await r.json()
                if live["requests"] == 5:
                    break
                await asyncio.sleep(0.1)
            assert live["sidecars"] == 2 and live["requests"] == 5, live
            assert live["refused"] == {"window_full (key)": 2}, live
