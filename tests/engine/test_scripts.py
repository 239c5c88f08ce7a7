"""Each script is given only the parts of lib.lua it uses (scripts.py, PARTS). A helper it
calls but was not given would fail only when that line runs, perhaps on a rare path (a refusal,
a share, an old record), so every name lib.lua defines that a script mentions must be defined
in what the script is given."""

from __future__ import annotations

import re

import pytest

from ratelimiter.engine.scripts import NAMES, PARTS, _lua_dir, lib_parts, load_scripts

DEFINED = re.compile(r"^local (?:function (\w+)|([\w, ]+?) =)", re.MULTILINE)
COMMENT = re.compile(r"--[^\n]*")


def defined(source: str) -> set[str]:
    names: set[str] = set()
    for function, variables in DEFINED.findall(source):
        names.update([function] if function else [v.strip() for v in variables.split(",")])
    return names


def test_every_part_is_given_to_some_script() -> None:
    lib = (_lua_dir() / "lib.lua").read_text()
    parts = set(re.findall(r"^-- \[part: (\w+)\]$", lib, re.MULTILINE))
    assert parts == {part for names in PARTS.values() for part in names}
    assert set(PARTS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_script_is_given_every_helper_it_names(name: str) -> None:
    lib = (_lua_dir() / "lib.lua").read_text()
    given = defined(lib_parts(lib, PARTS[name]))
    code = COMMENT.sub("", load_scripts()[name].source.decode())
    missing = {
        helper for helper in defined(lib) - given if re.search(rf"(?<![\w.]){helper}(?!\w)", code)
    }
    assert not missing, f"{name}.lua names helpers of lib.lua it is not given: {sorted(missing)}"
