"""The sidecar's configuration: LiteLLM's proxy ``config.yaml`` for what we implement, plus our
own settings in ``ratelimiter_settings``.

Every error names the file, the path inside it and what is wrong. Unknown keys get one
warning each, not a crash, so a LiteLLM config with features we do not implement still loads.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.durations import Duration, parse_duration, time_zone
from ..engine.embedded import DEFAULT_DATA_DIR
from ..errors import InvalidDuration, RateLimiterError
from ..pricing import PRICE_FIELDS, Price, model_price, price_of
from .bodies import MAX_OUTPUT_TOKENS
from .policy import SCOPE_KINDS
from .priority import MAX_NAME, MAX_PRIORITIES, PriorityReservation

__all__ = ["ConfigError", "Deployment", "Settings", "load_config", "weak_master_key_reason"]

log = logging.getLogger("ratelimiter.config")

ENV_PREFIX = "os.environ/"
KNOWN_WEAK_KEYS = {"sk-1234", "sk-12345", "sk-123456", "sk-admin", "sk-master", "sk-test"}
MIN_MASTER_KEY_LENGTH = 16


class ConfigError(RateLimiterError):
    """The configuration file (or an environment override) is unusable."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Deployment:
    """One entry of ``model_list``: a public model name served by one upstream."""

    model_name: str
    model: str
    api_base: str | None = None
    api_key: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None
    # LiteLLM's names for the cache buckets' prices (dollars per token)
    cache_read_input_token_cost: float | None = None
    cache_creation_input_token_cost: float | None = None
    cache_creation_input_token_cost_above_1hr: float | None = None
    access_groups: tuple[str, ...] = ()
    index: int = 0  # position in model_list: names the deployment's own limits
    # Set on the deployment a request is served by (routing.route), never in model_list:
    # the wildcard model_name it was matched by, with model_name the name requested and
    # model filled in; and the alias the client asked for, when one mapped it here.
    pattern: str | None = None
    alias: str | None = None

    @property
    def price(self) -> Price | None:
        """genai-prices' price of its model (with or without the provider, a dated snapshot
        matched), with what the config sets in its place (pricing.price_of)."""
        return _price(self)

    @property
    def base_url(self) -> str:
        """Where its requests go: api_base, else its provider's own URL."""
        return (
            self.api_base or DEFAULT_BASES.get(self.provider) or DEFAULT_BASES["openai"]
        ).rstrip("/")

    @property
    def speaks_anthropic(self) -> bool:
        """Its upstream speaks Anthropic's Messages API (``model: anthropic/…``)."""
        return self.provider == "anthropic"

    @property
    def provider(self) -> str:
        """The provider part of ``model`` (``anthropic/claude-…``), ``openai`` without one."""
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"

    @property
    def deployment_id(self) -> str:
        """Names the deployment's own rpm/tpm windows. A wildcard entry counts per model it
        fills in (as LiteLLM counts by deployment and model), never per name requested: names
        that fill in the same model share its windows."""
        if self.pattern is not None:
            return f"{self.pattern}#{self.index}:{self.model}"
        return f"{self.model_name}#{self.index}"

    @property
    def label(self) -> str:
        """The model as metrics and once-only warnings name it: for a wildcard entry, the
        upstream model, so that names a client makes up add no label."""
        return self.model if self.pattern is not None else self.model_name


@functools.lru_cache(maxsize=4096)
def _price(deployment: Deployment) -> Price | None:
    maintained = model_price(deployment.model) or model_price(deployment.model_name)
    configured = {name: getattr(deployment, name) for name in PRICE_FIELDS}
    return price_of(configured, maintained) or maintained


