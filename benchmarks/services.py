"""The processes a benchmark runs against, each started as its own OS process and stopped with it:
Redis, the fake upstream, the bare proxy, the sidecar (with the full set of limits) and, when
installed, LiteLLM's proxy.

Every service listens on a free port of 127.0.0.1 and is ready when its readiness URL answers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import yaml

from ratelimiter.engine.embedded import RedisServer, free_port

# Limits no benchmark reaches unless it means to: every request pays for every check.
UNREACHED = {"rpm_limit": 10**9, "tpm_limit": 10**12, "max_parallel_requests": 10**6}
UNREACHED_BUDGET = 10**6  # dollars
PRICE_IN, PRICE_OUT = 0.00000015, 0.0000006


class ServiceError(RuntimeError):
    """A benchmark service did not start; the message holds the end of its output."""


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    master_key: str = ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def service(
    name: str,
    args: Sequence[str],
    url: str,
    ready_path: str,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[Service]:
    """Run ``args`` until the block ends; yields once ``url + ready_path`` answers."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=workdir,
        )
    running = Service(name, process, url, log)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url + ready_path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"{name} did not start ({' '.join(args)}):\n{_tail(log)}")
            time.sleep(0.05)
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def redis_server(
    root: Path, appendonly: bool = False, name: str = "redis"
) -> Iterator[RedisServer]:
    """A Redis on a free TCP port, so ``redis-cli`` and INFO work from outside too."""
    server = RedisServer(root / name, port=free_port(), appendonly=appendonly).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def fake_upstream(root: Path, latency_ms: float = 0.0) -> Iterator[Service]:
    port = free_port()
    args = [sys.executable, "-m", "ratelimiter.cli", "fake-upstream", "--port", str(port)]
    if latency_ms:
        args += ["--latency-ms", str(latency_ms)]
    url = f"http://127.0.0.1:{port}"
    with service("upstream", args, url, "/v1/models", root) as running:
        running.url = f"{url}/v1"
        yield running


@contextlib.contextmanager
def bare_proxy(root: Path, upstream: str) -> Iterator[Service]:
    port = free_port()
    args = [sys.executable, "-m", "benchmarks.bare_proxy", "--port", str(port)]
    args += ["--upstream", upstream]
    url = f"http://127.0.0.1:{port}"
    with service("bare-proxy", args, url, "/v1/models", root) as running:
        running.url = f"{url}/v1"
        yield running


@dataclass
class SidecarSetup:
    """What the sidecar benchmark's config holds, and who its traffic comes from."""

    models: tuple[str, ...] = ("bench-model",)
    proxy_budget: float | None = UNREACHED_BUDGET
    end_user_budget: bool = True
    key_prefix: str = "bench:"
    # model name -> /v1 base URL, for models served by another upstream than the default
    model_upstreams: dict[str, str] = field(default_factory=dict)
    # models served by an Anthropic-format upstream (the fake one speaks Messages too)
    anthropic_models: tuple[str, ...] = ()
    extra_settings: dict[str, object] = field(default_factory=dict)


def sidecar_config(setup: SidecarSetup, upstream: str, redis_url: str) -> dict[str, object]:
    models = [
        {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{name}",
                "api_base": setup.model_upstreams.get(name, upstream),
                "api_key": "sk-fake-upstream",
                "input_cost_per_token": PRICE_IN,
                "output_cost_per_token": PRICE_OUT,
            },
        }
        for name in (*setup.models, *setup.model_upstreams)
    ]
    models += [
        {
            "model_name": name,
            "litellm_params": {
                "model": f"anthropic/{name}",
                "api_base": upstream,
                "api_key": "sk-fake-upstream",
                "input_cost_per_token": PRICE_IN,
                "output_cost_per_token": PRICE_OUT,
            },
        }
        for name in setup.anthropic_models
    ]
    litellm: dict[str, object] = {}
    if setup.proxy_budget is not None:
        litellm |= {"max_budget": setup.proxy_budget, "budget_duration": "monthly"}
    if setup.end_user_budget:
        litellm["max_end_user_budget_id"] = "bench-end-user"
    return {
        "model_list": models,
        "litellm_settings": litellm,
        "ratelimiter_settings": {
            "redis_url": redis_url,
            "key_prefix": setup.key_prefix,
            **setup.extra_settings,
        },
    }


