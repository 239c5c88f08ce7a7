"""The deployment files, checked against the code they deploy.

No Docker engine or Helm binary runs on CI, so the compose file, the Dockerfile and the chart
are parsed and cross-checked: every command line parses with the CLI's own parser, ports
agree, environment variables are ones the code reads, the config loads, and every value the
chart's templates use exists. nginx, when installed, runs for real in front of real sidecars.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from ratelimiter.cli import _parser
from ratelimiter.engine.embedded import free_port
from ratelimiter.gateway.config import load_config
from ratelimiter.testing.fake_upstream import FakeUpstream

from .conftest import MASTER_KEY, running_sidecar, running_upstream

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "ratelimiter"
SIDECAR_PORT = 4000
STRONG_KEY = "sk-Vx3qL9pT2mZ8rW4nB7yK1cF6hJ0dS5aG"
CHAT_SERVED = r'ratelimiter_requests_total\{route="/v1/chat/completions",status="200"\} (\S+)'
ENV_READ = {"REDIS_URL", "RATELIMITER_MASTER_KEY", "RATELIMITER_END_USER_BUDGET_ID"}


def parse_cli(args: list[str]) -> Any:
    """The CLI's own parser; an unknown flag fails the test instead of exiting."""
    parser = _parser()
    parser.exit = lambda status=0, message=None: pytest.fail(f"{args}: {message}")  # type: ignore[method-assign]
    parser.error = lambda message: pytest.fail(f"{args}: {message}")  # type: ignore[method-assign]
    return parser.parse_args(args)


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def exec_form(instruction: str) -> list[str]:
    match = re.search(rf"^{instruction} (\[.*\])$", dockerfile(), re.MULTILINE)
    assert match, f"the Dockerfile has no exec-form {instruction}"
    return json.loads(match.group(1))


def test_dockerfile_runs_the_sidecar_on_its_exposed_port_as_non_root() -> None:
    args = parse_cli(exec_form("CMD"))
    assert exec_form("ENTRYPOINT") == ["ratelimiter"]
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", SIDECAR_PORT)
    assert re.search(rf"^EXPOSE {SIDECAR_PORT}$", dockerfile(), re.MULTILINE)
    assert re.search(r"^USER (?!root)\w+", dockerfile(), re.MULTILINE)
    assert "/health/liveliness" in dockerfile()
    copied = re.findall(r"^COPY (\S+) ", dockerfile(), re.MULTILINE)
    for path in copied:
        if not path.startswith("--"):
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"
    assert args.config == "/etc/ratelimiter/config.yaml"


def test_compose_stack_has_redis_sidecars_nginx_and_upstream_that_agree() -> None:
    services = compose()["services"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[1:3] == ["--appendonly", "yes"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    sidecars = [
        name for name, s in services.items() if s.get("build") and name.startswith("sidecar")
    ]
    assert len(sidecars) >= 2
    nginx_servers = re.findall(r"server (\S+):(\d+)", (DEPLOY / "nginx.conf").read_text())
    assert sorted(host for host, _ in nginx_servers) == sorted(sidecars)
    assert {int(port) for _, port in nginx_servers} == {SIDECAR_PORT}
    for name in sidecars:
        env = services[name]["environment"]
        assert set(env) <= ENV_READ, f"{name} sets variables the sidecar never reads"
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        assert "${RATELIMITER_MASTER_KEY:?" in env["RATELIMITER_MASTER_KEY"]  # never a default
        mount = services[name]["volumes"][0].split(":")
        assert (ROOT / mount[0]).resolve() == (DEPLOY / "config.yaml").resolve()
        assert mount[1] == parse_cli(exec_form("CMD")).config
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    upstream = parse_cli(services["upstream"]["command"])
    assert upstream.command == "fake-upstream" and upstream.host == "0.0.0.0"
    config = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    api_base = config["model_list"][0]["litellm_params"]["api_base"]
    assert api_base == f"http://upstream:{upstream.port}/v1"
    published = services["nginx"]["ports"][0].split(":")
    assert int(published[-1]) == int(
        re.search(r"listen (\d+);", (DEPLOY / "nginx.conf").read_text()).group(1)
    )


def test_deploy_config_loads_with_the_environment_compose_gives_it() -> None:
    env = {"REDIS_URL": "redis://redis:6379/0", "RATELIMITER_MASTER_KEY": STRONG_KEY}
    settings = load_config(DEPLOY / "config.yaml", env=env)
    assert settings.redis_url == env["REDIS_URL"]
    assert settings.on_redis_error == "deny"
    assert [m.model_name for m in settings.models] == ["gpt-4o-mini"]


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f".Values.{dotted} is not in values.yaml"
        node = node[part]
    return node


def test_chart_templates_use_only_values_that_exist() -> None:
    values = _values()
    used = set()
    for template in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()))
    assert used
    for dotted in used:
        _lookup(values, dotted)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "ratelimiter"


def _render(text: str, values: dict[str, Any]) -> str:
    """Enough of Helm for the container's args: ``{{ .Values.x }}`` with its value."""
    return re.sub(
        r"\{\{\s*\.Values\.([A-Za-z0-9_.]+)\s*\}\}",
        lambda m: str(_lookup(values, m.group(1))),
        text,
    )


