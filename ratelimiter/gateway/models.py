"""Pydantic models of the admin API's request bodies: every field of LiteLLM's request models
(litellm/proxy/_types.py), plus our own (``budget_limits``, a key's ``budget_id``...).

Two sorts of fields. Those the limiter enforces run the store's checkers (store.SCHEMAS), so
their bounds and messages are the engine's. The rest are "accepted, not enforced": typed as
LiteLLM types them, bounded so that a hostile value cannot grow a record, then stored and
shown on info as sent. A field that neither we nor LiteLLM know is refused by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)

from ..engine.durations import shown
from ..errors import EntityError
from .shadow import SHADOWABLE, shadow_flag, shadow_names
from .store import (
    MAX_DOLLARS,
    MAX_LIST,
    MAX_TEXT,
    MAX_WINDOWS,
    ROLES,
    SCHEMAS,
    aliases,
    budget_windows,
    count,
    duration,
    flag,
    mapping,
    members,
    model_budgets,
    model_counts,
    money,
    names,
    role,
    tag_name,
    text,
)
from .tags import MAX_REQUEST_TAGS, MAX_TAG_CHARS, tag_list

__all__ = [
    "ACCEPTED_ONLY",
    "ACTED_ON",
    "CREATE",
    "HANDLED",
    "REQUESTS",
    "UPDATE",
    "check",
    "refuse_unknown",
    "validate",
]

MAX_COUNT = 2**53 - 1  # engine.limits.MAX_AMOUNT, spelled for the schema
RequestT = TypeVar("RequestT", bound=BaseModel)


def _enforced(check: Callable[[str, Any], Any], schema: dict[str, Any]) -> Any:
    """A field the limiter enforces: the store's checker decides (its EntityError names the
    field and the range), the schema documents the same bounds."""

    def run(value: Any, info: ValidationInfo) -> Any:
        return check(info.field_name or "?", value)

    return Annotated[Any, BeforeValidator(run), WithJsonSchema(schema)]


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_DURATION = {
    "type": "string",
    "description": "a number and a unit (s, m, h, d, w, mo, y), at most 100 years: 30d",
}
Money = _enforced(money, _nullable({"type": "number", "minimum": 0, "maximum": MAX_DOLLARS}))
Count = _enforced(count, _nullable({"type": "integer", "minimum": 0, "maximum": MAX_COUNT}))
Duration = _enforced(duration, _nullable(_DURATION))
Text = _enforced(text, _nullable({"type": "string", "minLength": 1, "maxLength": MAX_TEXT}))
# the entity an update names: required
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]
Flag = _enforced(flag, {"type": ["boolean", "null"]})
_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}
Names = _enforced(names, _nullable({"type": "array", "items": _NAME, "maxItems": MAX_LIST}))
Object = _enforced(mapping, _nullable({"type": "object"}))
_PER_MODEL = {"type": "object", "maxProperties": MAX_LIST}
ModelCounts = _enforced(
    model_counts,
    _nullable(
        # null is taken as 0, as before these models
        {
            **_PER_MODEL,
            "additionalProperties": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_COUNT,
            },
        },
    ),
)
_MONEY = {"type": "number", "minimum": 0, "maximum": MAX_DOLLARS}
_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}
_MODEL_BUDGET = {
    "type": "object",
    "properties": {
        "max_budget": _nullable(_MONEY),
        "budget_limit": _nullable(_MONEY),
        "budget_duration": _nullable(_DURATION),
        "time_period": _nullable(_DURATION),
        "tpm_limit": _nullable(_COUNT),
        "rpm_limit": _nullable(_COUNT),
    },
    "additionalProperties": False,
}
ModelBudgets = _enforced(
    model_budgets, _nullable({**_PER_MODEL, "additionalProperties": _nullable(_MODEL_BUDGET)})
)
_WINDOW = {
    "type": "object",
    "properties": {
        "max_budget": {"type": "number", "minimum": 0, "maximum": MAX_DOLLARS},
        "budget_duration": _DURATION,
    },
    "required": ["max_budget", "budget_duration"],
    "additionalProperties": False,
}
Windows = _enforced(
    budget_windows, _nullable({"type": "array", "items": _WINDOW, "maxItems": MAX_WINDOWS})
)
_MEMBER = {
    "type": "object",
    "properties": {
        "user_id": _nullable(_NAME),
        "user_email": _nullable(_NAME),
        "role": {"enum": ["admin", "user"]},
        "max_budget_in_team": _nullable(_MONEY),
        "rpm_limit": _nullable(_COUNT),
        "tpm_limit": _nullable(_COUNT),
    },
    "anyOf": [{"required": ["user_id"]}, {"required": ["user_email"]}],
    "additionalProperties": False,
}
Members = _enforced(members, _nullable({"type": "array", "items": _MEMBER, "maxItems": MAX_LIST}))
_NO_STAR = {**_NAME, "pattern": r"^[^*]+$"}
Aliases = _enforced(
    aliases,
    _nullable(
        {
            "type": "object",
            "maxProperties": MAX_LIST,
            "propertyNames": _NO_STAR,
            "additionalProperties": _NO_STAR,
            "description": "{name asked for: name of a model served here}, applied once",
        }
    ),
)
Role = _enforced(role, _nullable({"enum": list(ROLES)}))
_TAG = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_TAG_CHARS,
    "pattern": r"^[^,{}]+$",
    "description": "printable, without , { or }",
}
Tags = _enforced(
    tag_list, _nullable({"type": "array", "items": _TAG, "maxItems": MAX_REQUEST_TAGS})
)
TagName = _enforced(tag_name, _TAG)
# ours (shadow.py): LiteLLM has no shadow mode
ShadowMode = _enforced(
    shadow_flag,
    {
        "type": ["boolean", "null"],
        "description": "ours: every limit of this entity is counted but not enforced "
        "(would-be refusals are reported); null: its budget's setting",
    },
)
ShadowLimits = _enforced(
    shadow_names,
    _nullable(
        {
            "type": "array",
            "items": {"enum": list(SHADOWABLE)},
            "maxItems": len(SHADOWABLE),
            "description": "ours: these limits of this entity are counted but not enforced",
        }
    ),
)

# -- accepted, not enforced: LiteLLM's types, bounded ----------------------------------

Str = Annotated[str, StringConstraints(max_length=MAX_TEXT)] | None
StrList = (
    Annotated[
        list[Annotated[str, StringConstraints(max_length=MAX_TEXT)]], Field(max_length=MAX_LIST)
    ]
    | None
)
AnyList = Annotated[list[Any], Field(max_length=MAX_LIST)] | None
Obj = dict[str, Any] | None
Bool = bool | None
Int = Annotated[int, Field(ge=0, le=MAX_COUNT)] | None
Dollars = Annotated[float, Field(ge=0, le=MAX_DOLLARS, allow_inf_nan=False)] | None


def _iso_text(value: Any) -> Any:
    if not isinstance(value, str):  # a bare number would be read as seconds since 1970
        raise ValueError("must be a date and time as text, like 2030-01-01T00:00:00Z")
    return value


Timestamp = Annotated[datetime, Strict(False), BeforeValidator(_iso_text)] | None
LimitType = Literal["guaranteed_throughput", "best_effort_throughput", "dynamic"] | None
# A secret LiteLLM would keep (a user's password): accepted, never stored in the clear.
Secret = Annotated[str, StringConstraints(max_length=MAX_TEXT)] | None


class ObjectPermission(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mcp_servers: StrList = None
    mcp_access_groups: StrList = None
    mcp_tool_permissions: dict[str, list[str]] | None = None
    mcp_toolsets: StrList = None
    blocked_tools: StrList = None
    vector_stores: StrList = None
    agents: StrList = None
    agent_access_groups: StrList = None
    models: StrList = None


class VectorStoreIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index_name: Annotated[str, StringConstraints(max_length=MAX_TEXT)]
    index_permissions: list[Literal["read", "write"]]


VectorIndexes = Annotated[list[VectorStoreIndex], Field(max_length=MAX_LIST)] | None


class Request(BaseModel):
    """Unknown fields are refused: a typo must not pass silently."""

    # validate_default: an enforced field left out gets its checker's value for "none"
    # (an empty list, false), as stored before these models existed.
    # strict: no quiet coercion (0 is not false, "5" is not 5); timestamps still parse from
    # text, the only way JSON carries them.
    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), validate_default=True, strict=True
    )


class _Limits(Request):
    max_budget: Money = None
    soft_budget: Money = None
    budget_duration: Duration = None
    tpm_limit: Count = None
    rpm_limit: Count = None
    # input and output tokens per minute, each its own window (Anthropic's ITPM and OTPM)
    input_tpm_limit: Count = None
    output_tpm_limit: Count = None
    max_parallel_requests: Count = None
    model_max_budget: ModelBudgets = None
    shadow_mode: ShadowMode = None
    shadow_limits: ShadowLimits = None


class _KeyBase(_Limits):
    """LiteLLM's GenerateRequestBase and KeyRequestBase, plus our budget_limits."""

    key_alias: Text = None
    duration: Duration = None
    models: Names = None
    user_id: Text = None
    team_id: Text = None
    budget_id: Text = None
    metadata: Object = None
    blocked: Flag = False
    model_rpm_limit: ModelCounts = None
    model_tpm_limit: ModelCounts = None
    budget_limits: Windows = None
    aliases: Aliases = None
    # a key with no team is under this organization's limits; a key in a team is under its
    # team's organization (a different one is refused)
    organization_id: Text = None
    # every request of the key carries these tags, and may add no other tag entity
    tags: Tags = None
    # accepted, not enforced
    spend: Dollars = None
    agent_id: Str = None
    allowed_cache_controls: AnyList = None
    config: Obj = None
    permissions: Obj = None
    guardrails: StrList = None
    policies: StrList = None
    prompts: StrList = None
    object_permission: ObjectPermission | None = None
    enforced_params: StrList = None
    allowed_routes: AnyList = None
    allowed_passthrough_routes: AnyList = None
    allowed_vector_store_indexes: VectorIndexes = None
    rpm_limit_type: LimitType = None
    tpm_limit_type: LimitType = None
    router_settings: Obj = None
    access_group_ids: StrList = None
    auto_rotate: Bool = None
    rotation_interval: Str = None