@contextlib.contextmanager
def sidecar(
    root: Path,
    upstream: str,
    redis_url: str,
    setup: SidecarSetup | None = None,
    workers: int = 1,
    master_key: str | None = None,
    name: str = "sidecar",
    source: Path | None = None,
) -> Iterator[Service]:
    """``ratelimiter serve`` on a free port; ``master_key`` is on the returned service's env.
    ``source``: run the code of that checkout (an earlier version, say) instead of this one."""
    setup = setup or SidecarSetup()
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(setup, upstream, redis_url)))
    key = master_key or "sk-" + secrets.token_hex(24)
    port = free_port()
    args = [sys.executable, "-m", "ratelimiter.cli", "serve", "--config", str(config)]
    args += ["--port", str(port), "--workers", str(workers)]
    env = {"RATELIMITER_MASTER_KEY": key}
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())
    url = f"http://127.0.0.1:{port}"
    with service(name, args, url, "/health/readiness", root, env=env) as running:
        running.url, running.master_key = f"{url}/v1", key
        yield running


def litellm_binary() -> str | None:
    """LiteLLM's ``litellm`` command: ``$LITELLM_BIN``, else on PATH, else None."""
    return os.environ.get("LITELLM_BIN") or shutil.which("litellm")


@contextlib.contextmanager
def litellm_proxy(
    root: Path, binary: str, upstream: str, models: Sequence[str]
) -> Iterator[Service]:
    """LiteLLM's proxy, one worker and no database: it forwards but enforces no budget."""
    master_key = "sk-" + secrets.token_hex(24)
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": upstream,
                    "api_key": "sk-fake-upstream",
                },
            }
            for name in models
        ],
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"telemetry": False},
    }
    path = root / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    args = [binary, "--config", str(path), "--port", str(port), "--num_workers", "1"]
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    url = f"http://127.0.0.1:{port}"
    with service("litellm", args, url, "/health/liveliness", root, env=env, timeout=180) as running:
        running.url, running.master_key = f"{url}/v1", master_key
        yield running


def admin_call(base: str, master_key: str, path: str, body: dict[str, object]) -> dict:
    """One admin API call (blocking: set-up only)."""
    request = urllib.request.Request(
        base.removesuffix("/v1") + path,
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {master_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServiceError(f"{path} answered {exc.code}: {exc.read().decode()}") from None


def full_enforcement_keys(
    base: str, master_key: str, keys: int, models: Sequence[str], teams: int = 4
) -> list[str]:
    """Keys that meet every scope: each belongs to a user and a team, with requests, tokens,
    parallel and budget limits on key, user, team and key x model. Limits are never reached:
    the benchmark measures what checking them costs."""
    limits = {**UNREACHED, "max_budget": UNREACHED_BUDGET, "budget_duration": "30d"}
    admin_call(base, master_key, "/budget/new", {"budget_id": "bench-end-user", **limits})
    for t in range(teams):
        admin_call(base, master_key, "/team/new", {"team_id": f"bench-team-{t}", **limits})
    out = []
    for k in range(keys):
        user = f"bench-user-{k % max(1, keys // 2 or 1)}"
        if k < max(1, keys // 2 or 1):
            admin_call(base, master_key, "/user/new", {"user_id": user, **limits})
        fields = {
            **limits,
            "user_id": user,
            "team_id": f"bench-team-{k % teams}",
            "model_rpm_limit": dict.fromkeys(models, UNREACHED["rpm_limit"]),
            "model_tpm_limit": dict.fromkeys(models, UNREACHED["tpm_limit"]),
        }
        out.append(admin_call(base, master_key, "/key/generate", fields)["key"])
    return out
