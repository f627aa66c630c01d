"""Real Redis servers for tests, all from the one ``redis-server`` binary on PATH, on free ports.

- ``Server``: one process (standalone, cluster node or sentinel) with its own temp dir; ``kill()`` is SIGKILL.
- ``Cluster``: N primaries (and optionally one replica each) joined with ``redis-cli --cluster create``.
- ``SentinelSet``: a primary, a replica and three sentinels watching them.

Everything started is stopped by ``stop()`` (fixtures call it in a ``finally``), and the temp dirs removed.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

_STARTED: list[Server] = []


@atexit.register
def _stop_leftovers() -> None:
    """Whatever a crashed fixture did not stop: never leave a redis-server behind."""
    for server in _STARTED:
        server.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    assert path, f"{name} is not on PATH: run `make test`, which installs it"
    return path


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout} s (last error: {last!r})")


class Server:
    """One redis-server (or redis-sentinel) process."""

    def __init__(self, *args: str, port: int | None = None, sentinel_conf: str | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="presence-redis-")
        self.args = list(args)
        self.sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        base = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "", "--appendonly", "no"]
        if self.sentinel_conf is not None:
            conf = Path(self.dir) / "sentinel.conf"
            if not conf.exists():
                conf.write_text(self.sentinel_conf)
            cmd = [binary(), str(conf), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            cmd = [binary(), *base, "--enable-debug-command", "yes", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self.dir)
        _STARTED.append(self)
        wait_until(self._answers, 10, f"redis on port {self.port}")

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"redis-server on port {self.port} exited at start"
        with redis.Redis(port=self.port, socket_timeout=1) as c:
            return bool(c.ping())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """A Redis Cluster of ``primaries`` primaries, each with ``replicas`` replicas, on 127.0.0.1."""

    def __init__(self, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.nodes: list[Server] = []
        try:
            for _ in range(primaries * (1 + replicas)):
                port = free_cluster_port()
                self.nodes.append(
                    Server(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        "--cluster-require-full-coverage",
                        "yes",
                        port=port,
                    )
                )
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [
                    binary("redis-cli"),
                    "--cluster",
                    "create",
                    *addrs,
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_ok()
            if replicas:
                # A replica that never synced has no data age to fail over with.
                wait_until(self._replicas_synced, 30, "every replica in sync with its primary")
        except BaseException:
            self.stop()
            raise

    def _replicas_synced(self) -> bool:
        for node in self.alive():
            with node.client() as c:
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
        return True

    @property
    def url(self) -> str:
        """A plain redis:// URL of one node: the service finds the rest itself."""
        return self.nodes[0].url

    def alive(self) -> list[Server]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout: float = 30, frozen: Server | None = None) -> None:
        """Every live node says cluster_state:ok, all slots are served, and no dead (or ``frozen``) node serves any."""
        live = [n for n in self.alive() if n is not frozen]
        dead = {n.port for n in self.nodes} - {n.port for n in live}

        def ok() -> bool:
            for node in live:
                with node.client() as c:
                    if any(int(r[2][1]) in dead for r in c.execute_command("CLUSTER", "SLOTS")):
                        return False
                with node.client() as c:
                    info = c.cluster("info")
                    if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                        return False
            return True

        wait_until(ok, timeout, "cluster_state:ok")

    def primaries(self) -> list[Server]:
        out = []
        for node in self.alive():
            with node.client() as c:
                if c.info("replication")["role"] == "master":
                    out.append(node)
        return out

    def primary_for(self, key: str) -> Server:
        slot = redis.crc.key_slot(key.encode())
        for node in self.primaries():
            with node.client() as c:
                for start, end, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end and _[0][1] == node.port:
                        return node
        raise AssertionError(f"no primary owns slot {slot}")

    def flush(self) -> None:
        for node in self.primaries():
            with node.client() as c:
                c.flushall()
                c.function_flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelSet:
    """One primary, one replica and three sentinels (quorum 2) watching ``master_name``."""

    def __init__(self, master_name: str = "presence-test", down_after_ms: int = 1000) -> None:
        self.master_name = master_name
        self.servers: list[Server] = []
        self.sentinels: list[Server] = []
        try:
            primary = Server()
            self.servers.append(primary)
            self.servers.append(Server("--replicaof", "127.0.0.1", str(primary.port)))
            conf = (
                f"sentinel monitor {master_name} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                f"sentinel failover-timeout {master_name} 5000\n"
                f"sentinel parallel-syncs {master_name} 1\n"
            )
            for _ in range(3):
                self.sentinels.append(Server(sentinel_conf=conf))
            wait_until(self._replicated, 20, "the replica in sync and every sentinel seeing it")
        except BaseException:
            self.stop()
            raise

    def _replicated(self) -> bool:
        with self.servers[1].client() as c:
            if c.info("replication").get("master_link_status") != "up":
                return False
        for s in self.sentinels:
            with s.client() as c:
                info = c.sentinel_master(self.master_name)
                if int(info["num-slaves"]) < 1 or int(info["num-other-sentinels"]) < 2:
                    return False
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def master(self) -> Server:
        with self.sentinels[0].client() as c:
            _, port = c.sentinel_get_master_addr_by_name(self.master_name)
        return next(s for s in self.servers if s.port == int(port))

    def stop(self) -> None:
        for s in self.sentinels + self.servers:
            s.stop()
