"""Schemathesis against a running sidecar: every operation of /openapi.json, with data that
fits its schema and data that does not. No 5xx, every answer a documented status, every
refusal in OpenAI's envelope, and nothing that breaks the schema accepted."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from ..conftest import MASTER_KEY, Admin

pytest.importorskip("schemathesis")

SCHEMATHESIS = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",  # a refusal is OpenAI's envelope, as the schema says
        "negative_data_rejection",  # a body that breaks the schema is refused
        "ignored_auth",  # every operation refuses a call without the master key
    ]
)
# Examples per operation: 49 operations (38 before the 11 of organizations), positive and
# negative, in about 100 s alone on a shared 2-core machine; the bound leaves room for a
# loaded one.
EXAMPLES = 5
WAIT_S = 300


@pytest.mark.timeout(WAIT_S + 30)
async def test_every_operation_survives_schemathesis(admin: Admin, tmp_path: Path) -> None:
    await admin.post("/budget/new", {"budget_id": "default"})  # some ids exist to be found
    run = await asyncio.create_subprocess_exec(
        SCHEMATHESIS,
        "run",
        f"{admin.base}/openapi.json",
        "--header",
        f"Authorization: Bearer {MASTER_KEY}",
        "--checks",
        CHECKS,
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        "15",
        "--workers",
        "1",  # with two threads, CPython 3.11's parser can fail inside Hypothesis (SystemError)
        "--no-shrink",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # no schemathesis.toml of anyone else's
    )
    output, _ = await asyncio.wait_for(run.communicate(), WAIT_S)
    text = output.decode(errors="replace")
    assert run.returncode == 0, text[-20_000:]