class GenerateKeyRequest(_KeyBase):
    """POST /key/generate"""

    key: None = Field(
        None, description="not served: the limiter always generates the key (sent as null only)"
    )
    send_invite_email: Bool = None
    key_type: Literal["llm_api", "management", "read_only", "default"] | None = None
    project_id: Str = None


class UpdateKeyRequest(_KeyBase):
    """POST /key/update"""

    key: Id
    temp_budget_increase: Dollars = None
    temp_budget_expiry: Timestamp = None


class RegenerateKeyRequest(_KeyBase):
    """POST /key/regenerate and /key/{key}/regenerate: a new secret for a key, whose limits,
    spend and settings carry over; other fields change the key as /key/update does."""

    key: Id | None = None  # or in the path: /key/{key_id}/regenerate
    new_key: Annotated[str, StringConstraints(min_length=20, max_length=MAX_TEXT)] | None = Field(
        None, description="the new secret, chosen by the admin: sk- and 17+ characters"
    )
    grace_period: Duration = Field(
        None, description="how long the old secret keeps working, e.g. 24h; none: it stops now"
    )
    new_master_key: None = Field(None, description="not served: the master key is configured")
    send_invite_email: Bool = None
    key_type: Literal["llm_api", "management", "read_only", "default"] | None = None
    project_id: Str = None


