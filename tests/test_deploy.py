"""The deployment files, checked against the code they deploy.

No Docker engine or Helm binary runs on CI, so the compose file, the Dockerfile and the chart
are parsed and cross-checked: every command line parses with the CLI's own parser, ports
agree, environment variables are ones the code reads, the config loads, and every value the
chart's templates use exists. nginx, when installed, runs for real in front of real sidecars.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from ratelimiter.cli import _parser
from ratelimiter.engine.embedded import free_port
from ratelimiter.gateway.config import Settings, load_config
from ratelimiter.testing.fake_upstream import FakeUpstream

from .conftest import MASTER_KEY, running_sidecar, running_upstream

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "ratelimiter"
SIDECAR_PORT = 4000
STRONG_KEY = "sk-Vx3qL9pT2mZ8rW4nB7yK1cF6hJ0dS5aG"
CHAT_SERVED = r'ratelimiter_requests_total\{route="/v1/chat/completions",status="200"\} (\S+)'
ENV_READ = {
    "REDIS_URL",
    "RATELIMITER_MASTER_KEY",
    "RATELIMITER_END_USER_BUDGET_ID",
    "RATELIMITER_LEDGER_SINK",
}


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
    # The optional PostgreSQL: only with its profile, and the URL .env.example gives (with its
    # COMPOSE_PROFILES line) names that service, its user, database and default password.
    postgres = services["postgres"]
    assert postgres["profiles"] == ["ledger"] and "ports" not in postgres
    example = (DEPLOY / ".env.example").read_text()
    assert "# COMPOSE_PROFILES=ledger" in example
    url = re.search(r"^# RATELIMITER_LEDGER_SINK=(\S+)$", example, re.MULTILINE).group(1)
    pg = postgres["environment"]
    password = re.fullmatch(r"\$\{POSTGRES_PASSWORD:-(\w+)\}", pg["POSTGRES_PASSWORD"]).group(1)
    assert url == f"postgresql://{pg['POSTGRES_USER']}:{password}@postgres:5432/{pg['POSTGRES_DB']}"
    for name in sidecars:
        assert services[name]["environment"]["RATELIMITER_LEDGER_SINK"] == (
            "${RATELIMITER_LEDGER_SINK:-}"
        )
        assert "postgres" not in services[name]["depends_on"]  # it starts without the profile
    env = {"REDIS_URL": "redis://redis:6379/0", "RATELIMITER_MASTER_KEY": STRONG_KEY}
    assert load_config(DEPLOY / "config.yaml", env=env).ledger_sink is None
    with_sink = load_config(DEPLOY / "config.yaml", env={**env, "RATELIMITER_LEDGER_SINK": url})
    assert with_sink.ledger_sink == url
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


# -- the chart, rendered by Helm's own engine --------------------------------------------

RELEASE = "rl"
FULLNAME = f"{RELEASE}-ratelimiter"
# The least an install needs (docs/deployment.md): Redis and a master key.
REQUIRED = {"secret": {"redisUrl": "redis://redis-master:6379/0", "masterKey": STRONG_KEY}}
API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "StatefulSet": "apps/v1",
}


def render_chart(values: dict[str, Any] | None = None) -> dict[str, str]:
    """``helm template``: the chart's templates rendered with Helm's engine (Go templates and
    Sprig), its values.yaml merged under ``values``; template path -> text."""
    helm = pytest.importorskip(
        "helm_python.chart", reason="Helm's engine comes with helm-python-sdk (the test extra)"
    )
    return helm.Chart.load(str(CHART)).render(
        values, name=RELEASE, namespace="default", is_install=True
    )


def manifests(rendered: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The rendered objects: the sidecar's by kind (at most one of each), the optional
    PostgreSQL's as ``postgresql/<kind>``."""
    objects: dict[str, dict[str, Any]] = {}
    for path, text in rendered.items():
        if not path.endswith(".yaml"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                kind, name = document["kind"], document["metadata"]["name"]
                label = kind if name == FULLNAME else f"{name.removeprefix(FULLNAME + '-')}/{kind}"
                assert label not in objects, f"two {label}s"
                objects[label] = document
    return objects


def _secret_value(
    ref: dict[str, Any], objects: dict[str, dict[str, Any]], outside: dict[str, dict[str, str]]
) -> str:
    """What a secretKeyRef gives the pod: a Secret the chart makes, or one the docs tell the
    user to make (``outside``); any other reference leaves the pod unable to start."""
    made = [o for o in objects.values() if o["kind"] == "Secret"]
    named = [o for o in made if o["metadata"]["name"] == ref["name"]]
    if named:
        data = named[0]["stringData"]
    else:
        assert ref["name"] in outside, f"the pod reads Secret {ref['name']}, which nobody makes"
        data = outside[ref["name"]]
    assert ref["key"] in data, f"Secret {ref['name']} has no key {ref['key']}"
    return data[ref["key"]]


def check_objects(
    objects: dict[str, dict[str, Any]], outside: dict[str, dict[str, str]] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Checks the objects' structure and that every reference between them resolves; returns
    the sidecar container and the environment it would start with."""
    outside = outside or {}
    for label, obj in objects.items():
        assert obj["apiVersion"] == API_VERSIONS[obj["kind"]], label
        assert obj["metadata"]["name"].startswith(FULLNAME), label
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, label
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    (container,) = pod["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["ports"]} <= port_names
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        assert (
            volumes[mount["name"]]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
        )
    if "HorizontalPodAutoscaler" in objects:
        target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
    names = [entry["name"] for entry in container["env"]]
    assert len(names) == len(set(names)), f"a variable is set twice: {names}"
    env = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            env[entry["name"]] = _secret_value(entry["valueFrom"]["secretKeyRef"], objects, outside)
    assert set(env) >= {"REDIS_URL", "RATELIMITER_MASTER_KEY"}
    return container, env


def load_pod_config(
    objects: dict[str, dict[str, Any]], container: dict[str, Any], env: dict[str, str], tmp: Path
) -> Settings:
    """The config the pod mounts, loaded as the pod's ``ratelimiter serve`` loads it."""
    args = parse_cli([str(a) for a in container["args"]])
    (mount,) = container["volumeMounts"]
    config_path = Path(args.config)
    assert config_path.parent == Path(mount["mountPath"])
    path = tmp / config_path.name
    path.write_text(objects["ConfigMap"]["data"][config_path.name])
    return load_config(path, env=env)


def test_chart_names_what_an_install_must_set() -> None:
    helm = pytest.importorskip("helm_python.errors", reason="helm-python-sdk is not installed")
    with pytest.raises(helm.HelmRenderError, match=r"secret\.redisUrl is required"):
        render_chart()


def test_chart_passes_helm_lint() -> None:
    helm = pytest.importorskip("helm_python.chart", reason="helm-python-sdk is not installed")
    with_database = {**REQUIRED, "postgresql": {"enabled": True, "password": PG_PASSWORD}}
    for values in (REQUIRED, with_database):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_chart_defaults_render_pods_that_start(tmp_path: Path) -> None:
    """Only Redis and the master key given (no provider key): every object is well formed,
    every reference resolves, and the mounted config loads with the pod's environment."""
    objects = manifests(render_chart(REQUIRED))
    assert set(objects) == {"ConfigMap", "Secret", "Service", "Deployment"}
    container, env = check_objects(objects)
    settings = load_pod_config(objects, container, env, tmp_path)
    assert settings.redis_url == REQUIRED["secret"]["redisUrl"]
    assert settings.master_key == STRONG_KEY
    assert [m.model_name for m in settings.models] == ["gpt-4o-mini"]
    assert objects["Deployment"]["spec"]["replicas"] == _values()["replicaCount"]


def documented_secrets() -> dict[str, dict[str, str]]:
    """The Secrets docs/deployment.md tells the user to create, with their keys."""
    docs = (ROOT / "docs" / "deployment.md").read_text().replace("\\\n", " ")
    found = {}
    for name, literals in re.findall(
        r"kubectl create secret generic (\S+)((?:\s+--from-literal=\S+)+)", docs
    ):
        keys = re.findall(r"--from-literal=([\w-]+)=", literals)
        found[name] = {key: f"sk-{key.lower()}-from-the-secret-0123456789" for key in keys}
    return found


def test_chart_takes_provider_keys_from_the_documented_secret(tmp_path: Path) -> None:
    """The install docs/deployment.md gives: its Secrets, existingSecret, providerSecret."""
    outside = documented_secrets()
    assert len(outside) == 3, outside
    (secret,) = [name for name, keys in outside.items() if "master-key" in keys]
    (providers,) = [name for name, keys in outside.items() if "OPENAI_API_KEY" in keys]
    outside[secret]["redis-url"] = "redis://redis-master:6379/0"
    outside[secret]["master-key"] = STRONG_KEY
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for setting in (f"existingSecret={secret}", f"providerSecret={providers}"):
        assert setting in docs, setting
    values = {
        "existingSecret": secret,
        "providerSecret": providers,
        "autoscaling": {"enabled": True},
    }
    objects = manifests(render_chart(values))
    assert "Secret" not in objects and "HorizontalPodAutoscaler" in objects
    container, env = check_objects(objects, outside)
    settings = load_pod_config(objects, container, env, tmp_path)
    (model,) = settings.models
    assert model.api_key == outside[providers]["OPENAI_API_KEY"]
    # A variable given in extraEnv comes from there, not a second time from providerSecret.
    extra = {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "o", "key": "k"}}}
    objects = manifests(render_chart({**values, "extraEnv": [extra]}))
    container, env = check_objects(objects, {**outside, "o": {"k": "sk-from-extra-env"}})
    (model,) = load_pod_config(objects, container, env, tmp_path).models
    assert model.api_key == "sk-from-extra-env"


