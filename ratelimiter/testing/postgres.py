"""A private PostgreSQL server for the ledger sink's tests and benchmarks: ``initdb`` in a fresh
directory, ``postgres`` on a free port of 127.0.0.1, never a shared instance.
``PostgresUnavailable`` says why there is none (binaries absent, root with no ``postgres``
user). PostgreSQL refuses to run as root: under root the server runs as the ``postgres``
system user, which then owns the directory."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "PostgresUnavailable"]

EXTRA: list[str] = []
BINARIES = ("initdb", "postgres")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a private PostgreSQL server; the message says why."""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


class PostgresServer:
    def __init__(self) -> None:
        missing = [name for name in BINARIES if _binary(name) is None]
        if missing:
            raise PostgresUnavailable(
                f"PostgreSQL binaries not found on this machine: {', '.join(missing)}"
            )
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root and there is no 'postgres' user to run PostgreSQL"
                ) from None
            self.user = "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="rl-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [_binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, user=self.user,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresServer:
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [_binary("postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", *EXTRA],
            stdout=log, stderr=log, user=self.user,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text())
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                ready = subprocess.run(
                    [_binary("pg_isready") or "true", "-h", "127.0.0.1", "-p", str(self.port)],
                    capture_output=True,
                )
                if ready.returncode == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("PostgreSQL did not start in 30 s")

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Stop the server (SIGINT: a fast shutdown); its data stays for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
