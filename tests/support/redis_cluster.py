"""A local Redis Cluster for tests: N masters from the `redis-server` binary on free ports.

Never the machine's own Redis: every node binds 127.0.0.1 on a free port, keeps nothing
but its `nodes.conf` in a private directory, and is stopped by PID (the directory removed)
by `close()`. The slots are split evenly over the masters (CLUSTER ADDSLOTSRANGE), the
nodes meet each other (CLUSTER MEET), and the constructor returns once every node reports
`cluster_state:ok` and agrees on who owns every slot.

`kill` and `start` stop a node with SIGKILL and bring it back on its port (it remembers
its slots in nodes.conf, its data is gone). `migrate_slot` moves one slot, keys included,
from its owner to another master the way `redis-cli --cluster reshard` does: SETSLOT
IMPORTING / MIGRATING, MIGRATE in batches, SETSLOT NODE on both sides. `pause` is called
after each step (tests publish in between).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from support.redis_server import ping

SLOTS = 16384
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
BUS_PORT_OFFSET = 10000  # a node also listens on port + 10000 (the cluster bus)
MAX_PORT = 65535 - BUS_PORT_OFFSET


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free loopback port <= 55535 whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        port = random.randint(20000, MAX_PORT)
        if _free(port) and _free(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class ClusterNode:
    port: int
    dir: str
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    host: str = "127.0.0.1"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, *args: str | bytes | int) -> Any:
        """One command on a fresh connection (no cluster routing), redis-py's parsed reply."""
        import redis

        with redis.Redis(host=self.host, port=self.port, socket_timeout=10) as client:
            return client.execute_command(*args)


