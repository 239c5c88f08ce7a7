"""The exceptions the library raises; everything derives from ``RateLimiterError``."""

from __future__ import annotations

__all__ = [
    "DuplicateRequest",
    "EntityError",
    "InvalidDuration",
    "InvalidLimit",
    "RateLimiterError",
    "RedisUnavailable",
    "UnknownModel",
]


class RateLimiterError(Exception):
    """Base class of every error raised by ratelimiter."""


class InvalidLimit(RateLimiterError, ValueError):
    """A limit, a list of limits or an amount is malformed; nothing was sent to Redis."""


class InvalidDuration(InvalidLimit):
    """A duration or time zone string could not be understood."""


class RedisUnavailable(RateLimiterError, ConnectionError):
    """Redis could not be reached, did not answer in time, or refused to write.

    ``refusing``: Redis answered but will not write now (out of memory, a read-only replica,
    a slot in migration); nothing can be admitted then, whatever ``on_redis_error`` says.
    """

    def __init__(
        self,
        address: str,
        reason: str,
        state: str = "is unreachable",
        hint: str = "Check that Redis is running.",
        *,
        refusing: bool = False,
    ) -> None:
        super().__init__(f"Redis at {address} {state}: {reason}")
        self.address, self.state, self.hint, self.refusing = address, state, hint, refusing

    @property
    def public(self) -> str:
        """What a client may be told: the state, never the address or the driver's words."""
        return f"Redis {self.state}"


class DuplicateRequest(RateLimiterError):
    """A request id was reused after its reservation was finished, or while it is held for
    other limits (``status`` is then ``conflict``)."""

    def __init__(self, request_id: str, status: str) -> None:
        state = "held for other limits" if status == "conflict" else status
        super().__init__(
            f"request id {request_id!r} was already used and is {state}; "
            "every request needs a new id"
        )
        self.request_id = request_id
        self.status = status


class UnknownModel(RateLimiterError, ValueError):
    """A cost was asked of a model with no known price."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"no price for model {model!r}: register one with ratelimiter.register_model("
            f"{{{model!r}: {{'input_cost_per_token': ..., 'output_cost_per_token': ...}}}})"
        )


class EntityError(RateLimiterError):
    """A request (to the proxy or the admin API) that cannot be carried out as sent;
    ``status`` is the HTTP status to answer, ``param`` the field at fault, ``kind`` the
    error's type when it is more precise than the status's."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind
