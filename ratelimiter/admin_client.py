"""``ratelimiter.admin_client``, as the README imports it: see
``ratelimiter.library.admin_client``."""

from .library.admin_client import (
    AdminClient,
    AdminError,
    AuthenticationError,
    BadRequest,
    BudgetWindow,
    Conflict,
    EntityInfo,
    GeneratedKey,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)

__all__ = [
    "AdminClient",
    "AdminError",
    "AuthenticationError",
    "BadRequest",
    "BudgetWindow",
    "Conflict",
    "EntityInfo",
    "GeneratedKey",
    "NotFound",
    "PermissionDenied",
    "ServiceUnavailable",
]
