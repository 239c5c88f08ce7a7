"""The private PostgreSQL server of ``ratelimiter.testing.postgres``, skipping the test (with
the reason) where this machine cannot run one."""

from __future__ import annotations

import pytest

from ratelimiter.testing.postgres import PostgresServer as _Server
from ratelimiter.testing.postgres import PostgresUnavailable


class PostgresServer(_Server):
    def __init__(self) -> None:
        try:
            super().__init__()
        except PostgresUnavailable as exc:
            pytest.skip(str(exc))
