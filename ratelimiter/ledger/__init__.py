"""The spend ledger: one entry per finished request, written by the engine's settlement,
read back as entries and daily rollups, and exported for finance teams."""

from .entries import (
    DAY_MS,
    Entry,
    Ledger,
    collect_expired_holds,
    day_number,
    ledger_dims,
    utc_ms,
)
from .export import CSV_FIELDS, export, read_export

__all__ = [
    "CSV_FIELDS",
    "DAY_MS",
    "Entry",
    "Ledger",
    "collect_expired_holds",
    "day_number",
    "export",
    "ledger_dims",
    "read_export",
    "utc_ms",
]
