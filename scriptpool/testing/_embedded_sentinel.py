"""A private Redis Sentinel set on free loopback ports: a primary, its replicas and the sentinels
that watch them, for tests, benchmarks and trying failover on one machine.

Every process is started here with ``subprocess.Popen`` and stopped through its own handle. The
sentinels are ``redis-server --sentinel`` (any redis-server binary is a sentinel too). Each node
has its own writable directory and config file: sentinels rewrite theirs on every state change,
and rewrite the data nodes' (``replicaof``) when they reconfigure them, so a restarted node comes
back in the role the sentinels gave it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from scriptpool.config.errors import ConfigurationError
from scriptpool.testing._embedded_redis import find_redis_server, free_port

MASTER_NAME = "scriptpool"


@dataclass
class _Node:
    """One redis-server process (a data node or a sentinel) and its directory."""

    port: int
    dir: Path
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(sig)

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen node cannot act on SIGTERM
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


class EmbeddedSentinelSet:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels (quorum ``quorum``) on loopback.

    ``down_after_ms`` is how long the sentinels wait before calling a silent primary down; a
    failover then takes about ``down_after_ms`` + 1.2 s (measured with 3 sentinels and 1 replica).
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        sentinel_password: str | None = None,
        appendonly: bool = False,
        master_name: str = MASTER_NAME,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (CA certificate, server certificate, server key) to serve TLS only, on every
        data node and sentinel, replication and the sentinels' own links included."""
        self.password = password
        self.tls = tls
        self.sentinel_password = sentinel_password
        self.master_name = master_name
        self.dir = Path(tempfile.mkdtemp(prefix="scriptpool-sentinel-"))
        server = find_redis_server()
        tls_lines: list[str] = []
        if tls:
            ca, cert, key = tls
            tls_lines = [
                f"tls-ca-cert-file {ca}",
                f"tls-cert-file {cert}",
                f"tls-key-file {key}",
                "tls-auth-clients no",
                "tls-replication yes",
            ]
        self.data: dict[int, _Node] = {}
        first_port = 0
        for index in range(1 + replicas):
            port = free_port()
            first_port = first_port or port
            node_dir = self.dir / f"redis-{port}"
            node_dir.mkdir()
            lines = [
                *(["port 0", f"tls-port {port}", *tls_lines] if tls else [f"port {port}"]),
                "bind 127.0.0.1",
                "protected-mode no",
                f"dir {node_dir}",
                f"logfile {node_dir / 'redis.log'}",
                'save ""',
                f"appendonly {'yes' if appendonly else 'no'}",
                # A new replica syncs straight over the socket, at once, not after 5 s.
                "repl-diskless-sync yes",
                "repl-diskless-sync-delay 0",
            ]
            if password:
                lines += [f"requirepass {password}", f"masterauth {password}"]
            if index:
                lines.append(f"replicaof 127.0.0.1 {first_port}")
            conf = node_dir / "redis.conf"
            conf.write_text("\n".join(lines) + "\n")
            self.data[port] = _Node(port, node_dir, [server, str(conf)])
        self.first_primary = first_port
        self.sentinels: dict[int, _Node] = {}
        for _ in range(sentinels):
            port = free_port()
            node_dir = self.dir / f"sentinel-{port}"
            node_dir.mkdir()
            lines = [
                *(["port 0", f"tls-port {port}", *tls_lines] if tls else [f"port {port}"]),
                "bind 127.0.0.1",
                "protected-mode no",
                f"dir {node_dir}",
                f"logfile {node_dir / 'sentinel.log'}",
                "sentinel resolve-hostnames no",
                f"sentinel monitor {master_name} 127.0.0.1 {first_port} {quorum}",
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {master_name} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {master_name} {password}")
            if sentinel_password:
                lines.append(f"requirepass {sentinel_password}")  # also what sentinels use among themselves
            conf = node_dir / "sentinel.conf"
            conf.write_text("\n".join(lines) + "\n")
            self.sentinels[port] = _Node(port, node_dir, [server, str(conf), "--sentinel"])

    # -- addresses -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The ``sentinel://`` URL of this set (database 0)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        options = []
        if self.sentinel_password:
            options.append(f"sentinel_password={quote(self.sentinel_password, safe='')}")
        if self.tls:
            options.append(f"ssl=true&ssl_ca_certs={quote(str(self.tls[0]))}")
        query = f"?{'&'.join(options)}" if options else ""
        return f"sentinel://{auth}{hosts}/{self.master_name}/0{query}"

    def direct_url(self, port: int | None = None) -> str:
        """A plain ``redis://`` (``rediss://``) URL of one data node (the current primary by default)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        scheme, query = ("rediss", f"?ssl_ca_certs={quote(str(self.tls[0]))}") if self.tls else ("redis", "")
        return f"{scheme}://{auth}127.0.0.1:{port or self.primary_port()}/0{query}"

    def _tls(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.tls[0])} if self.tls else {}

    def data_client(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, password=self.password, socket_timeout=2, socket_connect_timeout=0.5, **self._tls()
        )

    def sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port,
            password=self.sentinel_password,
            socket_timeout=1,
            socket_connect_timeout=0.5,
            decode_responses=True,
            **self._tls(),
        )

    def primary_port(self) -> int:
        """The port of the primary as a majority of running sentinels names it."""
        votes: dict[int, int] = {}
        for port, node in self.sentinels.items():
            if not node.running:
                continue
            try:
                with self.sentinel_client(port) as client:
                    answer = client.execute_command("SENTINEL", "get-master-addr-by-name", self.master_name)
            except redis.RedisError:
                continue
            if answer:
                votes[int(answer[1])] = votes.get(int(answer[1]), 0) + 1
        if not votes:
            raise ConfigurationError("no sentinel names a primary")
        return max(votes, key=lambda port: votes[port])

    def replica_ports(self) -> list[int]:
        primary = self.primary_port()
        return [port for port in self.data if port != primary]

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> EmbeddedSentinelSet:
        try:
            for node in self.data.values():
                node.start()
            self._wait(self._primary_answers, timeout_s, "the primary to answer")
            for port in self.data:
                if port != self.first_primary:
                    self.wait_replica_synced(port, timeout_s)
            for node in self.sentinels.values():
                node.start()
            self.wait_sentinels_agree(timeout_s)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _primary_answers(self) -> bool:
        with self.data_client(self.first_primary) as client:
            return bool(client.ping())

    def wait_replica_synced(self, port: int, timeout_s: float = 30.0) -> None:
        def synced() -> bool:
            with self.data_client(port) as client:
                info: dict[str, Any] = client.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        self._wait(synced, timeout_s, f"replica {port} to sync")

    def wait_sentinels_agree(self, timeout_s: float = 30.0) -> None:
        """Until every running sentinel sees the others, one primary, and its replicas: before
        that a failover may not reach its quorum."""
        running = [port for port, node in self.sentinels.items() if node.running]

        def ready() -> bool:
            primary = self.primary_port()
            for port in running:
                with self.sentinel_client(port) as client:
                    state = client.sentinel_master(self.master_name)
                if int(state["port"]) != primary or state["is_sdown"] or state["is_odown"]:
                    return False
                if state["num-other-sentinels"] < len(running) - 1:
                    return False
                if state["num-slaves"] < len(self.data) - 1:
                    return False
            return True

        self._wait(ready, timeout_s, "the sentinels to see each other and the replicas")

    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (redis.RedisError, OSError, ConfigurationError) as exc:
                last = exc
            time.sleep(0.05)
        raise ConfigurationError(f"timed out waiting for {what} ({last!r}); logs in {self.dir}")

    # -- faults --------------------------------------------------------------------------------
    def kill(self, port: int) -> None:
        """SIGKILL the data node on ``port``."""
        self.data[port].stop(kill=True)

    def freeze(self, port: int) -> None:
        """SIGSTOP the data node on ``port``: its sockets stay open and silent."""
        self.data[port].signal(signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        self.data[port].signal(signal.SIGCONT)

    def restart(self, port: int) -> None:
        """Start a stopped data node again, with the config the sentinels may have rewritten."""
        self.data[port].start()

    def wait_for_new_primary(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Block until the sentinels name a primary other than ``old_port``; return its port.

        If their own election has not got there in half the time (it stalled once in a few
        hundred runs here, with the sentinels' logs gone with the test), one sentinel is asked to
        fail over (``SENTINEL FAILOVER``), and on a timeout the sentinels' last log lines are in
        the error."""
        found: list[int] = []

        def moved() -> bool:
            port = self.primary_port()
            found.append(port)
            return port != old_port

        try:
            self._wait(moved, timeout_s / 2, f"a failover away from {old_port}")
        except ConfigurationError:
            with contextlib.suppress(redis.RedisError, OSError):
                self.sentinel_client(next(iter(self.sentinels))).sentinel_failover(self.master_name)
            try:
                self._wait(moved, timeout_s / 2, f"a failover away from {old_port}, asked for")
            except ConfigurationError as exc:
                tails = [
                    f"{node.dir.name}: " + " | ".join(log.read_text(errors="replace").splitlines()[-8:])
                    for node in self.sentinels.values()
                    if (log := node.dir / "sentinel.log").exists()
                ]
                raise ConfigurationError(f"{exc}; {' // '.join(tails)}") from None
        return found[-1]

    def stop(self) -> None:
        for node in [*self.sentinels.values(), *self.data.values()]:
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedSentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