PG_PASSWORD = "pg-Vx3qL9pT2mZ8rW4nB7yK1c"


def test_chart_postgresql_is_what_the_sink_points_at(tmp_path: Path) -> None:
    """postgresql.enabled: a StatefulSet, its headless Service and its Secret, and the pods'
    RATELIMITER_LEDGER_SINK names that Service, port and password; the sidecar's own Service
    never selects the database's pod."""
    values = {**REQUIRED, "postgresql": {"enabled": True, "password": PG_PASSWORD}}
    objects = manifests(render_chart(values))
    assert {"postgresql/StatefulSet", "postgresql/Service", "postgresql/Secret"} <= set(objects)
    container, env = check_objects(objects)
    settings = load_pod_config(objects, container, env, tmp_path)
    database, service = objects["postgresql/StatefulSet"], objects["postgresql/Service"]
    host = service["metadata"]["name"]
    assert settings.ledger_sink == f"postgresql://ratelimiter:{PG_PASSWORD}@{host}:5432/ratelimiter"
    pod = database["spec"]["template"]
    assert database["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    sidecar_selector = objects["Service"]["spec"]["selector"].items()
    assert not sidecar_selector <= pod["metadata"]["labels"].items()
    (postgres,) = pod["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in postgres["ports"]} == {"postgresql": 5432}
    assert service["spec"]["ports"][0]["targetPort"] == "postgresql"
    pg_env = {e["name"]: e for e in postgres["env"]}
    assert pg_env["POSTGRES_USER"]["value"] == "ratelimiter" == pg_env["POSTGRES_DB"]["value"]
    ref = pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert _secret_value(ref, objects, {}) == PG_PASSWORD
    (claim,) = database["spec"]["volumeClaimTemplates"]
    assert postgres["volumeMounts"][0]["name"] == claim["metadata"]["name"]


def test_chart_ledger_sink_settings_are_checked() -> None:
    helm = pytest.importorskip("helm_python.errors", reason="helm-python-sdk is not installed")
    weak = {**REQUIRED, "postgresql": {"enabled": True, "password": "short"}}
    with pytest.raises(helm.HelmRenderError, match=r"postgresql\.password: at least 16"):
        render_chart(weak)
    with pytest.raises(helm.HelmRenderError, match=r"postgresql\.password is required"):
        render_chart({**REQUIRED, "postgresql": {"enabled": True}})
    both = {
        **REQUIRED,
        "postgresql": {"enabled": True, "password": PG_PASSWORD},
        "ledgerSink": {"existingSecret": "mine"},
    }
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render_chart(both)
    (container,) = manifests(render_chart(REQUIRED))["Deployment"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert "RATELIMITER_LEDGER_SINK" not in {e["name"] for e in container["env"]}


def test_chart_takes_the_sink_from_the_documented_secret(tmp_path: Path) -> None:
    outside = documented_secrets()
    (ledger,) = [name for name, keys in outside.items() if "ledger-sink" in keys]
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert f"ledgerSink.existingSecret={ledger}" in docs
    outside[ledger]["ledger-sink"] = "postgresql://rl:pw@db.example:5432/spend"
    objects = manifests(render_chart({**REQUIRED, "ledgerSink": {"existingSecret": ledger}}))
    assert not any(label.startswith("postgresql/") for label in objects)
    container, env = check_objects(objects, outside)
    settings = load_pod_config(objects, container, env, tmp_path)
    assert settings.ledger_sink == "postgresql://rl:pw@db.example:5432/spend"


def test_chart_runs_the_cli_with_probes_and_secret_env() -> None:
    deployment = manifests(render_chart(REQUIRED))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    parsed = parse_cli([str(a) for a in container["args"]])
    values = _values()
    assert (parsed.command, parsed.host) == ("serve", "0.0.0.0")
    assert parsed.port == values["service"]["port"] == SIDECAR_PORT
    assert container["ports"][0]["containerPort"] == SIDECAR_PORT
    assert parsed.shutdown_timeout + 5 == pod["terminationGracePeriodSeconds"]
    from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secret == {"REDIS_URL", "RATELIMITER_MASTER_KEY"}
    probes = {
        name: container[name]["httpGet"]["path"] for name in ("livenessProbe", "readinessProbe")
    }
    assert probes == {"livenessProbe": "/health/liveliness", "readinessProbe": "/health/readiness"}
    assert pod["securityContext"]["runAsUser"] == int(
        re.search(r"--uid (\d+)", dockerfile()).group(1)
    )


def notes_commands(notes: str) -> list[str]:
    """The curl lines of the chart's NOTES, continuation lines joined."""
    joined = notes.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]


async def run_curl(command: str, env: dict[str, str]) -> tuple[int, str]:
    """One NOTES line through a real shell and curl; the HTTP status and the body."""
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command + " -sS -w '\\n%{http_code}'",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    body, _, status = out.decode().rpartition("\n")
    return int(status), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_chart_notes_commands_work_on_a_sidecar_with_the_charts_config(
    ns: str, redis_url: str, tmp_path: Path
) -> None:
    """Each curl line the chart prints after an install, run as printed against a sidecar
    loaded from the chart's own config (its model pointed at the fake upstream)."""
    rendered = render_chart(REQUIRED)
    objects = manifests(rendered)
    container, env = check_objects(objects)
    settings = load_pod_config(objects, container, env, tmp_path)
    notes = rendered["ratelimiter/templates/NOTES.txt"]
    secret = objects["Secret"]
    assert f"get secret {secret['metadata']['name']} " in notes
    assert "{.data.master-key}" in notes and "master-key" in secret["stringData"]
    commands = notes_commands(notes)
    assert len(commands) == 3, notes
    fake = FakeUpstream(seed=5)
    async with running_upstream(fake) as upstream:
        models = tuple(replace(m, api_base=upstream) for m in settings.models)
        settings = replace(settings, models=models, key_prefix=f"t:{ns}:")
        async with running_sidecar(settings, redis_url) as base:
            shell = {"PATH": os.environ["PATH"], "MASTER_KEY": env["RATELIMITER_MASTER_KEY"]}
            answers = []
            for command in commands:
                command = command.replace(f"http://127.0.0.1:{SIDECAR_PORT}", base)
                status, body = await run_curl(command, shell)
                assert status == 200, (command, body)
                answers.append(json.loads(body))
                shell["KEY"] = answers[-1].get("key", shell.get("KEY", ""))
    assert answers[2]["choices"][0]["message"]["content"]
    assert fake.requests == 1


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