class NewUserRequest(_Limits):
    """POST /user/new"""

    user_id: Text = None
    user_email: Text = None
    models: Names = None
    budget_id: Text = None
    metadata: Object = None
    model_rpm_limit: ModelCounts = None
    model_tpm_limit: ModelCounts = None
    aliases: Aliases = None
    # what the user's keys may do on the admin API (admin/access.py); none acts as internal_user
    user_role: Role = None
    # accepted, not enforced
    user_alias: Str = None
    teams: AnyList = None  # team ids, or {team_id, max_budget_in_team, user_role} objects
    auto_create_key: Bool = None
    send_invite_email: Bool = None
    sso_user_id: Str = None
    organizations: StrList = None
    password: Secret = None
    key_alias: Text = None
    duration: Duration = None
    spend: Dollars = None
    team_id: Text = None
    agent_id: Str = None
    allowed_cache_controls: AnyList = None
    config: Obj = None
    permissions: Obj = None
    guardrails: StrList = None
    policies: StrList = None
    prompts: StrList = None
    blocked: Bool = None
    object_permission: ObjectPermission | None = None


class UpdateUserRequest(NewUserRequest):
    """POST /user/update: the user is named by user_id, or else by user_email"""

    user_id: Id | None = None


class NewTeamRequest(_Limits):
    """POST /team/new"""

    team_id: Text = None
    team_alias: Text = None
    models: Names = None
    members: Members = None
    budget_id: Text = None
    metadata: Object = None
    blocked: Flag = False
    model_rpm_limit: ModelCounts = None
    model_tpm_limit: ModelCounts = None
    model_aliases: Aliases = None
    organization_id: Text = None  # the organization whose limits the team's requests also meet
    # accepted, not enforced
    admins: AnyList = None
    members_with_roles: Members = None  # LiteLLM's name for members: both are taken
    team_member_permissions: StrList = None
    router_settings: Obj = None
    access_group_ids: StrList = None
    tags: StrList = None
    guardrails: StrList = None
    policies: StrList = None
    prompts: StrList = None
    object_permission: ObjectPermission | None = None
    allowed_passthrough_routes: AnyList = None
    secret_manager_settings: Obj = None
    rpm_limit_type: LimitType = None
    tpm_limit_type: LimitType = None
    team_member_budget: Dollars = None
    team_member_rpm_limit: Int = None
    team_member_tpm_limit: Int = None
    team_member_key_duration: Str = None
    team_member_budget_duration: Str = None
    allowed_vector_store_indexes: VectorIndexes = None
    enforced_batch_output_expires_after: Obj = None
    enforced_file_expires_after: Obj = None


