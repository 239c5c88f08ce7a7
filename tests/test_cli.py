"""`ratelimiter serve` as users run it: a real process, its embedded Redis, a clean stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ratelimiter.engine.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-cli-test-3d9f1b7e5c2a"


def serve(cwd: Path, port: str, *extra: str) -> subprocess.Popen[str]:
    """`ratelimiter serve` as a user starts it, in ``cwd`` with its config.yaml."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ratelimiter.cli",
            "serve",
            "--config",
            "config.yaml",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            *extra,
        ],
        cwd=cwd,
        env={**os.environ, "RATELIMITER_MASTER_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_with_the_example_config(tmp_path: Path) -> None:
    port = free_port()
    shutil.copy(ROOT / "config.example.yaml", tmp_path / "config.yaml")
    process = serve(tmp_path, str(port))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness") as r:
                    assert r.status == 200
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the sidecar did not come up"
                time.sleep(0.1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/key/generate",
            data=b"{}",
            method="POST",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as r:
            virtual = json.load(r)["key"]
        chat = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            method="POST",
            data=json.dumps(
                {
                    "model": "gpt-4o-mini",
                    "user": "cust-1",
                    "messages": [{"role": "user", "content": "SECRET-PROMPT"}],
                }
            ).encode(),
            headers={"Authorization": f"Bearer {virtual}", "Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(chat)
        except urllib.error.HTTPError as error:  # nothing listens where the example points
            assert error.code == 502
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert f"data in {tmp_path / '.ratelimiter' / 'redis'}" in output
    assert KEY not in output and virtual not in output  # no secret in logs
    assert "SECRET-PROMPT" not in output  # nor prompt text
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (proxied,) = [line for line in lines if line["message"] == "proxied"]
    assert proxied["request_id"].startswith("req-") and proxied["status"] == 502
    assert (proxied["model"], proxied["end_user"]) == ("gpt-4o-mini", "cust-1")
    assert not (tmp_path / ".ratelimiter" / "redis" / "redis.sock").exists()  # server stopped


def _processes_with(argument: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    port = str(free_port())
    (tmp_path / "config.yaml").write_text("ratelimiter_settings:\n  timezone: UTC\n")
    process = serve(tmp_path, port, "--workers", "2")
    try:
        deadline = time.monotonic() + 20
        while len(_processes_with(port)) < 3:  # the parent and two workers
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        answered = 0
        while answered < 20:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness") as r:
                    answered += r.status == 200
            except OSError:
                assert time.monotonic() < deadline, "the workers did not come up"
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "starting 2 workers" in output
    assert _processes_with(port) == []


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    upstream_port, port = str(free_port()), str(free_port())
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ratelimiter.cli",
            "fake-upstream",
            "--port",
            upstream_port,
            "--latency-ms",
            "1000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (tmp_path / "config.yaml").write_text(
        "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
    )
    process = serve(tmp_path, port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness")
                urllib.request.urlopen(f"http://127.0.0.1:{upstream_port}/v1/models")
                break
            except OSError:
                assert time.monotonic() < deadline, "sidecar or upstream did not come up"
                time.sleep(0.1)
        chat = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            method="POST",
            data=b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        result: list[int] = []
        caller = threading.Thread(target=lambda: result.append(urllib.request.urlopen(chat).status))
        caller.start()
        time.sleep(0.4)  # the request is waiting on the slow upstream
        process.send_signal(signal.SIGTERM)
        caller.join(10)
        assert result == [200]  # finished, not cut off
        assert process.wait(20) == 0
    finally:
        process.kill()
        upstream.kill()
        upstream.wait()
