"""Hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

`Network` makes a "switch" namespace holding a bridge, and one namespace per host with an
`eth0` (a veth whose peer is a bridge port in the switch) and its own loopback; nothing is
added to the namespace the tests run in. `cut(host)` / `mend(host)` take a host's link down
and up at the switch (packets dropped, no reset: what a failed cable or a partition does).
`run(host, argv)` starts a process inside a host. `close()` deletes every namespace, which
removes the veths and the bridge with them. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and
iproute2; `unavailable()` says why it cannot run here, or None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    probe = f"rwprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Network:
    """Hosts `name -> address` on one /24, behind one switch."""

    def __init__(self, hosts: dict[str, str], *, prefix_len: int = 24) -> None:
        self.tag = f"rw{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.hosts = dict(hosts)
        self.namespaces: list[str] = []
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host, address in self.hosts.items():
                ns = self.namespace(host)
                self._add_namespace(ns)
                _ip("link", "add", "name", "eth0", "netns", ns, "type", "veth",
                    "peer", "name", self.port(host), "netns", self.switch)  # fmt: skip
                _ip("-n", ns, "addr", "add", f"{address}/{prefix_len}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.switch, "link", "set", self.port(host), "master", "br0")
                _ip("-n", self.switch, "link", "set", self.port(host), "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def port(self, host: str) -> str:
        return f"p{host}"  # the host's bridge port, in the switch namespace

    def cut(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.port(host), "down")

    def mend(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.port(host), "up")

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host` (`ip netns exec` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def run(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(host, argv), text=True, **kwargs)

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