@dataclass(frozen=True, slots=True)
class Settings:
    master_key: str
    models: tuple[Deployment, ...] = ()
    max_budget: float | None = None
    budget_duration: Duration | None = None
    end_user_budget_id: str = "default"
    redis_url: str | None = None
    key_prefix: str = "rl:"
    timezone: str = "UTC"
    on_redis_error: str = "deny"
    data_dir: Path = DEFAULT_DATA_DIR
    default_max_tokens: int = 4096
    # how prompt text becomes tokens: "chars" (characters / 4, OpenAI's own estimate) or
    # "bytes" (one token per UTF-8 byte: an upper bound, every BPE token being at least a byte)
    prompt_estimate: str = "chars"
    unpriced_models: str = "free"
    # what token windows count of cache reads: "all" (every token, the default) or
    # "uncached" (cache reads left out, as Anthropic's and OpenAI's own limits count them)
    tpm_counts: str = "all"
    # requests without max_tokens: "capped" holds their estimate capped at what their limits
    # have left (one such request at a time may pass a limit, by its own excess); "strict"
    # sends them with max_tokens set to what their limits afford, so none is ever passed
    budget_enforcement: str = "capped"
    # every limit (but blocks) counted and reported, never enforced: shadow.py
    shadow: bool = False
    upstream_timeout_s: float = 600.0
    # the most a request waits for Redis before it is admitted or refused (all calls together)
    redis_timeout_s: float = 2.0
    lease_ttl_s: float = 60.0
    hold_ttl_s: float = 600.0
    # under on_redis_error: allow, how many unchecked requests may wait to be charged (in
    # memory, until Redis is back) before the rest are refused
    max_unchecked_requests: int = 10_000
    collect_interval_s: float = 5.0
    alert_webhook_url: str | None = None
    # fractions of every max_budget at which to alert (0.5, 0.8, ...), besides soft_budget and
    # exhaustion
    budget_alert_thresholds: tuple[float, ...] = ()
    # scope kind -> share: the windows and budgets of those scopes are admitted from blocks of
    # 1/share of their capacity that this sidecar takes from Redis (engine/blocks.py)
    capacity_blocks: Mapping[str, int] = field(default_factory=dict)
    # where shipped ledger entries go (postgresql://…), and the PostgreSQL schema of the table;
    # None: the ledger stays in Redis until `ratelimiter ledger export --ack`
    ledger_sink: str | None = None
    ledger_sink_schema: str = "ratelimiter"
    # seconds the sink may fall behind (the oldest entry waiting in Redis) before an alert
    ledger_sink_lag_alert_s: float = 300.0
    # headers naming the end user, after LiteLLM's standard two (general_settings'
    # user_header_mappings with role customer, then user_header_name), lower-cased
    end_user_headers: tuple[str, ...] = ()
    # litellm_settings.priority_reservation(_settings): deployments' rpm/tpm split by priority
    priority_reservation: PriorityReservation | None = None
    # LiteLLM's general_settings switch: no tag from the client (header or body), only the
    # key's own (gateway/tags.py)
    reject_clientside_metadata_tags: bool = False
    source: str = "<defaults>"
    extra_warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def access_groups(self) -> dict[str, set[str]]:
        groups: dict[str, set[str]] = {}
        for deployment in self.models:
            for group in deployment.access_groups:
                groups.setdefault(group, set()).add(deployment.model_name)
        return groups


MASTER_KEY_FILE = "master_key"