class UpdateTeamRequest(NewTeamRequest):
    """POST /team/update"""

    team_id: Id


class BudgetNewRequest(_Limits):
    """POST /budget/new"""

    budget_id: Text = None
    budget_reset_at: Timestamp = None  # accepted, not enforced: resets follow the window


class BudgetUpdateRequest(BudgetNewRequest):
    """POST /budget/update"""

    budget_id: Id


class NewCustomerRequest(_Limits):
    """POST /customer/new and /end_user/new"""

    user_id: Text = None
    alias: Text = None
    blocked: Flag = False
    budget_id: Text = None
    metadata: Object = None
    # accepted, not enforced
    budget_reset_at: Timestamp = None
    spend: Dollars = None
    allowed_model_region: Literal["eu", "us"] | None = None
    default_model: Str = None
    object_permission: ObjectPermission | None = None


class UpdateCustomerRequest(NewCustomerRequest):
    """POST /customer/update and /end_user/update"""

    user_id: Id


class _OrganizationBudget(_Limits):
    """LiteLLM_BudgetTable's fields, which an organization takes at its top level."""

    # accepted, not enforced
    tpd_limit: Int = None
    allowed_models: StrList = None
    temp_budget_increase: Dollars = None
    temp_budget_expiry: Timestamp = None


