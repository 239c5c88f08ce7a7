"""A private PostgreSQL server for the ledger sink's tests, one per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..postgres import PostgresServer


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.remove()
