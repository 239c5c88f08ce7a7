"""`ratelimiter serve` as users run it: a real process, its embedded Redis, a clean stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import msgpack

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


def example_config(directory: Path) -> None:
    """The README's config, its upstream moved to a port nothing listens on: the README's
    walk-through runs a fake upstream on 8000, and no test may depend on a fixed port."""
    text = (ROOT / "config.example.yaml").read_text()
    assert "127.0.0.1:8000" in text
    (directory / "config.yaml").write_text(
        text.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}")
    )


def wait_ready(process: subprocess.Popen[str], port: int | str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness") as r:
                assert r.status == 200
                return
        except OSError:
            assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the sidecar did not come up"
            time.sleep(0.1)


def test_serve_with_the_example_config(tmp_path: Path) -> None:
    port = free_port()
    example_config(tmp_path)
    process = serve(tmp_path, str(port))
    try:
        wait_ready(process, port)
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
    ready = f"ratelimiter ready on http://127.0.0.1:{port} (listening on 127.0.0.1:{port}); "
    docs = f"API docs http://127.0.0.1:{port}/docs; "
    assert ready + f"admin UI http://127.0.0.1:{port}/ui; {docs}Redis embedded, " in output
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


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratelimiter.cli", *args],
        cwd=cwd,
        env={**os.environ, "RATELIMITER_MASTER_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_sidecar_in_the_same_folder_stops_with_one_line(tmp_path: Path) -> None:
    """It used to start a second Redis on the same socket and AOF, fail with a traceback,
    and remove the first one's socket on its way out."""
    example_config(tmp_path)
    port = free_port()
    first = serve(tmp_path, str(port))
    try:
        wait_ready(first, port)
        taken = run_cli("serve", "--config", "config.yaml", "--port", str(port), cwd=tmp_path)
        assert taken.returncode == 1 and "Traceback" not in taken.stderr
        assert f"cannot listen on 0.0.0.0:{port}" in taken.stderr, taken.stderr
        same_folder = run_cli(
            "serve", "--config", "config.yaml", "--port", str(free_port()), cwd=tmp_path
        )
        assert same_folder.returncode == 1 and "Traceback" not in same_folder.stderr
        assert f"is already run by process {first.pid}" in same_folder.stderr, same_folder
        assert (tmp_path / ".ratelimiter" / "redis" / "redis.sock").exists()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness") as r:
            assert r.status == 200  # the first one still reaches its Redis
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=20)
    assert first.returncode == 0


def test_a_killed_sidecar_leaves_no_redis_and_the_next_start_works(tmp_path: Path) -> None:
    example_config(tmp_path)
    data = tmp_path / ".ratelimiter" / "redis"
    port = free_port()
    killed = serve(tmp_path, str(port))
    wait_ready(killed, port)
    redis_pid = int((data / "redis.pid").read_text())
    assert Path(f"/proc/{redis_pid}").exists()
    killed.kill()
    killed.communicate(timeout=20)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{redis_pid}").exists():  # the server stops with its parent
        assert time.monotonic() < deadline, "the embedded Redis outlived its sidecar"
        time.sleep(0.1)
    port = free_port()
    again = serve(tmp_path, str(port))
    try:
        wait_ready(again, port)
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=20)
    assert again.returncode == 0


def test_an_orphaned_embedded_redis_is_stopped_before_a_new_one_starts(tmp_path: Path) -> None:
    """A server left on the folder's files by a process that died without stopping it (an
    older version, or no parent-death signal on this system) is never run beside a second."""
    from ratelimiter import RedisServer

    data = tmp_path / ".ratelimiter" / "redis"
    orphan = RedisServer(data).start()
    assert orphan.process is not None
    orphan_pid = orphan.process.pid
    orphan._release_lock()  # as if its owner had died: the lock goes, the server stays
    example_config(tmp_path)
    port = free_port()
    process = serve(tmp_path, str(port))
    try:
        wait_ready(process, port)
        assert orphan.process.wait(10) == 0  # stopped cleanly, AOF flushed
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    assert f"stopping the embedded Redis (pid {orphan_pid}) left running" in output