class NewOrganizationRequest(_OrganizationBudget):
    """POST /organization/new"""

    organization_id: Text = None
    organization_alias: Text  # required, as in LiteLLM
    models: Names = None
    budget_id: Text = None
    metadata: Object = None
    model_rpm_limit: ModelCounts = None
    model_tpm_limit: ModelCounts = None
    # accepted, not enforced
    object_permission: ObjectPermission | None = None


class BudgetTable(Request):
    """LiteLLM_BudgetTable as LiteLLM's UI nests it in an organization update; its fields are
    taken as if sent at the top level (budget_reset_at and created_at, which info shows, are
    ignored)."""

    budget_id: Any = None
    soft_budget: Any = None
    max_budget: Any = None
    max_parallel_requests: Any = None
    tpm_limit: Any = None
    rpm_limit: Any = None
    tpd_limit: Any = None
    model_max_budget: Any = None
    budget_duration: Any = None
    allowed_models: Any = None
    temp_budget_increase: Any = None
    temp_budget_expiry: Any = None
    budget_reset_at: Any = None
    created_at: Any = None


class UpdateOrganizationRequest(_OrganizationBudget):
    """PATCH /organization/update (also POST): LiteLLM's LiteLLM_OrganizationTableUpdate"""

    organization_id: Id
    organization_alias: Text = None
    models: Names = None
    budget_id: Text = None
    metadata: Object = None
    model_rpm_limit: ModelCounts = None
    model_tpm_limit: ModelCounts = None
    litellm_budget_table: BudgetTable | None = None
    # accepted, not enforced
    spend: Dollars = None
    updated_by: Str = None
    object_permission: ObjectPermission | None = None


class TagNewRequest(_Limits):
    """POST /tag/new: a tag whose budgets and limits every request carrying it meets"""

    name: TagName
    budget_id: Text = None
    # accepted, not enforced: LiteLLM routes a tag's requests to these models
    description: Str = None
    models: StrList = None
    model_info: dict[str, Annotated[str, StringConstraints(max_length=MAX_TEXT)]] | None = None


class TagUpdateRequest(TagNewRequest):
    """POST /tag/update: the fields sent change, the rest stay"""

    spend: Dollars = None


# The field of an update body that names the entity to update.
UPDATED_BY = {
    "key": "key",
    "user": "user_id",
    "team": "team_id",
    "customer": "user_id",
    "budget": "budget_id",
    "organization": "organization_id",
    "tag": "name",
}
CREATE: dict[str, type[Request]] = {
    "key": GenerateKeyRequest,
    "user": NewUserRequest,
    "team": NewTeamRequest,
    "customer": NewCustomerRequest,
    "budget": BudgetNewRequest,
    "organization": NewOrganizationRequest,
    "tag": TagNewRequest,
}
UPDATE: dict[str, type[Request]] = {
    "key": UpdateKeyRequest,
    "user": UpdateUserRequest,
    "team": UpdateTeamRequest,
    "customer": UpdateCustomerRequest,
    "budget": BudgetUpdateRequest,
    "organization": UpdateOrganizationRequest,
    "tag": TagUpdateRequest,
}
ENTITY_MODELS = frozenset({*CREATE.values(), *UPDATE.values(), RegenerateKeyRequest})
# Fields that the admin routes act on themselves rather than the limiter: /user/new makes
# the user's first key (duration, key_alias, auto_create_key) and puts the user in teams.
HANDLED: dict[str, frozenset[str]] = {
    "user": frozenset({"duration", "key_alias", "auto_create_key", "teams", "team_id"}),
    "team": frozenset({"members_with_roles"}),
    "key": frozenset({"new_key", "grace_period"}),  # /key/regenerate's
}
# Fields stored and shown but not acted on (a secret is not even stored), per kind; the
# README's compatibility table is checked against this. An organization update's nested
# litellm_budget_table is read as its top-level fields.
SECRETS = frozenset({"password"})
FOLDED = frozenset({"litellm_budget_table"})
# Fields acted on by the routes but never stored: ``spend`` sets the entity's spend (its
# lifetime spend, and its current budget periods' lowered to it), as LiteLLM's update does.
ACTED_ON: dict[str, frozenset[str]] = {
    kind: frozenset({"spend"}) & {n for m in (CREATE[kind], UPDATE[kind]) for n in m.model_fields}
    for kind in CREATE
}
ACCEPTED_ONLY: dict[str, list[str]] = {
    kind: sorted(
        {n for m in (CREATE[kind], UPDATE[kind]) for n in m.model_fields}
        - set(SCHEMAS[kind])
        - HANDLED.get(kind, frozenset())
        - ACTED_ON[kind]
        - {UPDATED_BY[kind]}
        - FOLDED
    )
    for kind in CREATE
}