def _saved_master_key(data_dir: Path, *, create: bool) -> tuple[str | None, str]:
    """The master key saved under the data directory (mode 0600), generated on first use
    when ``create``: the README's walk-through then works in a second terminal, where no
    environment variable was set, through ``ratelimiter key``."""
    path = data_dir / MASTER_KEY_FILE
    try:
        return path.read_text().strip() or None, str(path)
    except FileNotFoundError:
        if not create:
            return None, str(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "sk-" + secrets.token_hex(16)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip(), str(path)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    log.info("generated the master key and saved it in %s (mode 0600): `ratelimiter key`", path)
    return key, str(path)


def weak_master_key_reason(key: str) -> str | None:
    if key in KNOWN_WEAK_KEYS:
        return f"{key!r} is a published example key"
    if len(key) < MIN_MASTER_KEY_LENGTH:
        return f"it is shorter than {MIN_MASTER_KEY_LENGTH} characters"
    if len(set(key.removeprefix("sk-"))) < 6:
        return "it repeats too few distinct characters"
    return None


class _Reader:
    """Walks the parsed YAML, resolving ``os.environ/NAME`` and naming paths in errors."""

    def __init__(
        self, source: str, env: Mapping[str, str], lines: Mapping[str, int] | None = None
    ) -> None:
        self.source = source
        self.env = env
        self.warnings: list[str] = []
        self.lines = lines or {}

    def fail(self, path: str, problem: str) -> ConfigError:
        """The error at ``path``, with the line of the file it is on (or of the nearest
        setting above it that the file has) when the file was read."""
        where = path.removeprefix("(top level).")
        while where and where not in self.lines:
            where = where[: max(where.rfind("."), where.rfind("["), 0)]
        if where:
            problem = f"{problem} (line {self.lines[where]})"
        return ConfigError(self.source, path, problem)

    def value(self, path: str, raw: Any) -> Any:
        if isinstance(raw, str) and raw.startswith(ENV_PREFIX):
            name = raw[len(ENV_PREFIX) :]
            if name not in self.env:
                raise self.fail(path, f"environment variable {name} is not set")
            return self.env[name]
        return raw

    def section(
        self, path: str, raw: Any, known: set[str], litellm: frozenset[str] | None = None
    ) -> dict[str, Any]:
        """A mapping of settings. ``known``: the ones we read. ``litellm``: the ones LiteLLM
        reads and we do not (one warning each); None for a section of our own. A name
        close to one we read is a typo, and an error: a warning let the sidecar run with
        no models, or no limit, from one misspelt key."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(path, f"must be a mapping, got {type(raw).__name__}")
        for key in raw:
            if key in known:
                continue
            where = f"{path}.{key}"
            if litellm is not None and key in litellm:
                self.warnings.append(f"{self.source}: {where}: LiteLLM's, accepted, not used")
                continue
            close = _closest(str(key), known)
            if close is not None:
                raise self.fail(where, f"unknown setting: did you mean {close!r}?")
            if litellm is None:
                raise self.fail(where, f"unknown setting; the settings are: {sorted(known)}")
            self.warnings.append(f"{self.source}: {where}: unknown setting, ignored")
        return {k: self.value(f"{path}.{k}", v) for k, v in raw.items()}

    def string(self, path: str, raw: Any, *, required: bool = False) -> str | None:
        if raw is None:
            if required:
                raise self.fail(path, "is required")
            return None
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise self.fail(path, f"must be a string, got {raw!r}")
        return str(raw)

    def number(self, path: str, raw: Any, *, whole: bool = False) -> Any:
        if raw is None:
            return None
        if isinstance(raw, str):
            with contextlib.suppress(ValueError):
                raw = int(raw) if whole else float(raw)
        kind = int if whole else (int, float)
        if isinstance(raw, bool) or not isinstance(raw, kind) or not 0 <= raw < math.inf:
            what = "a non-negative whole number" if whole else "a non-negative number"
            raise self.fail(path, f"must be {what}, got {raw!r}")
        return raw

    def duration(self, path: str, raw: Any) -> Duration | None:
        if raw is None:
            return None
        try:
            return parse_duration(str(raw))
        except InvalidDuration as exc:
            raise self.fail(path, str(exc)) from None


def _shadow(reader: _Reader, raw: Any) -> bool:
    """ratelimiter_settings.shadow: true or false (also as text, from os.environ/NAME)."""
    value = {"true": True, "false": False}.get(raw.lower(), raw) if isinstance(raw, str) else raw
    if value is None or isinstance(value, bool):
        return bool(value)
    raise reader.fail(
        "ratelimiter_settings.shadow",
        f"must be true (every limit is counted and reported, none enforced) or false, got {raw!r}",
    )


def _lines(text: str) -> dict[str, int]:
    """The line of every setting of a YAML text, by its path (model_list[0].litellm_params.rpm)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    stack: list[tuple[str, Any]] = [("", root)]
    while stack and len(lines) < 100_000:
        path, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    child = f"{path}.{key.value}" if path else str(key.value)
                    lines[child] = key.start_mark.line + 1
                    stack.append((child, value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{path}[{i}]"
                lines[child] = item.start_mark.line + 1
                stack.append((child, item))
    return lines


def _closest(name: str, known: set[str]) -> str | None:
    """The setting ``name`` most likely misspells: close in spelling, or the same letters."""
    for candidate in known:
        if sorted(candidate) == sorted(name):
            return candidate
    found = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return found[0] if found else None


_TOP = {"model_list", "general_settings", "litellm_settings", "ratelimiter_settings"}
_GENERAL = {
    "master_key",
    "user_header_name",
    "user_header_mappings",
    "reject_clientside_metadata_tags",
}
_LITELLM = {
    "max_budget",
    "budget_duration",
    "max_end_user_budget_id",
    "priority_reservation",
    "priority_reservation_settings",
}
# What LiteLLM's config also has (not all of it): accepted with one warning each. The ones
# spelt like a setting we read must be here, or they would be taken for its typo.
_LITELLM_TOP = frozenset(
    {
        "router_settings",
        "environment_variables",
        "callback_settings",
        "credential_list",
        "guardrails",
        "mcp_servers",
        "vector_store_registry",
        "files_settings",
        "finetune_settings",
        "assistant_settings",
        "include",
    }
)
_LITELLM_GENERAL = frozenset(
    {
        "database_url",
        "store_model_in_db",
        "alerting",
        "alerting_threshold",
        "max_parallel_requests",
        "global_max_parallel_requests",
        "disable_spend_logs",
        "allowed_routes",
        "public_routes",
        "background_health_checks",
        "health_check_interval",
        "custom_auth",
        "enable_jwt_auth",
        "ui_access_mode",
        "disable_master_key_return",
        "litellm_key_header_name",
        "pass_through_endpoints",
        "proxy_batch_write_at",
        "database_connection_pool_limit",
        "allow_requests_on_db_unavailable",
        "store_prompts_in_spend_logs",
        "infer_model_from_keys",
    }
)
_LITELLM_SETTINGS = frozenset(
    {
        "drop_params",
        "set_verbose",
        "json_logs",
        "num_retries",
        "request_timeout",
        "callbacks",
        "success_callback",
        "failure_callback",
        "service_callback",
        "cache",
        "cache_params",
        "fallbacks",
        "context_window_fallbacks",
        "content_policy_fallbacks",
        "default_fallbacks",
        "default_team_settings",
        "default_key_generate_params",
        "upperbound_key_generate_params",
        "default_internal_user_params",
        "key_generation_settings",
        "max_internal_user_budget",
        "internal_user_budget_duration",
        "turn_off_message_logging",
        "redact_user_api_key_info",
        "disable_end_user_cost_tracking",
        "modify_params",
        "telemetry",
        "force_ipv4",
        "enable_preview_features",
    }
)
_LITELLM_PARAMS = frozenset(
    {
        "api_version",
        "timeout",
        "stream_timeout",
        "max_retries",
        "organization",
        "custom_llm_provider",
        "input_cost_per_second",
        "output_cost_per_second",
        "input_cost_per_pixel",
        "output_cost_per_pixel",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_region_name",
        "aws_session_name",
        "aws_profile_name",
        "aws_role_name",
        "vertex_project",
        "vertex_location",
        "vertex_credentials",
        "region_name",
        "watsonx_region_name",
        "tags",
        "weight",
        "order",
        "max_parallel_requests",
        "max_budget",
        "budget_duration",
        "drop_params",
        "additional_drop_params",
        "use_in_pass_through",
        "merge_reasoning_content_in_choices",
        "litellm_credential_name",
        "configurable_clientside_auth_params",
        "mock_response",
        "headers",
        "extra_headers",
        "use_litellm_proxy",
    }
)
_LITELLM_MODEL_INFO = frozenset(
    {
        "mode",
        "base_model",
        "description",
        "max_tokens",
        "max_input_tokens",
        "max_output_tokens",
        "input_cost_per_token",
        "output_cost_per_token",
        "team_id",
        "tier",
        "health_check_model",
        "supports_vision",
        "supports_function_calling",
        "supports_tool_choice",
        "supports_reasoning",
        "supports_prompt_caching",
        "supports_response_schema",
    }
)
# Providers whose deployments we may send to OpenAI's own URL when no api_base is given.
# Providers whose own URL serves a deployment without api_base.
DEFAULT_BASES = {
    "openai": "https://api.openai.com/v1",
    "text-completion-openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
}
_OURS = {
    "redis_url",
    "key_prefix",
    "timezone",
    "on_redis_error",
    "data_dir",
    "default_max_tokens",
    "prompt_estimate",
    "unpriced_models",
    "tpm_counts",
    "budget_enforcement",
    "shadow",
    "upstream_timeout",
    "redis_timeout",
    "lease_ttl",
    "hold_ttl",
    "collect_interval",
    "max_unchecked_requests",
    "alert_webhook_url",
    "budget_alert_thresholds",
    "capacity_blocks",
    "ledger_sink",
    "ledger_sink_schema",
    "ledger_sink_lag_alert",
}
_PARAMS = {
    "model",
    "api_base",
    "api_key",
    "rpm",
    "tpm",
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "cache_creation_input_token_cost_above_1hr",
}


_PRIORITY_SETTINGS = {"default_priority", "saturation_threshold", "saturation_check_cache_ttl"}
_PRIORITY_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _fraction(reader: _Reader, path: str, raw: Any) -> float | None:
    value = reader.number(path, raw)
    if value is not None and value > 1:
        raise reader.fail(path, f"must be a fraction from 0 to 1, got {value!r}")
    return None if value is None else float(value)


def _priority_weight(reader: _Reader, path: str, raw: Any) -> tuple[str, float]:
    """A priority's reservation: a fraction, or LiteLLM's {type: percent|rpm|tpm, value}."""
    if not isinstance(raw, dict):
        return "percent", _fraction(reader, path, raw) or 0.0
    unknown = set(raw) - {"type", "value"}
    if unknown:
        raise reader.fail(f"{path}.{sorted(unknown)[0]}", "unknown setting; use type and value")
    kind = reader.value(f"{path}.type", raw.get("type", "percent"))
    if kind not in ("percent", "rpm", "tpm"):
        raise reader.fail(f"{path}.type", f"must be percent, rpm or tpm, got {kind!r}")
    value = reader.value(f"{path}.value", raw.get("value", 1.0))
    if kind == "percent":
        return kind, _fraction(reader, f"{path}.value", value) or 0.0
    return kind, float(reader.number(f"{path}.value", value) or 0)


def _priority_reservation(reader: _Reader, litellm: dict[str, Any]) -> PriorityReservation | None:
    """LiteLLM's priority_reservation and priority_reservation_settings; None when the first is
    not set, as LiteLLM then leaves every deployment unsplit."""
    raw = litellm.get("priority_reservation")
    path = "litellm_settings.priority_reservation"
    options = reader.section(
        "litellm_settings.priority_reservation_settings",
        litellm.get("priority_reservation_settings"),
        _PRIORITY_SETTINGS,
        frozenset(),
    )
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise reader.fail(path, f"must map priority names to shares, got {type(raw).__name__}")
    if len(raw) > MAX_PRIORITIES:
        raise reader.fail(path, f"has {len(raw)} priorities; at most {MAX_PRIORITIES}")
    weights: dict[str, tuple[str, float]] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or len(name) > MAX_NAME or not _PRIORITY_NAME.fullmatch(name):
            raise reader.fail(
                path,
                f"priority name {name!r} must be 1 to {MAX_NAME} letters, digits, '_', '.' or '-'",
            )
        weights[name] = _priority_weight(reader, f"{path}.{name}", reader.value(path, value))
    where = "litellm_settings.priority_reservation_settings"
    default = _fraction(reader, f"{where}.default_priority", options.get("default_priority"))
    threshold = _fraction(
        reader, f"{where}.saturation_threshold", options.get("saturation_threshold")
    )
    reader.number(f"{where}.saturation_check_cache_ttl", options.get("saturation_check_cache_ttl"))
    return PriorityReservation(
        weights,
        0.25 if default is None else default,
        0.5 if threshold is None else threshold,
    )


def _sink_url(reader: _Reader, env: Mapping[str, str], ours: dict[str, Any]) -> str | None:
    """The ledger sink's URL: ``RATELIMITER_LEDGER_SINK``, else the config's; PostgreSQL only."""
    path = "ratelimiter_settings.ledger_sink"
    url = env.get("RATELIMITER_LEDGER_SINK") or reader.string(path, ours.get("ledger_sink"))
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise reader.fail(path, "must be a postgresql:// URL (the only sink so far)")
    return url


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")  # an HTTP token


def _alert_thresholds(reader: _Reader, raw: Any) -> tuple[float, ...]:
    path = "ratelimiter_settings.budget_alert_thresholds"
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise reader.fail(path, "must be a list of fractions of max_budget, e.g. [0.5, 0.8, 0.95]")
    fractions = []
    for i, value in enumerate(raw):
        number = reader.number(f"{path}[{i}]", value)
        if not 0 < number <= 1:
            raise reader.fail(
                f"{path}[{i}]",
                f"must be a fraction above 0 and at most 1 (0.8 for 80 %), got {value!r}",
            )
        fractions.append(float(number))
    return tuple(sorted(set(fractions)))


BLOCK_SHARE = 64  # a block is 1/64 of a limit's capacity unless the config says otherwise


def _capacity_blocks(reader: _Reader, raw: Any) -> dict[str, int]:
    """``[proxy, deployment]`` or ``{proxy: 64, deployment: 32}``: scope kind -> share."""
    path = "ratelimiter_settings.capacity_blocks"
    if raw is None:
        return {}
    if isinstance(raw, list):
        raw = dict.fromkeys(raw, BLOCK_SHARE)
    if not isinstance(raw, dict):
        raise reader.fail(
            path, "must name scope kinds, e.g. [proxy, deployment] or {proxy: 64, deployment: 32}"
        )
    shares = {}
    for kind, share in raw.items():
        if kind not in SCOPE_KINDS:
            raise reader.fail(
                f"{path}.{kind}", f"is not a scope kind: use one of {', '.join(SCOPE_KINDS)}"
            )
        if isinstance(share, bool) or not isinstance(share, int) or not 2 <= share <= 1_000_000:
            raise reader.fail(
                f"{path}.{kind}",
                "must be how many blocks a limit is cut into, an integer from 2 (64 takes 1/64 "
                f"of a limit's capacity per block), got {share!r}",
            )
        shares[kind] = share
    return shares


def _end_user_headers(reader: _Reader, general: dict[str, Any]) -> tuple[str, ...]:
    """The headers ``general_settings`` names for the end user, in LiteLLM's order:
    ``user_header_mappings`` entries of role ``customer``, then ``user_header_name``. An
    ``internal_user`` mapping is accepted and not used: here a key's user is the key's."""
    names: list[str] = []
    path = "general_settings.user_header_mappings"
    mappings = general.get("user_header_mappings") or []
    if not isinstance(mappings, list):
        raise reader.fail(path, "must be a list of {header_name, litellm_user_role}")
    for i, mapping in enumerate(mappings):
        where = f"{path}[{i}]"
        if not isinstance(mapping, dict):
            raise reader.fail(where, "must be a mapping with header_name and litellm_user_role")
        name = _header_name(reader, f"{where}.header_name", mapping.get("header_name"))
        role = reader.string(f"{where}.litellm_user_role", mapping.get("litellm_user_role"))
        if role == "customer":
            names.append(name)
        elif role == "internal_user":
            reader.warnings.append(
                f"{reader.source}: {where}: role internal_user is accepted, not used (a "
                "request's user is its key's)"
            )
        else:
            raise reader.fail(
                f"{where}.litellm_user_role", f"must be customer or internal_user, got {role!r}"
            )
    single = general.get("user_header_name")
    if single is not None:
        names.append(_header_name(reader, "general_settings.user_header_name", single))
    return tuple(dict.fromkeys(names))


def _header_name(reader: _Reader, path: str, raw: Any) -> str:
    name = reader.string(path, raw, required=True) or ""
    if not _HEADER_NAME.match(name):
        raise reader.fail(path, f"must be an HTTP header name, got {name!r}")
    return name.lower()


def _check_wildcards(
    reader: _Reader, path: str, name: str, model: str, api_base: str | None
) -> None:
    """A wildcard entry (``model_name: openai/*`` or ``*``) is routed as LiteLLM routes it:
    each ``*`` of model_name matches any characters and fills the next ``*`` of
    litellm_params.model, which has as many, or none (every name goes to that one model)."""
    where = f"{path}.model_name"
    if "**" in name:
        raise reader.fail(where, f"{name!r} has two * in a row, which split a name ambiguously")
    stars, filled = name.count("*"), model.count("*")
    p = f"{path}.litellm_params.model"
    if filled and not stars:
        raise reader.fail(
            p,
            f"{model!r} has a * but model_name {name!r} has none to fill it: give model_name "
            "a pattern (openai/*) or name one model here",
        )
    if filled and filled != stars:
        raise reader.fail(
            p,
            f"{model!r} has {filled} * but model_name {name!r} has {stars}: each * of "
            "model_name fills one * of model, in order (or give model no * to send every "
            "name to one model)",
        )
    if "*" in model.split("/", 1)[0] and api_base is None:
        raise reader.fail(
            f"{path}.litellm_params.api_base",
            f"is required for {model!r}: the request would choose the provider; name it "
            "(openai/*) or set api_base",
        )


def _deployment(reader: _Reader, index: int, raw: Any) -> Deployment:
    path = f"model_list[{index}]"
    entry = reader.section(path, raw, {"model_name", "litellm_params", "model_info"}, frozenset())
    name = reader.string(f"{path}.model_name", entry.get("model_name"), required=True)
    params = reader.section(
        f"{path}.litellm_params", entry.get("litellm_params"), _PARAMS, _LITELLM_PARAMS
    )
    info = reader.section(
        f"{path}.model_info", entry.get("model_info"), {"access_groups", "id"}, _LITELLM_MODEL_INFO
    )
    groups = info.get("access_groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise reader.fail(f"{path}.model_info.access_groups", "must be a list of names")
    p = f"{path}.litellm_params"
    model = reader.string(f"{p}.model", params.get("model"), required=True) or ""
    api_base = reader.string(f"{p}.api_base", params.get("api_base"))
    _check_wildcards(reader, path, name or "", model, api_base)
    provider = model.split("/", 1)[0] if "/" in model else "openai"
    if api_base is None and provider not in DEFAULT_BASES:
        raise reader.fail(
            f"{p}.api_base",
            f"is required for {model!r}: requests go to api_base in OpenAI's format (only "
            "anthropic/ models go to Anthropic's own URL without one, and "
            "openai/ models go to OpenAI's own URL without one)",
        )
    return Deployment(
        model_name=name or "",
        model=model,
        api_base=api_base,
        api_key=reader.string(f"{p}.api_key", params.get("api_key")),
        rpm=reader.number(f"{p}.rpm", params.get("rpm"), whole=True),
        tpm=reader.number(f"{p}.tpm", params.get("tpm"), whole=True),
        input_cost_per_token=reader.number(
            f"{p}.input_cost_per_token", params.get("input_cost_per_token")
        ),
        output_cost_per_token=reader.number(
            f"{p}.output_cost_per_token", params.get("output_cost_per_token")
        ),
        **{name: reader.number(f"{p}.{name}", params.get(name)) for name in PRICE_FIELDS[2:]},
        access_groups=tuple(groups),
        index=index,
    )


def load_config(
    path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    allow_weak_master_key: bool = False,
    master_key: str = "required",
) -> Settings:
    """Read and check a config file; ``REDIS_URL``, ``RATELIMITER_MASTER_KEY`` and
    ``RATELIMITER_END_USER_BUDGET_ID`` in the environment override it.

    ``master_key``: where none is set (environment, then config), ``"required"`` is an error,
    ``"create"`` reads the one saved under the data directory or generates and saves one
    (``ratelimiter serve``), ``"optional"`` reads the saved one if any (commands that do not
    serve the admin API)."""
    env = os.environ if env is None else env
    source = str(path) if path else "<no config file>"
    raw: Any = {}
    lines: dict[str, int] = {}
    if path:
        try:
            text = Path(path).read_text()
            raw = yaml.safe_load(text) or {}
            lines = _lines(text)
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read it: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(source, where, f"not valid YAML: {problem}") from None
    reader = _Reader(source, env, lines)
    top = reader.section("(top level)", raw, _TOP, _LITELLM_TOP)
    general = reader.section(
        "general_settings", top.get("general_settings"), _GENERAL, _LITELLM_GENERAL
    )
    litellm = reader.section(
        "litellm_settings", top.get("litellm_settings"), _LITELLM, _LITELLM_SETTINGS
    )
    ours = reader.section("ratelimiter_settings", top.get("ratelimiter_settings"), _OURS)
    models_raw = top.get("model_list") or []
    if not isinstance(models_raw, list):
        raise reader.fail("model_list", "must be a list of models")
    models = tuple(_deployment(reader, i, m) for i, m in enumerate(models_raw))

    data_dir = Path(
        reader.string("ratelimiter_settings.data_dir", ours.get("data_dir")) or DEFAULT_DATA_DIR
    )
    # where the key came from, as an error names it: (source, path inside it)
    key, key_source = env.get("RATELIMITER_MASTER_KEY"), ("RATELIMITER_MASTER_KEY", "")
    if not key:
        key = reader.string("general_settings.master_key", general.get("master_key"))
        key_source = (source, "general_settings.master_key")
    if not key:
        key, saved_in = _saved_master_key(data_dir, create=master_key == "create")
        key_source = (saved_in, "")
    if not key and master_key == "required":
        raise reader.fail(
            "general_settings.master_key",
            "is required (or set RATELIMITER_MASTER_KEY): admin routes need it",
        )
    weak = weak_master_key_reason(key) if key else None
    if weak and not allow_weak_master_key:
        raise ConfigError(
            *key_source,
            f"refused as weak: {weak}. Use a long random key (e.g. `sk-` + 32 random "
            "characters), or pass --unsafe-allow-weak-master-key for a throwaway setup",
        )

    on_error = reader.string("ratelimiter_settings.on_redis_error", ours.get("on_redis_error"))
    if on_error not in (None, "deny", "allow"):
        raise reader.fail(
            "ratelimiter_settings.on_redis_error", f"must be deny or allow, got {on_error!r}"
        )
    unpriced = reader.string("ratelimiter_settings.unpriced_models", ours.get("unpriced_models"))
    if unpriced not in (None, "free", "refuse"):
        raise reader.fail(
            "ratelimiter_settings.unpriced_models", f"must be free or refuse, got {unpriced!r}"
        )
    enforcement = reader.string(
        "ratelimiter_settings.budget_enforcement", ours.get("budget_enforcement")
    )
    if enforcement not in (None, "capped", "strict"):
        raise reader.fail(
            "ratelimiter_settings.budget_enforcement",
            "must be capped (a request without max_tokens holds what its limits have left, the "
            "default) or strict (it is sent with max_tokens set to what they afford), got "
            f"{enforcement!r}",
        )
    tpm_counts = reader.string("ratelimiter_settings.tpm_counts", ours.get("tpm_counts"))
    if tpm_counts not in (None, "all", "uncached"):
        raise reader.fail(
            "ratelimiter_settings.tpm_counts",
            "must be all (every token counts toward token windows) or uncached (cache reads "
            f"do not), got {tpm_counts!r}",
        )
    prompt_estimate = reader.string(
        "ratelimiter_settings.prompt_estimate", ours.get("prompt_estimate")
    )
    if prompt_estimate not in (None, "chars", "bytes"):
        raise reader.fail(
            "ratelimiter_settings.prompt_estimate",
            "must be chars (characters / 4, the default) or bytes (one token per UTF-8 byte, "
            f"an upper bound), got {prompt_estimate!r}",
        )
    default_max_tokens = reader.number(
        "ratelimiter_settings.default_max_tokens", ours.get("default_max_tokens"), whole=True
    )
    if default_max_tokens is not None and default_max_tokens > MAX_OUTPUT_TOKENS:
        raise reader.fail(
            "ratelimiter_settings.default_max_tokens",
            f"must be at most {MAX_OUTPUT_TOKENS}, the most a request may ask for",
        )
    lease_ttl = reader.number("ratelimiter_settings.lease_ttl", ours.get("lease_ttl"))
    hold_ttl = reader.number("ratelimiter_settings.hold_ttl", ours.get("hold_ttl"))
    collect_interval = reader.number(
        "ratelimiter_settings.collect_interval", ours.get("collect_interval")
    )
    if collect_interval == 0:
        raise reader.fail(
            "ratelimiter_settings.collect_interval",
            "must be more than 0 seconds: it is how often expired holds are collected and "
            "the ledger shipped",
        )
    max_unchecked = reader.number(
        "ratelimiter_settings.max_unchecked_requests",
        ours.get("max_unchecked_requests"),
        whole=True,
    )
    upstream_timeout = reader.number(
        "ratelimiter_settings.upstream_timeout", ours.get("upstream_timeout")
    )
    redis_timeout = reader.number("ratelimiter_settings.redis_timeout", ours.get("redis_timeout"))
    if redis_timeout == 0:
        raise reader.fail(
            "ratelimiter_settings.redis_timeout",
            "must be more than 0 seconds: it is how long a request may wait for Redis",
        )
    timezone = reader.string("ratelimiter_settings.timezone", ours.get("timezone")) or "UTC"
    try:
        time_zone(timezone)
    except InvalidDuration as exc:
        raise reader.fail("ratelimiter_settings.timezone", str(exc)) from None

    end_user_headers = _end_user_headers(reader, general)
    reject_tags = general.get("reject_clientside_metadata_tags")
    if reject_tags is not None and not isinstance(reject_tags, bool):
        raise reader.fail(
            "general_settings.reject_clientside_metadata_tags",
            f"must be true or false, got {reject_tags!r}",
        )
    thresholds = _alert_thresholds(reader, ours.get("budget_alert_thresholds"))
    lag_alert = reader.number(
        "ratelimiter_settings.ledger_sink_lag_alert", ours.get("ledger_sink_lag_alert")
    )
    priorities = _priority_reservation(reader, litellm)
    for message in reader.warnings:
        log.warning(message)
    return Settings(
        master_key=key or "",
        models=models,
        max_budget=reader.number("litellm_settings.max_budget", litellm.get("max_budget")),
        budget_duration=reader.duration(
            "litellm_settings.budget_duration", litellm.get("budget_duration")
        ),
        end_user_budget_id=env.get("RATELIMITER_END_USER_BUDGET_ID")
        or reader.string(
            "litellm_settings.max_end_user_budget_id", litellm.get("max_end_user_budget_id")
        )
        or "default",
        redis_url=env.get("REDIS_URL")
        or reader.string("ratelimiter_settings.redis_url", ours.get("redis_url")),
        key_prefix=reader.string("ratelimiter_settings.key_prefix", ours.get("key_prefix"))
        or "rl:",
        timezone=timezone,
        on_redis_error=on_error or "deny",
        data_dir=data_dir,
        default_max_tokens=default_max_tokens or 4096,
        prompt_estimate=prompt_estimate or "chars",
        unpriced_models=unpriced or "free",
        tpm_counts=tpm_counts or "all",
        budget_enforcement=enforcement or "capped",
        shadow=_shadow(reader, ours.get("shadow")),
        upstream_timeout_s=float(upstream_timeout or 600.0),
        redis_timeout_s=float(redis_timeout or 2.0),
        lease_ttl_s=float(lease_ttl or 60.0),
        hold_ttl_s=float(hold_ttl or 600.0),
        collect_interval_s=float(collect_interval or 5.0),
        max_unchecked_requests=10_000 if max_unchecked is None else int(max_unchecked),
        alert_webhook_url=reader.string(
            "ratelimiter_settings.alert_webhook_url", ours.get("alert_webhook_url")
        ),
        ledger_sink=_sink_url(reader, env, ours),
        end_user_headers=end_user_headers,
        priority_reservation=priorities,
        reject_clientside_metadata_tags=bool(reject_tags),
        budget_alert_thresholds=thresholds,
        capacity_blocks=_capacity_blocks(reader, ours.get("capacity_blocks")),
        ledger_sink_lag_alert_s=300.0 if lag_alert is None else float(lag_alert),
        ledger_sink_schema=reader.string(
            "ratelimiter_settings.ledger_sink_schema", ours.get("ledger_sink_schema")
        )
        or "ratelimiter",
        source=source,
        extra_warnings=tuple(reader.warnings),
    )