def test_chart_runs_the_cli_with_probes_and_secret_env() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    values = _values()
    block = re.search(r"args:\n((?:\s+- .+\n)+)", deployment).group(1)
    args = [yaml.safe_load(line.strip()[2:]) for line in _render(block, values).splitlines()]
    parsed = parse_cli([str(a) for a in args])
    assert (parsed.command, parsed.host) == ("serve", "0.0.0.0")
    assert parsed.port == values["service"]["port"] == SIDECAR_PORT
    env_names = set(re.findall(r"- name: ([A-Z_]+)\n\s+valueFrom:\n\s+secretKeyRef", deployment))
    assert env_names == {"REDIS_URL", "RATELIMITER_MASTER_KEY"}
    probes = dict(
        re.findall(r"(livenessProbe|readinessProbe):\n\s+httpGet: \{path: (\S+),", deployment)
    )
    assert probes == {"livenessProbe": "/health/liveliness", "readinessProbe": "/health/readiness"}
    secret = (CHART / "templates" / "secret.yaml").read_text()
    assert "redis-url:" in secret and "master-key:" in secret
    assert values["podSecurityContext"]["runAsUser"] == int(
        re.search(r"--uid (\d+)", dockerfile()).group(1)
    )


def test_chart_config_loads(tmp_path: Path) -> None:
    """The config the chart's ConfigMap mounts loads, the provider key coming from extraEnv."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_values()["config"]))
    env = {"RATELIMITER_MASTER_KEY": STRONG_KEY, "OPENAI_API_KEY": "sk-provider"}
    assert [m.model_name for m in load_config(config, env=env).models] == ["gpt-4o-mini"]


async def test_probe_paths_answer_on_a_real_sidecar(settings, redis_url: str) -> None:
    async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as http:
        for path in ("/health/liveliness", "/health/readiness"):
            async with http.get(base + path) as response:
                assert response.status == 200, path


# -- nginx, for real --------------------------------------------------------------------


@contextlib.contextmanager
def running_nginx(backends: list[str], tmp: Path) -> Iterator[str]:
    """deploy/nginx.conf with the sidecars' real addresses and private paths."""
    text = (DEPLOY / "nginx.conf").read_text()
    servers = "\n".join(f"    server {b} max_fails=3 fail_timeout=5s;" for b in backends)
    text = re.sub(r"(\s+server sidecar-\d+:\d+[^\n]*\n)+", "\n" + servers + "\n", text)
    port = free_port()
    text = text.replace("listen 4000;", f"listen 127.0.0.1:{port};")
    temp = "".join(
        f"  {kind}_temp_path {tmp / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp, 1)
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    process = subprocess.Popen(
        [
            shutil.which("nginx") or "nginx",
            "-p",
            str(tmp),
            "-c",
            str(conf),
            "-g",
            f"daemon off; pid {tmp / 'nginx.pid'}; error_log {tmp / 'error.log'};",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {process.stderr.read().decode()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@contextlib.asynccontextmanager
async def two_sidecars(settings, redis_url: str) -> AsyncIterator[list[str]]:
    async with running_sidecar(settings, redis_url) as a, running_sidecar(settings, redis_url) as b:
        yield [a, b]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
async def test_nginx_config_balances_real_sidecars_and_streams(
    settings, redis_url: str, tmp_path: Path
) -> None:
    fake = FakeUpstream(seed=3)
    async with running_upstream(fake) as upstream:
        from dataclasses import replace

        from ratelimiter.gateway.config import Deployment

        model = Deployment(
            model_name="m",
            model="openai/m",
            api_base=upstream,
            api_key="x",
            input_cost_per_token=1e-6,
            output_cost_per_token=2e-6,
        )
        settings = replace(settings, models=(model,))
        async with two_sidecars(settings, redis_url) as backends, aiohttp.ClientSession() as http:
            hostports = [b.removeprefix("http://") for b in backends]
            with running_nginx(hostports, tmp_path) as base:
                headers = {"Authorization": f"Bearer {MASTER_KEY}"}
                async with http.get(base + "/health/readiness") as response:
                    assert response.status == 200
                key = await _post(http, base + "/key/generate", headers, {"rpm_limit": 6})
                auth = {"Authorization": f"Bearer {key['key']}"}
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                statuses = []
                for _ in range(10):
                    async with http.post(
                        base + "/v1/chat/completions", json=body, headers=auth
                    ) as r:
                        statuses.append(r.status)
                # Round-robin over two sidecars, one shared limit: exactly 6 admitted.
                assert statuses.count(200) == 6 and statuses.count(429) == 4
                chunks = []
                stream_key = await _post(http, base + "/key/generate", headers, {})
                stream_auth = {"Authorization": f"Bearer {stream_key['key']}"}
                async with http.post(
                    base + "/v1/chat/completions",
                    json={**body, "stream": True, "max_tokens": 5},
                    headers=stream_auth,
                ) as r:
                    assert r.headers["Content-Type"].startswith("text/event-stream")
                    async for chunk in r.content.iter_any():
                        chunks.append(chunk)
                text = b"".join(chunks).decode()
                assert text.count("data: {") >= 5 and text.rstrip().endswith("data: [DONE]")
                for backend in backends:  # nginx spread the traffic over both sidecars
                    async with http.get(backend + "/metrics") as r:
                        served = re.search(CHAT_SERVED, await r.text())
                    assert served and float(served.group(1)) >= 2, backend
    assert fake.requests == 7


async def _post(http: aiohttp.ClientSession, url: str, headers: dict, body: dict) -> dict:
    async with http.post(url, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def test_docs_give_the_commands_the_files_expect() -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert "docs/deployment.md" in (ROOT / "README.md").read_text()
    for command in ("cp deploy/.env.example .env", "docker compose up --build", "helm install"):
        assert command in docs, command
    assert "RATELIMITER_MASTER_KEY=" in (DEPLOY / ".env.example").read_text()