# -- the routes whose bodies are ids (their handlers check them; documented here) -------

Ids = Annotated[list[Id], Field(min_length=1, max_length=1_000)]


class KeyRef(Request):
    """POST /key/block and /key/unblock"""

    key: Id


class DeleteKeys(Request):
    """POST /key/delete"""

    keys: Ids
    key_aliases: list[Id] | None = Field(None, description="not served")


class UserIds(Request):
    """POST /user/delete, /customer/delete|block|unblock (also under /end_user)"""

    user_ids: Ids


class TeamIds(Request):
    """POST /team/delete"""

    team_ids: Ids


class BudgetRef(Request):
    """POST /budget/delete"""

    id: Id


class BudgetIds(Request):
    """POST /budget/info"""

    budgets: Ids


class MemberRequest(Request):
    """A team member, by user_id or by user_email (a user with that email, made if none)."""

    user_id: Id | None = None
    user_email: Str = None
    role: Literal["admin", "user"] = "user"
    max_budget_in_team: Dollars = None


class TeamMemberAddRequest(Request):
    """POST /team/member_add"""

    team_id: Id
    member: MemberRequest | Annotated[list[MemberRequest], Field(max_length=MAX_LIST)]
    max_budget_in_team: Dollars = None


class TeamMemberUpdateRequest(Request):
    """POST /team/member_update: a member's role, budget and rates within the team"""

    team_id: Id
    user_id: Id | None = None
    user_email: Str = Field(None, description="the member, when user_id is not given")
    role: Literal["admin", "user"] | None = None
    max_budget_in_team: Dollars = None
    rpm_limit: Int = None
    tpm_limit: Int = None


class TeamMemberDeleteRequest(Request):
    """POST /team/member_delete"""

    team_id: Id
    user_id: Id | None = None
    user_email: Str = Field(None, description="the member, when user_id is not given")


class OrganizationIds(Request):
    """DELETE /organization/delete (also POST)"""

    organization_ids: Ids


class OrganizationRequest(Request):
    """POST /organization/info (LiteLLM's deprecated form of GET /organization/info)"""

    organizations: Ids


OrgRole = Literal["org_admin", "internal_user", "internal_user_viewer"]


class OrgMember(Request):
    """One member: user_id or user_email (a user that does not exist is created)."""

    role: OrgRole
    user_id: Id | None = None
    user_email: Str = None


class OrganizationMemberAddRequest(Request):
    """POST /organization/member_add"""

    organization_id: Id
    member: OrgMember | Annotated[list[OrgMember], Field(min_length=1, max_length=MAX_LIST)]
    max_budget_in_organization: Dollars = Field(
        None, description="accepted, stored on the membership, not enforced (as in LiteLLM)"
    )


class OrganizationMemberDeleteRequest(Request):
    """DELETE /organization/member_delete (also POST): user_id or user_email"""

    organization_id: Id
    user_id: Id | None = None
    user_email: Str = None


class TagNames(Request):
    """POST /tag/info"""

    names: Annotated[list[Id], Field(min_length=1, max_length=1_000)]


class TagRef(Request):
    """POST /tag/delete"""

    name: Id


