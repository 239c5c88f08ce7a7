"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ratelimiter
from ratelimiter.library import sdk
from ratelimiter.testing.fake_upstream import FakeUpstream

README = Path(__file__).resolve().parent.parent / "README.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run(example: str) -> dict[str, object]:
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(example, str(README), "exec"), namespace)
    return namespace


def test_engine_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its embedded Redis keeps data under ./.ratelimiter
    (example,) = [e for e in examples() if "Engine.connect(None)" in e]
    run(example)
    assert any((tmp_path / ".ratelimiter" / "redis").rglob("*.aof"))


def test_library_examples_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstream_in_thread: tuple[str, FakeUpstream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", upstream_in_thread[0])
    monkeypatch.setattr(ratelimiter, "max_budget", None)
    monkeypatch.setattr(sdk, "SPEND", sdk._Spend())
    budget, max_budget, middleware, admin = [e for e in examples() if "Engine.connect" not in e]
    run(budget)
    assert (tmp_path / "user_cost.json").exists()
    assert "{'gpt-4o-mini': " in capsys.readouterr().out
    run(max_budget)
    assert ratelimiter._current_cost > 0 and "not sent" not in capsys.readouterr().out
    app = run(middleware)["app"]
    assert len(app.middlewares) == 1 and app.cleanup_ctx  # built, not served
    assert callable(run(admin)["main"])
