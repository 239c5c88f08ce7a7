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
from ratelimiter.gateway.priority import PriorityReservation

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


PREVIEW = re.compile(r"^sk-\.\.\.[A-Za-z0-9_-]{4}$")  # LiteLLM's key_name
SMALLEST_TEXT_PX = 12
PAGES = ("budgets", "keys", "users", "teams", "customers", "tags", "models", "spend")

# Everything shown in the header, the page and an open dialog: inside the viewport and inside
# its card (a button scrolled out of a table's card is cut off), no table container scrolling
# sideways, and no text under SMALLEST_TEXT_PX as rendered (SVG text scaled by its viewBox
# counts at the size it is drawn).
LAYOUT_PROBLEMS = """(smallest) => {
  const problems = [];
  const root = document.documentElement, vw = root.clientWidth;
  if (root.scrollWidth > vw) {
    problems.push(`the page scrolls sideways: ${root.scrollWidth} > ${vw}`);
  }
  for (const wrap of document.querySelectorAll(".table-wrap")) {
    if (wrap.scrollWidth > wrap.clientWidth) {
      problems.push(`a table scrolls sideways: ${wrap.scrollWidth} > ${wrap.clientWidth}`);
    }
  }
  const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "")
    + ` "${(e.textContent || "").trim().slice(0, 30)}"`;
  for (const top of document.querySelectorAll("header.top, main, dialog[open]")) {
    for (const e of [top, ...top.querySelectorAll("*")]) {
      if (["title", "option"].includes(e.tagName.toLowerCase()) || e.closest(".sr-only")) continue;
      if (!e.getClientRects().length || getComputedStyle(e).visibility === "hidden") continue;
      const r = e.getBoundingClientRect();
      if (!r.width && !r.height) continue;
      if (r.left < -0.5 || r.right > vw + 0.5) {
        problems.push(`${name(e)} is outside the viewport: ${r.left}..${r.right} of ${vw}`);
      }
      const card = e.parentElement && e.parentElement.closest(".card, dialog");
      const c = card && card.getBoundingClientRect();
      if (c && (r.left < c.left - 0.5 || r.right > c.right + 0.5)) {
        problems.push(
          `${name(e)} is outside its card: ${r.left}..${r.right} of ${c.left}..${c.right}`);
      }
      if ([...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) {
        let px = parseFloat(getComputedStyle(e).fontSize);
        if (e instanceof SVGElement) px *= e.getScreenCTM().a;
        if (px < smallest - 0.01) problems.push(`${name(e)} is ${px.toFixed(1)} px text`);
      }
    }
  }
  return problems;
}"""


async def assert_layout(page: object, where: str) -> None:
    problems = await page.evaluate(LAYOUT_PROBLEMS, SMALLEST_TEXT_PX)  # type: ignore[attr-defined]
    assert not problems, (where, problems[:10])


async def sign_in(p: object, base: str) -> None:
    await p.goto(f"{base}/ui/")  # type: ignore[attr-defined]
    # Nothing but the sign-in form before signing in: the links would lead nowhere.
    await playwright_api.expect(p.locator("#nav")).to_be_hidden()  # type: ignore[attr-defined]
    await playwright_api.expect(p.locator("#nav a").first).to_be_hidden()  # type: ignore[attr-defined]
    await assert_layout(p, "sign-in")
    await p.fill("#master-key", MASTER_KEY)  # type: ignore[attr-defined]
    await p.keyboard.press("Enter")  # type: ignore[attr-defined]
    await playwright_api.expect(p.locator("#nav")).to_be_visible()  # type: ignore[attr-defined]


async def open_page(p: object, base: str, name: str) -> None:
    await p.goto(f"{base}/ui/#/{name}")  # type: ignore[attr-defined]
    await playwright_api.expect(p.locator("#page h1")).to_have_text(name.title())  # type: ignore[attr-defined]