# Every POST route's body model, for the OpenAPI document.
class GlobalEndUsersSpend(Request):
    """POST /global/spend/end_users (LiteLLM's GlobalEndUsersSpend): the top 100 end users by
    spend from startTime (default 30 days ago) to endTime (default now), of one key if given."""

    api_key: Text = None
    startTime: Timestamp = None  # LiteLLM's names
    endTime: Timestamp = None


REQUESTS: dict[str, type[Request]] = {
    "/key/generate": GenerateKeyRequest,
    "/key/update": UpdateKeyRequest,
    "/key/regenerate": RegenerateKeyRequest,
    "/key/{key_id}/regenerate": RegenerateKeyRequest,
    "/key/delete": DeleteKeys,
    "/key/block": KeyRef,
    "/key/unblock": KeyRef,
    "/user/new": NewUserRequest,
    "/user/update": UpdateUserRequest,
    "/user/delete": UserIds,
    "/team/new": NewTeamRequest,
    "/team/update": UpdateTeamRequest,
    "/team/delete": TeamIds,
    "/team/member_add": TeamMemberAddRequest,
    "/team/member_update": TeamMemberUpdateRequest,
    "/team/member_delete": TeamMemberDeleteRequest,
    **{
        f"{base}/{action}": model
        for base in ("/customer", "/end_user")
        for action, model in (
            ("new", NewCustomerRequest),
            ("update", UpdateCustomerRequest),
            ("delete", UserIds),
            ("block", UserIds),
            ("unblock", UserIds),
        )
    },
    "/budget/new": BudgetNewRequest,
    "/budget/update": BudgetUpdateRequest,
    "/budget/delete": BudgetRef,
    "/budget/info": BudgetIds,
    "/organization/new": NewOrganizationRequest,
    "/organization/update": UpdateOrganizationRequest,
    "/organization/delete": OrganizationIds,
    "/organization/info": OrganizationRequest,
    "/organization/member_add": OrganizationMemberAddRequest,
    "/organization/member_delete": OrganizationMemberDeleteRequest,
    "/global/spend/end_users": GlobalEndUsersSpend,
    "/tag/new": TagNewRequest,
    "/tag/update": TagUpdateRequest,
    "/tag/info": TagNames,
    "/tag/delete": TagRef,
}


def check_request(path: str, body: Any) -> BaseModel:
    """A route's body checked against its model (``REQUESTS``), a 400 naming the field."""
    model = REQUESTS[path]
    if not isinstance(body, dict):
        raise EntityError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        where, problem = _problem(model, path, exc.errors(include_url=False)[0])
        label = where if len(where) <= MAX_TEXT else shown(where)
        raise EntityError(400, f"{label}: {problem}", label) from None