class RedisCluster:
    """`masters` cluster-enabled redis-servers sharing the 16384 slots evenly."""

    def __init__(self, masters: int = 3, *, replicas: int = 0) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: apt-get install -y redis-server"
        self._binary = binary
        self._root = tempfile.mkdtemp(prefix="redwire-cluster-")
        self.nodes: list[ClusterNode] = []  # the masters, in slot order
        self.replicas: dict[str, ClusterNode] = {}  # master node id -> its replica
        try:
            for i in range(masters):
                self.nodes.append(self._new_node(f"node{i}"))
            self._create()
            if replicas:
                self._add_replicas()
        except BaseException:
            self.close()
            raise

    def _new_node(self, name: str) -> ClusterNode:
        path = os.path.join(self._root, name)
        os.mkdir(path)
        node = ClusterNode(free_cluster_port(), path)
        self._start_node(node)
        return node

    def _add_replicas(self) -> None:
        """One replica per master (CLUSTER MEET, then CLUSTER REPLICATE), in sync."""
        for master in self.nodes:
            replica = self._new_node(f"replica-of-{master.port}")
            replica.command("CLUSTER", "MEET", master.host, master.port)
            self.replicas[master.node_id] = replica

        def known() -> bool:
            return all(
                master.node_id.encode() in replica.command("CLUSTER", "NODES")
                for master in self.nodes
                for replica in self.replicas.values()
            )

        self.wait_until(known, "the replicas did not meet the masters")
        for master in self.nodes:
            self.replicas[master.node_id].command("CLUSTER", "REPLICATE", master.node_id)

        def in_sync() -> bool:
            for replica in self.replicas.values():
                info = replica.command("INFO", "replication")
                if info.get("master_link_status") != "up":
                    return False
            return self._agreed()

        self.wait_until(in_sync, "the replicas did not sync")

    def failover(self, master: ClusterNode) -> ClusterNode:
        """CLUSTER FAILOVER on `master`'s replica (the graceful, manual kind); returns the
        promoted node once every node agrees. The old master becomes its replica."""
        replica = self.replicas.pop(master.node_id)
        replica.command("CLUSTER", "FAILOVER")

        def promoted() -> bool:  # every node agrees, on the new owner
            if replica.command("ROLE")[0] not in (b"master", "master") or not self._agreed():
                return False
            return replica.addr in self.slot_owners().values()

        self.wait_until(promoted, "the failover did not happen")
        self.nodes[self.nodes.index(master)] = replica
        self.replicas[replica.node_id] = master
        return replica

    @property
    def url(self) -> str:
        """The bus URL naming every master."""
        return "redis+cluster://" + ",".join(node.addr for node in self.nodes)

    # --- lifecycle -------------------------------------------------------------------------

    def _start_node(self, node: ClusterNode) -> None:
        argv = [
            self._binary,
            "--port", str(node.port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000",
            "--save", "",
            "--appendonly", "no",
            "--dir", node.dir,
            "--logfile", os.path.join(node.dir, "redis.log"),
        ]  # fmt: skip
        node.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ping(node.host, node.port):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cluster node on {node.port} did not start:\n{self._log(node)}")
            time.sleep(0.02)  # polling another process until it answers (bounded)
        node.node_id = node.command("CLUSTER", "MYID").decode()

    def _create(self) -> None:
        n = len(self.nodes)
        for i, node in enumerate(self.nodes):
            first, last = i * SLOTS // n, (i + 1) * SLOTS // n - 1
            node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            node.command("CLUSTER", "MEET", self.nodes[0].host, self.nodes[0].port)
        self.wait_until(self._agreed, "the cluster did not reach cluster_state:ok")

    def _agreed(self) -> bool:
        """Every node says cluster_state:ok and has the same slot owners."""
        views = []
        for node in (*self.nodes, *self.replicas.values()):
            info = node.command("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                return False
            views.append(self.slot_owners(node))
        return all(view == views[0] for view in views)

    def wait_until(self, condition: Callable[[], bool], message: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(message)
            time.sleep(0.05)  # polling other processes until they agree (bounded)

    def close(self) -> None:
        """SIGTERM every node we started (SIGKILL if it lingers), remove the directories."""
        for node in (*self.nodes, *self.replicas.values()):
            proc = node.proc
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self._root, ignore_errors=True)

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node (it keeps its nodes.conf: `start` brings it back, empty)."""
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(STOP_TIMEOUT_S)

    def start(self, node: ClusterNode) -> None:
        """Start a killed node again on its port; returns once the cluster agrees again."""
        self._start_node(node)
        self.wait_until(self._agreed, "the cluster did not recover")

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what tests look at ----------------------------------------------------------------

    def flushall(self) -> None:
        for node in self.nodes:  # (replicas follow their master)
            node.command("FLUSHALL")

    def slot_owners(self, node: ClusterNode | None = None) -> dict[int, str]:
        """slot range start -> "host:port" of its master, as `node` (default: the first) sees it."""
        owners: dict[int, str] = {}
        for entry in (node or self.nodes[0]).command("CLUSTER", "SLOTS"):
            owners[int(entry[0])] = f"{entry[2][0].decode()}:{int(entry[2][1])}"
        return owners

    def owner(self, slot: int) -> ClusterNode:
        """The master owning `slot` (as the first node sees it)."""
        for entry in self.nodes[0].command("CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                port = int(entry[2][1])
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no owner for slot {slot}")

    def keyslot(self, key: str | bytes) -> int:
        return int(self.nodes[0].command("CLUSTER", "KEYSLOT", key))

    def migrate_slot(
        self, slot: int, target: ClusterNode, pause: Callable[[str], None] = lambda step: None
    ) -> None:
        """Move `slot` and its keys to `target`, step by step (see the module docstring)."""
        source = self.owner(slot)
        assert source is not target, "the slot is already there"
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        pause("migrating")
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.command("MIGRATE", target.host, target.port, "", 0, 10000, "KEYS", *keys)
            pause("migrated keys")
        target.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        for node in self.nodes:
            if node is not source and node is not target:
                node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self.wait_until(self._agreed, f"the nodes did not agree on slot {slot}'s move")

    def _log(self, node: ClusterNode) -> str:
        path = os.path.join(node.dir, "redis.log")
        if not os.path.exists(path):
            return ""
        with open(path) as fh:
            return fh.read()[-2000:]
