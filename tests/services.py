"""Real services for integration tests: fresh databases on the shared PostgreSQL, private Redis
servers, and private PostgreSQL clusters for fault tests (never the shared ones)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from redis.asyncio import Redis, RedisCluster

SHARED_DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def create_database(prefix: str = "nz_test") -> str:
    """A fresh, empty database on the shared server; fails loudly if the server does not answer."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(SHARED_DATABASE_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"PostgreSQL does not answer at DATABASE_URL ({exc.__class__.__name__}); "
            "start it (see .ci/run) — integration tests never skip") from exc
    return make_conninfo(SHARED_DATABASE_URL, dbname=name)


def drop_database(url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(SHARED_DATABASE_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(str(name))))


def as_url(conninfo: str) -> str:
    """postgresql:// form of a conninfo string (the settings validator wants a URL)."""
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = params.get("user", "postgres")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return f"postgresql://{user}@{host}:{port}/{params['dbname']}"


def redis_client(url: str, **kwargs: Any) -> Redis:
    """A client of the kind the gateway builds for the same environment: with REDIS_CLUSTER=true
    (the cluster tests set it) a cluster client seeded at *url*, so a test reads what the gateway wrote."""
    if os.environ.get("REDIS_CLUSTER", "").strip().lower() == "true":
        return RedisCluster.from_url(url, **kwargs)  # type: ignore[return-value]
    return Redis.from_url(url, **kwargs)


class PrivateRedis:
    """A redis-server of our own on a free port, with nothing on disk."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; integration tests need it")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl) that fault tests may stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nz-pg-"))
        self.data = self.dir / "data"
        self._user_args: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root; the machine's `postgres` user owns the cluster.
            shutil.chown(self.dir, "postgres")
            self._user_args = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/neuronetz"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._user_args, *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60)

    def init(self) -> PrivatePostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.dir / "log"), "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
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


class PrivateRedisCluster:
    """A Redis Cluster of our own: 3 masters and one replica each, on free ports, files only in a
    temp dir. `kill_master_of(key)` lets a test fail one master over to its replica."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed for the cluster tests")
        self.dir = Path(tempfile.mkdtemp(prefix="nz-redis-cluster-"))
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.ports = [_cluster_port() for _ in range(masters * 2)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A seed node (REDIS_URL with REDIS_CLUSTER=true)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning", "--logfile", str(node_dir / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], check=True,
                              capture_output=True, text=True, timeout=30)
        return done.stdout

    def start(self) -> PrivateRedisCluster:
        try:
            for port in self.ports:
                self._start_node(port)
            for port in self.ports:
                _wait_port(port)
            subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-replicas", "1", "--cluster-yes"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def nodes(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as a live node sees it: id, port, role (master/slave), flags, master id,
        slot ranges."""
        live = next(p for p in self.ports if p in self.procs)
        rows = []
        for line in self.cli(live, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            slots = [(int(r.split("-")[0]), int(r.split("-")[-1])) for r in fields[8:] if r[0].isdigit()]
            rows.append({"id": fields[0], "port": fields[1].split("@")[0].rsplit(":", 1)[1],
                         "flags": fields[2], "master": fields[3], "slots": slots,
                         "role": "master" if "master" in fields[2] else "slave"})
        return rows

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Every slot served, every live node agrees, every master has a replica that has synced
        (a replica that never synced cannot take over)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                states = [self.cli(p, "CLUSTER", "INFO") for p in self.procs]
                ok = all("cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states)
                masters = [n for n in self.nodes() if n["role"] == "master" and "fail" not in n["flags"]]
                replicas = {n["master"] for n in self.nodes() if n["role"] == "slave"
                            and "fail" not in n["flags"]}
                synced = all("master_link_status:up" in self.cli(int(n["port"]), "INFO", "replication")
                             for n in self.nodes() if n["role"] == "slave" and "fail" not in n["flags"])
                covered = len(masters) == self.masters and all(m["id"] in replicas for m in masters)
                if ok and synced and covered:
                    return
            except (subprocess.CalledProcessError, StopIteration):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster in {self.dir} not healthy after {timeout_s}s")
            time.sleep(0.1)

    def master_port_of(self, key: str) -> int:
        """The port of the live master that serves *key*'s slot."""
        slot = int(self.cli(next(iter(self.procs)), "CLUSTER", "KEYSLOT", key).strip())
        for node in self.nodes():
            if node["role"] == "master" and "fail" not in node["flags"]:
                for lo, hi in node["slots"]:
                    if lo <= slot <= hi:
                        return int(node["port"])
        raise RuntimeError(f"no live master serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash would."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def restart(self, port: int) -> None:
        """Start a killed node again from its nodes.conf; it rejoins (as a replica if it was failed over)."""
        self._start_node(port)
        _wait_port(port)

    def errorstats(self) -> str:
        """INFO errorstats of every live node, joined: CROSSSLOT shows up here if any command tried."""
        return "\n".join(self.cli(p, "INFO", "errorstats") for p in self.procs)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)
