"""The benchmarks are a product (our users load-test with them): each one runs here, briefly,
against real processes, and what it reports is checked. No figure is asserted: speed is
measured by the benchmarks, never by tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from benchmarks import accuracy, load, scaling, services

ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_load_tool_drives_its_own_stack_and_reports_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = run_module(
        "benchmarks.load",
        "--duration", "2", "--warmup", "0.5", "--keys", "3", "--concurrency", "8",
        "--stream-share", "0.5", "--json", str(out), "--plot", str(tmp_path / "plots"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["answered"] > 0 and report["errors"] == 0 and report["refused"] == 0
    assert 0 < report["streams"] < report["answered"]  # both kinds of request were sent
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "p99.9"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["ttfb_ms"]["p50"] is not None
    for name in ("latency-over-time.png", "latency-histogram.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")
    assert "latency ms" in done.stdout


def test_load_tool_counts_refusals_by_reason(tmp_path: Path) -> None:
    with (
        services.workdir() as root,
        services.redis_server(root) as redis_server,
        services.fake_upstream(root) as upstream,
        services.sidecar(root, upstream.url, redis_server.url) as sidecar,
    ):
        key = services.admin_call(
            sidecar.url, sidecar.master_key, "/key/generate", {"rpm_limit": 5}
        )
        plan = load.Plan(
            url=sidecar.url, mix=load.Mix(keys=(key["key"],)), duration_s=1.5, warmup_s=0
        )
        report, _ = load.run(plan, processes=2, progress=False)
    assert report["answered"] == 5
    assert report["refused_by_reason"] == {"requests (key:requests)": report["requests"] - 5}
    assert report["concurrency"] == 32 and report["processes"] == 2


def test_comparison_reports_every_figure_the_readme_quotes(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    done = run_module(
        "benchmarks.compare",
        "--runs", "1", "--duration", "1.5", "--warmup", "0.3", "--no-litellm",
        "--quiet", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    for name in ("sidecar_rps", "bare_proxy_rps", "upstream_rps", "ratio_to_bare_proxy"):
        assert result[name] > 0, name
    assert result["added_p50_ms"] is not None and result["added_p99_ms"] is not None
    assert result["litellm_rps"] is None and result["targets"]["ratio_to_litellm"] == "not measured"
    # One call to admit, one to settle; a few more from the sidecar's own housekeeping.
    assert 1.95 <= result["redis_calls_per_request"]["evalsha"] <= 2.1
    for name in ("upstream", "bare_proxy", "sidecar"):
        (run,) = result["runs"][name]
        assert run["errors"] == 0 and run["refused"] == 0, (name, run)
    assert set(result["cpu_us_per_request"]["sidecar"]) == {"server", "upstream", "redis"}


def test_accuracy_many_sidecars_admit_exactly_each_limit(tmp_path: Path) -> None:
    argv = ["--sidecars", "3", "--rpm", "30", "--parallel", "6", "--slow-ms", "600", "--out"]
    rows = accuracy.run(accuracy.parse_args([*argv, str(tmp_path / "a.json")]))
    assert [r["limit"] for r in rows] == [
        "requests per minute",
        "tokens per minute",
        "parallel requests",
        "budget",
    ]
    for row in rows:
        assert row["over_admitted"] == 0, row
        # Ten times the demand, all of it at once: each limit is filled to the last unit.
        assert row["used"] == pytest.approx(row["allowed"]), row


def test_round_trips_count_what_clients_send_not_what_lua_runs(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    counter = scaling.RoundTrips(redis_url)
    with counter.counting() as commands:
        client.eval("for i = 1, 5 do redis.call('INCR', KEYS[1]) end return 1", 1, "rt:x")
        client.get("rt:x")
    client.close()
    assert commands["eval"] == 1 and commands["get"] == 1
    assert "incr" not in commands


def test_bare_proxy_passes_streams_and_errors_through() -> None:
    with (
        services.workdir() as root,
        services.fake_upstream(root) as upstream,
        services.bare_proxy(root, upstream.url) as bare,
    ):
        plan = load.Plan(
            url=bare.url, mix=load.Mix(keys=("x",), stream_share=1.0), duration_s=0.5, warmup_s=0
        )
        report, _ = load.run(plan, progress=False)
    assert report["answered"] == report["streams"] > 0