async def traffic(base: str, key: str, n: int = 1, tags: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    if tags is not None:
        headers["x-litellm-tags"] = tags
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.post(
                f"{base}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers=headers,
            ) as response:
                assert response.status == 200


@needs_chromium
async def test_budget_key_traffic_and_spend(sidecar: str, page: object, ns: str) -> None:
    p = page  # a Playwright Page
    await p.goto(f"{sidecar}/ui")  # type: ignore[attr-defined]
    await playwright_api.expect(p.locator("#nav")).to_be_hidden()
    await p.fill("#master-key", "sk-wrong-key-0000000000")
    await p.click("#sign-in-form button")
    await playwright_api.expect(p.locator("#sign-in-error")).to_have_text(
        "That is not the master key."
    )
    await playwright_api.expect(p.locator("#nav")).to_be_hidden()
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

    # Editing: the id cannot change, so it is text that neither looks editable nor takes the
    # focus, by click, by script or by Tab.
    await row.locator("text=Edit").click()
    await playwright_api.expect(dialog).to_be_visible()
    budget_id = p.locator("#field-budget_id")
    await playwright_api.expect(budget_id).to_have_text(budget)
    assert await p.evaluate("document.activeElement.id") == "field-max_budget"
    assert await budget_id.evaluate(
        "e => { e.focus(); return document.activeElement !== e && e.tabIndex < 0 "
        "&& !e.matches('input, select, textarea, [contenteditable]') }"
    )
    await budget_id.click()
    assert await p.evaluate("document.activeElement.id") != "field-budget_id"
    seen = []
    for _ in range(12):
        await p.keyboard.press("Tab")
        seen.append(await p.evaluate("document.activeElement.id"))
    assert "field-budget_id" not in seen, seen
    await shot(p, "budget-edit")
    await p.fill("#field-max_budget", "6")
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(dialog).to_be_hidden()
    await playwright_api.expect(row).to_contain_text("$6.00")

    # A key on that budget, shown once, then listed by its preview, never by its hash.
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
    preview = await key_row.locator("td[data-label=Key] code").text_content() or ""
    assert PREVIEW.fullmatch(preview) and preview == f"sk-...{key[-4:]}", preview
    await key_row.locator("text=Edit").click()
    assert await p.input_value("#field-budget_id") == budget  # the dialog shows what is set
    await p.fill("#field-rpm_limit", "7")
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(key_row).to_contain_text("7 / — / —")

    # A key with no budget and no alias: its spend is shown all the same.
    await p.click("#create-key")
    await p.click("#dialog button[type=submit]")
    bare = (await p.text_content("#new-key")) or ""
    await p.click("text=Done")

    # Traffic through the proxy, then the spend where people look for it.
    await traffic(sidecar, key, 3)
    await traffic(sidecar, bare, 2)
    await p.click("text=Budgets")
    await playwright_api.expect(p.locator("tr", has_text=budget)).to_contain_text(
        "1 key, 0 customers"
    )
    await p.click("text=Keys")
    await playwright_api.expect(p.locator("tr", has_text="ann")).to_contain_text(
        "of $6.00 / monthly"
    )
    bare_row = p.locator("#page tr", has_text=f"sk-...{bare[-4:]}")
    await playwright_api.expect(bare_row).to_have_count(1)
    spend_cell = bare_row.locator("td[data-label=Spend]")
    await playwright_api.expect(spend_cell).to_have_text(re.compile(r"^\$0\.0*[1-9]"))
    await shot(p, "keys")

    # A key made before previews existed has no key_name: its hash is shown marked as one.
    async def without_preview(route: object) -> None:
        response = await route.fetch()  # type: ignore[attr-defined]
        body = await response.json()
        body["info"].pop("key_name", None)
        await route.fulfill(response=response, json=body)  # type: ignore[attr-defined]

    await p.route("**/key/info?*", without_preview)
    await p.reload()
    await playwright_api.expect(key_row.locator("td[data-label=Key]")).to_have_text(
        re.compile(r"^annsha256 [0-9a-f]{8}…$")
    )
    await p.unroute("**/key/info?*")

    await p.click("text=Spend")
    await playwright_api.expect(p.locator("#page h1")).to_have_text("Spend")
    # The live panel is complete the moment the page shows: no placeholder, a minute of
    # history across the panel's width.
    assert re.fullmatch(r"\d+\.\d /s", await p.text_content("#live-rps") or ""), (
        await p.text_content("#live-rps")
    )
    spark = await p.evaluate(
        """() => {
          const s = document.getElementById("live-spark"), line = s.querySelector("polyline");
          const panel = s.parentElement, style = getComputedStyle(panel);
          const inner = panel.clientWidth - parseFloat(style.paddingLeft)
            - parseFloat(style.paddingRight);
          return { width: s.getBoundingClientRect().width, height: s.getBoundingClientRect().height,
                   line: line ? line.getBoundingClientRect().width : 0, inner,
                   points: line ? line.points.length : 0 };
        }"""
    )
    assert spark["points"] == 60, spark
    assert spark["width"] >= 0.98 * spark["inner"] and spark["height"] >= 60, spark
    assert spark["line"] >= 0.95 * spark["inner"], spark
    await playwright_api.expect(p.locator("#total-spend")).not_to_have_text("$0.000000")
    await playwright_api.expect(p.locator("section.card", has_text="Top models")).to_contain_text(
        "gpt-4o"
    )
    top_keys = p.locator("section.card", has_text="Top keys").locator("tbody td:first-child")
    await playwright_api.expect(top_keys).to_have_text(["ann", f"sk-...{bare[-4:]}"])
    await playwright_api.expect(p.locator("svg.chart rect.bar")).to_have_count(30)
    await assert_chart_fills_its_card(p)
    await shot(p, "spend")
    for name in ("users", "teams", "customers", "models"):
        await p.click(f"#nav >> text={name.title()}")
        await playwright_api.expect(p.locator("#page h1")).to_have_text(name.title())
        await shot(p, name)
    await playwright_api.expect(p.locator("tr", has_text="openai/gpt-4o")).to_contain_text(
        "general"
    )


async def assert_chart_fills_its_card(p: object) -> None:
    chart = await p.evaluate(  # type: ignore[attr-defined]
        """() => {
          const chart = document.querySelector("svg.chart"), card = chart.closest(".card");
          const style = getComputedStyle(card);
          const inner = card.clientWidth - parseFloat(style.paddingLeft)
            - parseFloat(style.paddingRight);
          const bars = [...chart.querySelectorAll("rect.bar")]
            .map((b) => b.getBoundingClientRect());
          const labels = [...chart.querySelectorAll("text")];
          return { inner, span: bars.at(-1).right - bars[0].left, labels: labels.length,
                   px: Math.min(...labels.map((t) =>
                     parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a)) };
        }"""
    )
    assert chart["span"] >= 0.95 * chart["inner"], chart
    assert chart["labels"] >= 4 and chart["px"] >= SMALLEST_TEXT_PX - 0.01, chart


async def seed(base: str, ns: str) -> None:
    """Entities with long ids and every column filled, the worst case for the tables."""
    admin = {"Authorization": f"Bearer {MASTER_KEY}"}
    budget = f"research-and-development-monthly-{ns}"
    calls = [
        (
            "/budget/new",
            {
                "budget_id": budget,
                "max_budget": 250,
                "soft_budget": 200,
                "tpm_limit": 1_000_000,
                "rpm_limit": 10_000,
                "max_parallel_requests": 64,
                "budget_duration": "monthly",
            },
        ),
        (
            "/team/new",
            {"team_id": f"platform-engineering-{ns}", "team_alias": "Platform", "max_budget": 1000},
        ),
        (
            "/user/new",
            {
                "user_id": f"ann.example-{ns}",
                "user_email": "ann@example.com",
                "max_budget": 50,
                "budget_duration": "monthly",
                "rpm_limit": 60,
            },
        ),
        (
            "/team/member_add",
            {
                "team_id": f"platform-engineering-{ns}",
                "member": {"user_id": f"ann.example-{ns}", "role": "admin"},
            },
        ),
        (
            "/customer/new",
            {"user_id": f"customer-with-a-long-name-{ns}", "alias": "Acme", "budget_id": budget},
        ),
    ]
    async with aiohttp.ClientSession() as session:
        for path, body in calls:
            async with session.post(f"{base}{path}", json=body, headers=admin) as r:
                assert r.status == 200, (path, await r.text())
        for alias in ("ingest-pipeline-production", "notebooks", None):
            body = {
                "budget_id": budget,
                "user_id": f"ann.example-{ns}",
                "team_id": f"platform-engineering-{ns}",
                "rpm_limit": 600,
                "tpm_limit": 100_000,
                "max_parallel_requests": 8,
            }
            if alias:
                body["key_alias"] = alias
            async with session.post(f"{base}/key/generate", json=body, headers=admin) as r:
                assert r.status == 200, await r.text()
                key = (await r.json())["key"]
            await traffic(base, key)
        tag = f"cost-centre-research-and-development-{ns}"
        body = {
            "name": tag,
            "description": "Research and development",
            "max_budget": 500,
            "budget_duration": "monthly",
            "rpm_limit": 10_000,
            "tpm_limit": 1_000_000,
            "max_parallel_requests": 64,
        }
        async with session.post(f"{base}/tag/new", json=body, headers=admin) as r:
            assert r.status == 200, await r.text()
        await traffic(base, key, tags=f"{tag},feature-summarisation-{ns}")


@needs_chromium
@pytest.mark.parametrize("width", [1280, 375])
async def test_every_page_fits_the_width(sidecar: str, page: object, ns: str, width: int) -> None:
    """At a laptop's width and a phone's: every element inside the viewport and its card, no
    table scrolling sideways (its buttons cut off), no text under 12 px, dialogs included."""
    p = page
    await seed(sidecar, ns)
    await p.set_viewport_size({"width": width, "height": 860})  # type: ignore[attr-defined]
    await sign_in(p, sidecar)
    for name in PAGES:
        await open_page(p, sidecar, name)
        await playwright_api.expect(p.locator("#page .card").first).to_be_visible()
        await assert_layout(p, f"{name} at {width} px")
        await shot(p, f"{name}-{width}")
        # Every action button is wholly visible: inside the viewport, not clipped by its card.
        for button in await p.locator("#page td button").all():
            assert await button.is_visible()
    await assert_chart_fills_its_card(p)
    await open_page(p, sidecar, "keys")
    await p.click("#create-key")
    await assert_layout(p, f"the Create Key dialog at {width} px")
    await p.keyboard.press("Escape")
    await open_page(p, sidecar, "budgets")
    await p.locator("#page tr", has_text="research").locator("text=Edit").click()
    await assert_layout(p, f"the Edit budget dialog at {width} px")
    await shot(p, f"budget-edit-{width}")


@needs_chromium
async def test_tags_page_creates_edits_and_deletes_a_tag_and_shows_its_spend(
    sidecar: str, page: object, ns: str
) -> None:
    p = page
    await sign_in(p, sidecar)
    await open_page(p, sidecar, "tags")
    tag = f"eng-{ns}"
    await p.click("#create-tag")
    dialog = p.locator("#dialog")
    assert await p.evaluate("document.activeElement.id") == "field-name"
    await p.keyboard.type(tag)
    await p.fill("#field-max_budget", "5")
    await p.fill("#field-rpm_limit", "100")
    await p.select_option("#field-budget_duration", "monthly")
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(dialog).to_be_hidden()
    row = p.locator("tr", has_text=tag)
    await playwright_api.expect(row).to_contain_text("$5.00")
    await playwright_api.expect(row).to_contain_text("monthly")
    await playwright_api.expect(row).to_contain_text("100 / — / —")

    # The same name again: LiteLLM's refusal beside the field.
    await p.click("#create-tag")
    await p.fill("#field-name", tag)
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(p.locator("#field-name-error")).to_contain_text(
        f"Tag {tag} already exists"
    )
    await p.keyboard.press("Escape")

    # Traffic carrying the tag and a label: the tag's spend, and the label listed beside it.
    key = await _key(sidecar)
    await traffic(sidecar, key, n=2, tags=f"{tag},label-{ns}")
    await p.reload()
    await playwright_api.expect(row).not_to_contain_text("$0.000000")
    label = p.locator("tr", has_text=f"label-{ns}")
    await playwright_api.expect(label).to_contain_text("label")
    await playwright_api.expect(label.locator("text=Set limits")).to_be_visible()
    await shot(p, "tags")

    await row.locator("text=Edit").click()
    await playwright_api.expect(p.locator("#field-name")).to_have_text(tag)
    await p.fill("#field-max_budget", "7")
    await p.click("#dialog button[type=submit]")
    await playwright_api.expect(row).to_contain_text("$7.00")
    await row.locator("text=Delete").click()
    # deleted, the tag is a label: its spend stays listed
    await playwright_api.expect(row.locator("text=Set limits")).to_be_visible()


async def _key(base: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/key/generate", json={}, headers={"Authorization": f"Bearer {MASTER_KEY}"}
        ) as r,
    ):
        return (await r.json())["key"]


