"""The benchmarks are a product (our users load-test with them): each one runs here, briefly,
against real processes, and what it reports is checked. No figure is asserted: speed is
measured by the benchmarks, never by tests."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import redis

from benchmarks import accuracy, load, redis_cost, scaling, services
from ratelimiter.testing.fake_upstream import FakeUpstream

from .conftest import MASTER_KEY, one_model, running_sidecar, running_upstream

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


async def run_load_tool(*args: str) -> tuple[int, str, str]:
    """The load tool as a user runs it, while this test's event loop serves the sidecar."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.load", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def new_key(base: str, **fields: object) -> str:
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/key/generate", json=fields, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        return (await response.json())["key"]


async def test_load_tool_stops_when_the_target_does_not_serve_its_model(
    ns: str, redis_url: str
) -> None:
    """The README's ``--url … --key …`` line against a sidecar that serves ``m`` only: one
    clear line naming what it serves, instead of a run of 404s."""
    fake = FakeUpstream()
    async with (
        running_upstream(fake) as upstream,
        running_sidecar(one_model(ns, upstream), redis_url) as base,
    ):
        key = await new_key(base)
        code, out, err = await run_load_tool(
            "--url", base + "/v1", "--key", key, "--duration", "1", "--warmup", "0"
        )  # fmt: skip
        assert code != 0 and "latency ms" not in out
        assert "'bench-model'" in err and "serves to this key: m" in err, err
        assert "--models m" in err and "Traceback" not in err
        assert fake.requests == 0
        code, out, err = await run_load_tool(
            "--url", base + "/v1", "--key", key, "--models", "m",
            "--duration", "0.5", "--warmup", "0", "--quiet",
        )  # fmt: skip
        assert code == 0, err
    assert fake.requests > 0


async def test_load_tool_progress_line_ends_on_the_reports_counts(
    ns: str, redis_url: str, tmp_path: Path
) -> None:
    """Warm-up requests are not in the report, so not in the progress line either; its last
    line is printed when the run ends and says what the report says."""
    report_path = tmp_path / "report.json"
    async with (
        running_upstream() as upstream,
        running_sidecar(one_model(ns, upstream), redis_url) as base,
    ):
        key = await new_key(base, rpm_limit=30)
        code, _, err = await run_load_tool(
            "--url", base + "/v1", "--key", key, "--models", "m", "--concurrency", "4",
            "--warmup", "0.5", "--duration", "1.5", "--json", str(report_path),
        )  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    lines = re.findall(r"(\S+) requests .*ok (\S+)  429 (\S+)  errors (\S+)", err)
    assert lines, err
    last = [int(n.replace(",", "")) for n in lines[-1]]
    assert last == [report[k] for k in ("requests", "answered", "refused", "errors")], err
    assert report["refused"] > 0 and report["sent_with_warmup"] > report["requests"]


def test_plots_show_every_request_and_plain_millisecond_ticks() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    samples = load.Samples()
    for i in range(2000):
        samples.started.append(i / 400)
        samples.latency.append(0.004 + (i % 97) / 1000)  # 4 to 100 ms
        samples.ok.append(True)
    figures = load.latency_figures(samples, "t")
    try:
        over_time = figures["latency-over-time.png"].axes[0]
        (dots,) = over_time.collections
        assert dots.get_sizes()[0] >= 4 and dots.get_alpha() >= 0.3  # visible, not a haze
        for figure in figures.values():
            figure.canvas.draw()
            for axis in figure.axes:
                labels = [t.get_text() for t in axis.get_xticklabels() + axis.get_yticklabels()]
                plain = [t for t in labels if re.fullmatch("[-\u2212]?[0-9.,]+", t)]
                assert labels and plain == [t for t in labels if t], labels
        assert {"5", "10", "20", "50", "100"} <= {t.get_text() for t in over_time.get_yticklabels()}
    finally:
        for figure in figures.values():
            matplotlib.pyplot.close(figure)


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
    ((reason, refused),) = report["refused_by_reason"].items()
    assert refused == report["requests"] - 5
    assert reason in (
        "requests (key:requests)",
        "requests (api_key)",
    )  # the old and LiteLLM's words
    assert report["concurrency"] == 32 and report["processes"] == 2