def test_a_redis_url_that_is_not_redis_is_one_line(tmp_path: Path) -> None:
    example_config(tmp_path)
    with socket.socket() as http_like:  # answers like an HTTP server, whatever it is sent
        http_like.bind(("127.0.0.1", 0))
        http_like.listen()
        opened: list[socket.socket] = []  # kept open: the client reads the answer, not an EOF

        def answer_each() -> None:
            with contextlib.suppress(OSError):  # the listening socket closes at the end
                while True:
                    connection, _ = http_like.accept()
                    opened.append(connection)
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_each, daemon=True).start()
        run = subprocess.run(
            [
                *(sys.executable, "-m", "ratelimiter.cli", "serve", "--config", "config.yaml"),
                *("--port", str(free_port())),
            ],
            cwd=tmp_path,
            env={
                **os.environ,
                "RATELIMITER_MASTER_KEY": KEY,
                "REDIS_URL": f"redis://127.0.0.1:{http_like.getsockname()[1]}/0?cluster=false",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "does not answer as Redis does" in run.stderr


def test_version_and_log_format_after_the_subcommand(tmp_path: Path) -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("ratelimiter ")
    config = tmp_path / "config.yaml"
    config.write_text("ratelimiter_settings:\n  timezone: Nowhere/Land\n")
    for args in (["--log-format", "text", "serve"], ["serve", "--log-format", "text"]):
        run = run_cli(*args, "--config", str(config), "--port", str(free_port()))
        assert run.returncode == 2 and "Nowhere/Land" in run.stderr, run


async def test_a_ledger_export_piped_into_head_ends_quietly(
    tmp_path: Path, redis_url: str, ns: str
) -> None:
    from ratelimiter import Engine

    prefix = f"t:{ns}:"
    async with await Engine.connect(redis_url, prefix=prefix) as engine:
        for n in range(300):  # more than a pipe's buffer of JSON lines
            meta = msgpack.packb({"key_alias": "k" * 200})
            decision = await engine.acquire(None, [], meta=meta, ledger=[f"key:{n}"])
            assert decision.reservation is not None
            await engine.settle(decision.reservation)
    (tmp_path / "config.yaml").write_text(f"ratelimiter_settings:\n  key_prefix: '{prefix}'\n")
    today = datetime.now(UTC).date().isoformat()
    command = (
        f"{sys.executable} -m ratelimiter.cli ledger export --config config.yaml "
        f"--since {today} | head -n 1"
    )
    run = subprocess.run(
        ["bash", "-c", command],
        cwd=tmp_path,
        env={**os.environ, "REDIS_URL": redis_url, "RATELIMITER_MASTER_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.stdout.count("\n") == 1
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def test_the_readme_walk_through_needs_no_key_in_the_second_terminal(tmp_path: Path) -> None:
    """The first terminal serves with no master key set: one is generated and saved; the
    second terminal, with nothing set either, reads it with `ratelimiter key`, and the
    ledger tools find the running sidecar's embedded Redis, then start their own."""
    example_config(tmp_path)
    clean = {
        k: v for k, v in os.environ.items() if k not in ("RATELIMITER_MASTER_KEY", "REDIS_URL")
    }
    port = free_port()
    first = subprocess.Popen(
        [
            *(sys.executable, "-m", "ratelimiter.cli", "serve", "--config", "config.yaml"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        cwd=tmp_path,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def second(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "ratelimiter.cli", *args]
        return subprocess.run(command, cwd=tmp_path, env=clean, capture_output=True, text=True)

    try:
        wait_ready(first, port)
        key = second("key").stdout.strip()
        assert key.startswith("sk-") and len(key) > 30
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/key/generate",
            data=b"{}",
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as r:
            assert r.status == 200
        check = second("ledger", "check", "--config", "config.yaml")
        assert check.returncode == 0 and "agree" in check.stdout, check
    finally:
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=20)
    assert key not in output  # where it is saved is logged, never the key
    export = second("ledger", "export", "--config", "config.yaml", "--since", "2026-01-01")
    assert export.returncode == 0 and "exported 0 entries" in export.stderr, export
