"""The config file: LiteLLM's format, environment overrides, and errors a person can act on."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ratelimiter.gateway.config import ConfigError, load_config

MASTER = "sk-9f2c1e7a4b6d8e0f1a3c"

GOOD = f"""
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: os.environ/UPSTREAM_BASE
      api_key: os.environ/UPSTREAM_KEY
      rpm: 100
      tpm: 20000
      input_cost_per_token: 0.0000025
      output_cost_per_token: 0.00001
    model_info:
      access_groups: ["beta-models"]
  - model_name: text-embedding-3-small
    litellm_params:
      model: openai/text-embedding-3-small
general_settings:
  master_key: {MASTER}
litellm_settings:
  max_budget: 100
  budget_duration: 30d
  max_end_user_budget_id: end-users
ratelimiter_settings:
  key_prefix: "prod:"
  timezone: Europe/Berlin
  on_redis_error: allow
"""
ENV = {"UPSTREAM_BASE": "http://upstream:8000/v1", "UPSTREAM_KEY": "sk-upstream"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_litellm_format(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, GOOD), env=ENV)
    first = settings.models[0]
    assert (first.model_name, first.model, first.api_base, first.api_key) == (
        "gpt-4o",
        "openai/gpt-4o",
        "http://upstream:8000/v1",
        "sk-upstream",
    )
    assert (first.rpm, first.tpm, first.input_cost_per_token) == (100, 20000, 0.0000025)
    assert settings.access_groups == {"beta-models": {"gpt-4o"}}
    assert (settings.max_budget, str(settings.budget_duration)) == (100, "30d")
    assert settings.end_user_budget_id == "end-users"
    assert (settings.key_prefix, settings.timezone, settings.on_redis_error) == (
        "prod:",
        "Europe/Berlin",
        "allow",
    )
    assert settings.redis_url is None  # the embedded server then


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        **ENV,
        "REDIS_URL": "redis://cache:6379/1",
        "RATELIMITER_MASTER_KEY": "sk-env-0f9e8d7c6b5a4321",
        "RATELIMITER_END_USER_BUDGET_ID": "from-env",
    }
    settings = load_config(write(tmp_path, GOOD), env=env)
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.master_key == "sk-env-0f9e8d7c6b5a4321"
    assert settings.end_user_budget_id == "from-env"


def test_unknown_keys_warn_once_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = GOOD + "\nrouter_settings:\n  routing_strategy: simple\nsome_future_section: 1\n"
    text = text.replace("  max_budget: 100", "  max_budget: 100\n  success_callback: [langfuse]")
    with caplog.at_level(logging.WARNING, logger="ratelimiter.config"):
        load_config(write(tmp_path, text), env=ENV)
    messages = [r.getMessage() for r in caplog.records]
    assert any("(top level).some_future_section: unknown setting, ignored" in m for m in messages)
    assert any(
        "litellm_settings.success_callback: LiteLLM's, accepted, not used" in m for m in messages
    )
    assert any("(top level).router_settings: LiteLLM's, accepted, not used" in m for m in messages)
    assert len(messages) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("model_list:", "model_lsit:"),
            "(top level).model_lsit: unknown setting: did you mean 'model_list'?",
        ),
        (
            ("litellm_params:", "litellm_param:"),
            "model_list[0].litellm_param: unknown setting: did you mean 'litellm_params'?",
        ),
        (("rpm: 100", "rmp: 100"), "litellm_params.rmp: unknown setting: did you mean 'rpm'?"),
        (("on_redis_error: allow", "on_redis_eror: allow"), "did you mean 'on_redis_error'?"),
        (
            ("on_redis_error: allow", "colour: blue"),
            "ratelimiter_settings.colour: unknown setting; the settings are",
        ),
        (("model: openai/gpt-4o", "api_version: v1"), "litellm_params.model: is required"),
        (
            ("model: openai/gpt-4o", "model: azure/gpt-4o"),
            "api_base: is required for 'azure/gpt-4o'",
        ),
    ],
)
def test_a_typo_is_an_error_with_the_closest_name(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    """A warning let the sidecar run with no models, no upstream or no limit."""
    assert change[0] in GOOD
    text = GOOD.replace(*change)
    if "azure" in change[1]:
        text = re.sub(r"      api_base: .*\n", "", text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text), env=ENV)


def test_no_models_is_a_warning_that_says_how_to_add_one(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ratelimiter.cli", "--log-format", "text", "serve", "--port", "0"],
        cwd=tmp_path,
        env={**os.environ, "RATELIMITER_MASTER_KEY": MASTER, "REDIS_URL": "redis://127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "no models: every request will be a 404. Add a model_list entry" in run.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("rpm: 100", "rpm: lots"),
            "model_list[0].litellm_params.rpm: must be a non-negative whole number, got 'lots'",
        ),
        (
            ("budget_duration: 30d", "budget_duration: fortnight"),
            "litellm_settings.budget_duration: invalid duration 'fortnight'",
        ),
        (
            ("max_budget: 100", "max_budget: -5"),
            "litellm_settings.max_budget: must be a non-negative number, got -5",
        ),
        (
            ("on_redis_error: allow", "on_redis_error: maybe"),
            "ratelimiter_settings.on_redis_error: must be deny or allow",
        ),
        (
            ("timezone: Europe/Berlin", "timezone: Mars/Base"),
            "ratelimiter_settings.timezone: unknown time zone",
        ),
        (
            ("- model_name: gpt-4o\n", "- model_nam: gpt-4o\n"),
            "model_list[0].model_nam: unknown setting: did you mean 'model_name'?",
        ),
        (
            (f"master_key: {MASTER}", "master_key: sk-1234"),
            "general_settings.master_key: refused as weak: 'sk-1234' is a published example key",
        ),
        ((f"master_key: {MASTER}", "master_key: sk-short"), "shorter than 16 characters"),
        (
            (f"master_key: {MASTER}", "master_key: os.environ/NOPE"),
            "general_settings.master_key: environment variable NOPE is not set",
        ),
        (("model_list:", "model_list: 5\nx:"), "model_list: must be a list of models"),
    ],
)
def test_errors_name_file_path_and_problem(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as raised:
        load_config(path, env=ENV)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config.yaml: line 3, column \d+: not valid YAML"):
        load_config(write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n"), env=ENV)


def test_missing_file_and_missing_master_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read it"):
        load_config(tmp_path / "nope.yaml", env=ENV)
    with pytest.raises(ConfigError, match="master_key: is required"):
        load_config(None, env={})


def test_weak_key_accepted_only_when_asked(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace(MASTER, "sk-1234"))
    assert load_config(path, env=ENV, allow_weak_master_key=True).master_key == "sk-1234"


def test_cli_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("rpm: 100", "rpm: -1"))
    result = subprocess.run(
        [sys.executable, "-m", "ratelimiter.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**ENV, "PATH": ""},
        timeout=30,
    )
    assert result.returncode == 2
    assert f"configuration error: {path}: model_list[0].litellm_params.rpm" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_generates_and_saves_a_master_key_once(tmp_path: Path) -> None:
    config = write(tmp_path, f"ratelimiter_settings:\n  data_dir: {tmp_path / 'data'}\n")
    assert load_config(config, env={}, master_key="optional").master_key == ""
    first = load_config(config, env={}, master_key="create").master_key
    saved = tmp_path / "data" / "master_key"
    assert saved.read_text().strip() == first and first.startswith("sk-")
    assert saved.stat().st_mode & 0o777 == 0o600  # readable by its owner only
    assert load_config(config, env={}, master_key="create").master_key == first  # kept
    assert load_config(config, env={}).master_key == first  # and read back by others


def test_a_weak_key_from_the_environment_is_named_as_such(tmp_path: Path) -> None:
    config = write(tmp_path, "general_settings:\n  master_key: sk-strong-and-long-4d8e2a\n")
    with pytest.raises(ConfigError, match=r"^RATELIMITER_MASTER_KEY: refused as weak"):
        load_config(config, env={"RATELIMITER_MASTER_KEY": "sk-1234"})


def test_end_user_headers_in_litellms_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    general = f"""general_settings:
  master_key: {MASTER}
  user_header_name: X-Legacy-User
  user_header_mappings:
    - header_name: X-OpenWebUI-User-Id
      litellm_user_role: internal_user
    - header_name: X-OpenWebUI-User-Email
      litellm_user_role: customer
