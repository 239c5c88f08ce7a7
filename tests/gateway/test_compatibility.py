"""The README's compatibility table is the one the request models give: a field added to a
model, or a route, cannot leave the README behind."""

from __future__ import annotations

import re
from pathlib import Path

from ratelimiter.gateway.models import ACCEPTED_ONLY
from ratelimiter.gateway.openapi import compatibility_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_the_generated_table() -> None:
    found = re.search(
        r"<!-- compatibility:start -->\n(.*)\n<!-- compatibility:end -->",
        README.read_text(),
        re.DOTALL,
    )
    assert found, "README.md lost its compatibility markers"
    expected = compatibility_table()
    assert found.group(1) == expected, f"paste this between the markers:\n{expected}"


def test_every_accepted_only_field_is_in_the_table() -> None:
    table = compatibility_table()
    for fields in ACCEPTED_ONLY.values():
        for name in fields:
            assert f"`{name}`" in table
