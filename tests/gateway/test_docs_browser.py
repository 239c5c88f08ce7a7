"""/docs in a real browser: Swagger UI renders the admin API from /openapi.json under the
page's policy (scripts and styles from the sidecar only), with no error and no violation."""

from __future__ import annotations

import os
import shutil

import pytest

from ..conftest import Admin

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium")
async def test_swagger_ui_renders_every_route_group(admin: Admin) -> None:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        outside: list[str] = []
        page.on("request", lambda r: r.url.startswith(admin.base) or outside.append(r.url))
        await page.goto(f"{admin.base}/docs")
        await playwright_api.expect(page.locator(".opblock-tag-section").first).to_be_visible()
        tags = await page.locator(".opblock-tag").all_inner_texts()
        assert {"key", "user", "team", "customer", "end_user", "budget"} <= {
            t.split()[0] for t in tags
        }
        await page.click("#operations-key-post_key_generate button.opblock-summary-control")
        await playwright_api.expect(page.get_by_text("max_budget").first).to_be_attached()
        await browser.close()
    assert not errors, errors  # no script error, no CSP violation
    assert not outside, outside  # nothing from a CDN or anywhere else