def test_comparison_reports_every_figure_the_readme_quotes(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    done = run_module(
        "benchmarks.compare",
        "--runs", "1", "--duration", "1.5", "--warmup", "0.3", "--no-litellm",
        "--quiet", "--out", str(out), "--baseline", str(ROOT),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    figures = ("sidecar_rps", "bare_proxy_rps", "upstream_rps", "ratio_to_bare_proxy")
    for name in (*figures, "baseline_rps", "ratio_to_baseline"):
        assert result[name] > 0, name
    assert result["added_p50_ms"] is not None and result["added_p99_ms"] is not None
    assert result["litellm_rps"] is None and result["targets"]["ratio_to_litellm"] == "not measured"
    # One call to admit, one to settle; a few more from the sidecar's own housekeeping.
    assert 1.95 <= result["redis_calls_per_request"]["evalsha"] <= 2.1
    for name in ("upstream", "bare_proxy", "sidecar", "baseline"):
        (run,) = result["runs"][name]
        assert run["errors"] == 0 and run["refused"] == 0, (name, run)
    for name in ("sidecar", "baseline"):  # each on its own Redis, so each has its own cost
        assert set(result["cpu_us_per_request"][name]) == {"server", "upstream", "redis"}


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


@pytest.mark.skipif(not redis_cost.callgrind_available(), reason="valgrind is not installed")
def test_redis_cost_counts_instructions_per_request(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    done = run_module("benchmarks.redis_cost", "--requests", "20", "--out", str(out))
    assert done.returncode == 0, done.stderr
    current = json.loads(out.read_text())["current"]
    per_op = current["instructions_per_op"]
    # a whole enforced request (20 limits, ledger entry) costs more than its hot scope alone,
    # which costs more than a script that only returns
    assert per_op["enforced_request"] > per_op["hot_scope"] > per_op["trivial_evalsha"] > 0
    # the split of the enforced request: parts of the scripts within them, all within the whole
    parts = current["enforced_request_parts"]
    inside = ("redis_calls", "replies_to_lua", "msgpack_unpack", "msgpack_pack", "lua_own_work")
    assert all(parts[part] > 0 for part in inside)
    assert sum(parts[part] for part in inside) == parts["scripts"]
    assert parts["scripts"] + parts["aof_propagation"] < 1.2 * per_op["enforced_request"]


def test_sink_benchmark_ships_everything_and_keeps_the_ledger_out_of_redis(
    tmp_path: Path,
) -> None:
    out = tmp_path / "sink.json"
    done = run_module(
        "benchmarks.sink",
        "--rate", "40", "--duration", "2", "--outage", "0.5", "--collect-interval", "0.2",
        "--out", str(out),
    )  # fmt: skip
    if "PostgreSQL binaries not found" in done.stderr:
        pytest.skip("PostgreSQL binaries not found on this machine")
    assert done.returncode == 0, done.stderr
    with_sink, without = json.loads(out.read_text())["runs"]
    assert with_sink["rows"] == with_sink["requests"] > 0
    assert with_sink["waiting_at_end"] == 0 and with_sink["most_waiting"] > 0  # the outage
    assert without["rows"] is None and without["waiting_at_end"] == without["requests"]
    assert without["ledger_bytes_per_request"] > 100 > with_sink["ledger_bytes_per_request"]


def test_engine_benchmark_serves_a_hot_scope_from_blocks(tmp_path: Path) -> None:
    """Counted, not timed: with capacity blocks a hot-scope request costs Redis a fraction of
    a call (two per block, a block per thousand requests or per one-second bucket: about 0.02
    on an idle machine, 0.1 seen under a full test run), without them two."""
    out = tmp_path / "engine.json"
    done = run_module(
        "benchmarks.engine", "--duration", "0.5", "--runs", "1", "--quick", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())["figures"]
    assert figures["cycles_per_s_hot_scope"]["evalsha_calls_per_op"] == pytest.approx(2, abs=0.05)
    assert figures["cycles_per_s_hot_scope_blocks"]["evalsha_calls_per_op"] < 0.5


@pytest.mark.skipif(not redis_cost.callgrind_available(), reason="valgrind is not installed")
def test_settle_cost_counts_settlement_and_rollups_apart() -> None:
    done = run_module("benchmarks.settle_cost", "--requests", "20")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["requests"] == 20 and report["commands_per_request"] > 0
    assert {"evalsha", "xadd", "sadd"} <= report["by_command"].keys()
    assert report["instructions_per_request"]["acquire_and_settle"] > 0


def test_instructions_counts_the_sidecars_work_per_request(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    args = ("--requests", "5", "--warmup", "2", "--out", str(out))
    done = run_module("benchmarks.instructions", *args, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    # a request runs the sidecar's whole path: far more than a Redis script's instructions
    assert result["sidecar"] > 100_000 and result["requests"] == 5
    # the bare proxy forwards the same requests, checking nothing: less work than the sidecar
    assert 0 < result["bare_proxy"] < result["sidecar"]
    assert result["sidecar_over_bare_proxy"] == round(result["sidecar"] / result["bare_proxy"], 3)