def _path(loc: tuple[int | str, ...]) -> str:
    """("members", 0, "role") -> members[0].role, as the store's checkers name fields."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "body"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly, in a list or in a union, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _walk(
    model: type[BaseModel], loc: tuple[int | str, ...]
) -> tuple[tuple[int | str, ...], type[BaseModel]]:
    """``loc`` without pydantic's union tags (``OrgMember``, ``list[OrgMember]``), and the
    model its last field belongs to."""
    out: list[int | str] = []
    current: type[BaseModel] | None = model
    parent = model
    last = len(loc) - 1
    for index, part in enumerate(loc):
        if isinstance(part, int):
            out.append(part)
        elif current is not None and part in current.model_fields:
            out.append(part)
            parent, current = current, _model_in(current.model_fields[part].annotation)
        elif index < last and (current is None or part[:1].isupper() or "[" in part):
            continue  # a union tag; never the last part, which is the field that failed
        else:
            out.append(part)  # a field the model lacks: the unknown one
            parent = current
    return tuple(out), parent


def _unknown(model: type[BaseModel], loc: tuple[int | str, ...], what: str) -> str:
    """A typo is named, with the field it was probably meant to be."""
    close = difflib.get_close_matches(str(loc[-1]), model.model_fields, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown field for {what} (neither the limiter nor LiteLLM has it){hint}"


# What pydantic's type errors expect, in the API's words (JSON's, not Python's).
_EXPECTED = {
    "model_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
    "string_type": "a string",
    "bool_type": "true or false",
    "int_type": "a whole number",
    "float_type": "a number",
}


def _problem(model: type[BaseModel], what: str, error: Mapping[str, Any]) -> tuple[str, str]:
    """(field path, what is wrong) of one pydantic error, in words rather than its dump."""
    kind, ctx, got = error["type"], error.get("ctx") or {}, shown(error.get("input"))
    loc, owner = _walk(model, tuple(error["loc"]))
    if kind == "extra_forbidden":
        problem = _unknown(owner, loc, what)
    elif kind == "missing":
        problem = "is required"
    elif kind in ("too_long", "string_too_long"):
        problem = f"at most {ctx.get('max_length')} entries or characters, got more"
    elif kind in ("too_short", "string_too_short"):
        problem = f"at least {ctx.get('min_length')} entries or characters, got {got}"
    elif kind == "less_than_equal":
        problem = f"must be at most {ctx.get('le')}, got {got}"
    elif kind == "greater_than_equal":
        problem = f"must be at least {ctx.get('ge')}, got {got}"
    elif kind == "literal_error":
        problem = f"must be one of {ctx.get('expected')}, got {got}"
    elif kind in _EXPECTED:
        problem = f"must be {_EXPECTED[kind]}, got {got}"
    elif kind == "none_required":
        problem = "is not served (the limiter generates every key); send null or leave it out"
    else:
        problem = f"{error['msg'][0].lower()}{error['msg'][1:]}, got {got}"
    return _path(loc), problem


def refuse_unknown(path: str, body: Mapping[str, Any]) -> None:
    """The fields of ``path``'s body that its model does not have are refused by name, on the
    routes whose handlers read only ids too."""
    model = REQUESTS.get(path)
    if model is None or model in ENTITY_MODELS:  # validate() checks those, naming the kind
        return
    for name in body:
        if name not in model.model_fields:
            label = name if len(name) <= MAX_TEXT else shown(name)
            raise EntityError(400, f"{label}: {_unknown(model, (name,), path)}", label)


def check(model: type[RequestT], body: Any, what: str) -> RequestT:
    """``body`` as ``model``, or a 400 naming the first field that is wrong and how."""
    if not isinstance(body, dict):
        raise EntityError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Of a union's branches (one member or a list of them), the one of the value's shape
        shaped = [e for e in errors if e["type"] not in ("model_type", "list_type", "dict_type")]
        path, problem = _problem(model, what, (shaped or errors)[0])
        label = path if len(path) <= MAX_TEXT else shown(path)
        raise EntityError(400, f"{label}: {problem}", label) from None


def validate(
    kind: str, body: Any, *, partial: bool = False, model: type[Request] | None = None
) -> dict[str, Any]:
    """A create (or, ``partial``, an update) body of an entity, checked: the fields sent, plus
    on create every enforced field at its default. The update's id field is not returned.
    ``model`` replaces the kind's own (a rotation's body is an update with more fields)."""
    if not isinstance(body, dict):
        raise EntityError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = model or (UPDATE if partial else CREATE)[kind]
    checked = check(model, body, "an organization" if kind == "organization" else f"a {kind}")
    sent = checked.model_dump(mode="json", exclude_unset=True, exclude=set(SECRETS))
    if partial:
        sent.pop(UPDATED_BY[kind], None)
        if body.get("blocked", False) is None:  # null is no change: only /block unblocks
            sent.pop("blocked")
    else:
        sent = {**checked.model_dump(mode="json", include=set(SCHEMAS[kind])), **sent}
    if kind == "customer" and sent.get("budget_id") and sent.get("max_budget") is not None:
        raise EntityError(
            400, "give a customer either budget_id or max_budget, not both", "budget_id"
        )
    return sent
