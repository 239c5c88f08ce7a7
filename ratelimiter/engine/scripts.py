"""The Lua scripts in ``lua/``: read once, run by SHA, reloaded when Redis forgot them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from .connections import RedisClient
from .multiplex import Multiplexer, Packed

__all__ = ["Script", "load_all", "load_scripts", "run_script"]

NAMES = ("acquire", "settle", "renew", "peek", "expire", "reset")
# The parts of lib.lua each script is given, besides its head (see lib.lua's header).
PARTS: dict[str, tuple[str, ...]] = {
    "acquire": ("decide", "budget"),
    "peek": ("decide", "budget"),
    "settle": ("budget", "finish"),
    "renew": ("budget", "finish"),
    "expire": ("budget", "finish"),
    "reset": (),
}
_PART = re.compile(r"^-- \[part: (\w+)\]\n", re.MULTILINE)


def _lua_dir() -> Path:
    here = Path(__file__).resolve().parent
    source_tree = here.parent.parent / "lua"
    for candidate in (here / "lua", source_tree):  # installed wheel, then source tree
        if (candidate / "lib.lua").is_file():
            return candidate
    raise FileNotFoundError(
        f"the Lua scripts are missing: looked in {here / 'lua'} and {source_tree}"
    )


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes
    sha: str


def lib_parts(lib: str, names: tuple[str, ...]) -> str:
    """lib.lua's head and its parts named ``names``, in the file's order."""
    pieces = _PART.split(lib)  # head, name, text, name, text...
    kept = [text for name, text in zip(pieces[1::2], pieces[2::2], strict=True) if name in names]
    return "".join([pieces[0], *kept])


def _assemble(lib: str, body: str) -> str:
    # A '#!lua flags=...' line must stay first for Redis to read it.
    if body.startswith("#!"):
        shebang, _, rest = body.partition("\n")
        return f"{shebang}\n{lib}\n{rest}"
    return f"{lib}\n{body}"


def lua_source(name: str) -> str:
    """A script of ``lua/`` that runs on its own, without lib.lua."""
    return (_lua_dir() / f"{name}.lua").read_text()


@cache
def load_scripts() -> dict[str, Script]:
    directory = _lua_dir()
    lib = (directory / "lib.lua").read_text()
    scripts = {}
    for name in NAMES:
        own = lib_parts(lib, PARTS[name])
        source = _assemble(own, (directory / f"{name}.lua").read_text()).encode()
        scripts[name] = Script(name, source, hashlib.sha1(source).hexdigest())
    return scripts


async def run_script(
    redis: RedisClient | Multiplexer, script: Script, keys: list[str], args: list[Any]
) -> Any:
    """EVALSHA; on NOSCRIPT (a restarted or flushed server, a promoted replica) load and retry.
    A key may be a ``multiplex.Packed`` of several keys (when ``redis`` is a multiplexer)."""
    count = len(keys)
    for key in keys:
        if type(key) is Packed:
            count += key.count - 1
    try:
        return await redis.evalsha(script.sha, count, *keys, *args)
    except NoScriptError:
        await load_all(redis, script)
        return await redis.evalsha(script.sha, count, *keys, *args)


async def load_all(redis: RedisClient | Multiplexer, first: Script | None = None) -> None:
    """``first`` (a script Redis did not have) and every script of ``lua/`` into Redis's
    cache. All of them on one NOSCRIPT: a call that meets it is sent again behind whatever was
    pipelined meanwhile, so a settlement retried so would reach Redis after a request that came
    later (and still find its lease held); loading all at once makes that happen to one call
    after a flush, not to the first call of each script."""
    scripts = list(load_scripts().values())
    if first is not None:
        scripts = [first, *(script for script in scripts if script.sha != first.sha)]
    for script in scripts:
        await redis.script_load(script.source)