"""
    text = GOOD.replace(f"general_settings:\n  master_key: {MASTER}\n", general)
    with caplog.at_level(logging.WARNING, logger="ratelimiter"):
        settings = load_config(write(tmp_path, text), env=ENV)
    assert settings.end_user_headers == ("x-openwebui-user-email", "x-legacy-user")
    assert "user_header_mappings[0]: role internal_user is accepted, not used" in caplog.text
    assert load_config(write(tmp_path, GOOD), env=ENV).end_user_headers == ()


@pytest.mark.parametrize(
    ("mappings", "message"),
    [
        ("5", "user_header_mappings: must be a list"),
        ("[{header_name: 'a b', litellm_user_role: customer}]", "must be an HTTP header name"),
        ("[{litellm_user_role: customer}]", "header_name: is required"),
        ("[{header_name: x, litellm_user_role: admin}]", "must be customer or internal_user"),
    ],
)
def test_bad_end_user_headers_are_named(tmp_path: Path, mappings: str, message: str) -> None:
    general = f"general_settings:\n  master_key: {MASTER}\n  user_header_mappings: {mappings}\n"
    text = GOOD.replace(f"general_settings:\n  master_key: {MASTER}\n", general)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text), env=ENV)


def test_budget_alert_thresholds(tmp_path: Path) -> None:
    text = GOOD.replace(
        "  on_redis_error: allow\n",
        "  on_redis_error: allow\n  budget_alert_thresholds: [0.8, 0.5, 0.8]\n",
    )
    assert load_config(write(tmp_path, text), env=ENV).budget_alert_thresholds == (0.5, 0.8)
    for bad in ("[80]", "[0]", "0.5"):
        text = GOOD.replace(
            "  on_redis_error: allow\n",
            f"  on_redis_error: allow\n  budget_alert_thresholds: {bad}\n",
        )
        with pytest.raises(ConfigError, match="budget_alert_thresholds"):
            load_config(write(tmp_path, text), env=ENV)
