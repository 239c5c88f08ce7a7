"""``ratelimiter.middleware``, as the README imports it: see ``ratelimiter.library.middleware``."""

from .library.middleware import engine_context, limit_middleware, limited

__all__ = ["engine_context", "limit_middleware", "limited"]