@needs_chromium
async def test_phone_width_and_keyboard(sidecar: str, page: object) -> None:
    p = page
    await p.set_viewport_size({"width": 375, "height": 800})  # type: ignore[attr-defined]
    await sign_in(p, sidecar)
    # By keyboard from the top of a fresh page: the skip link first, then the sections.
    await open_page(p, sidecar, "spend")
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
                if live["requests"] == 5 and sum(live["rps"]) > 0:
                    break
                await asyncio.sleep(0.1)
            assert live["sidecars"] == 2 and live["requests"] == 5, live
            assert live["refused"] == {"window_full (key)": 2}, live
            # The last minute, second by second, so that the page draws it from its first poll.
            assert len(live["rps"]) == 60 and 0 < sum(live["rps"]) <= 6, live
            assert live["recent_refused"] == {"window_full (key)": 2}, live
            assert live["recent_seconds"] == 10, live


@needs_chromium
async def test_models_page_shows_priority_shares(ns: str, redis_url: str, page: object) -> None:
    async with running_upstream() as upstream:
        settings = Settings(
            master_key=MASTER_KEY,
            key_prefix=f"t:{ns}:",
            models=(Deployment("shared", "openai/shared", api_base=upstream, rpm=10, tpm=1000),),
            priority_reservation=PriorityReservation(
                {"prod": ("percent", 0.9), "dev": ("percent", 0.1)}, 0.25, 0.5
            ),
        )
        async with running_sidecar(settings, redis_url) as base:
            await sign_in(page, base)
            await open_page(page, base, "models")
            card = page.locator("section.card", has_text="Priority reservation")  # type: ignore[attr-defined]
            await playwright_api.expect(card.locator("tr", has_text="prod")).to_contain_text("90%")
            await playwright_api.expect(card.locator("tr", has_text="dev")).to_contain_text(
                "1 / 100"
            )
            await playwright_api.expect(
                card.locator("tr", has_text="default_pool")
            ).to_contain_text("25%")
            await assert_layout(page, "models with priority shares")
            await shot(page, "models-priority")
            await page.set_viewport_size({"width": 375, "height": 800})  # type: ignore[attr-defined]
            await assert_layout(page, "models with priority shares, phone")
