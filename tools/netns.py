"""Test hosts on one machine: Linux network namespaces on a bridge, each with its own address.

    with netns.Hosts(3) as hosts:               # 10.213.7.1, .2, .3
        hosts[0].popen(["python", "main.py", ...])
        hosts[2].link_down()                     # cut host 2 off mid-run

Each host is a network namespace joined to a private bridge by a veth pair,
with loopback and its own address on a /24 that only these namespaces use.
All traffic stays between the namespaces the harness creates; it removes them
(and the bridge) on exit. Needs root and iproute2 (`ip`). Links run at veth
speed: these machines' kernels have no netem qdisc to shape them.
"""

import dataclasses
import os
import shutil
import subprocess

SUBNET = "10.213.7"


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root"
    if shutil.which("ip") is None:
        return "network-namespace hosts need iproute2's `ip` (apt-get install iproute2)"
    return None


def _ip(*args: str):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclasses.dataclass
class Host:
    """One test host: a network namespace with `address` on interface eth0."""

    namespace: str
    address: str
    bridge_end: str  # the veth end on the bridge, in the root namespace

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def link_down(self):
        """Takes the host off the network (its processes keep running)."""
        _ip("-n", self.namespace, "link", "set", "eth0", "down")

    def link_up(self):
        _ip("-n", self.namespace, "link", "set", "eth0", "up")


class Hosts:
    """`count` hosts at SUBNET.1 .. SUBNET.count on one bridge; a context manager."""

    def __init__(self, count: int, subnet: str = SUBNET):
        if not 1 <= count <= 250:
            raise ValueError(f"count={count}: 1 to 250 hosts")
        self.count, self.subnet = count, subnet
        tag = f"{os.getpid() % 100000}"  # several test runs may share a machine
        self.bridge = f"lbbr{tag}"
        self.hosts = [
            Host(namespace=f"lbh{tag}-{i}", address=f"{subnet}.{i + 1}", bridge_end=f"lbv{tag}-{i}")
            for i in range(count)
        ]

    def __enter__(self) -> list[Host]:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for host in self.hosts:
                _ip("netns", "add", host.namespace)
                _ip("link", "add", host.bridge_end, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
                _ip("link", "set", host.bridge_end, "master", self.bridge)
                _ip("link", "set", host.bridge_end, "up")
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.namespace, "link", "set", "eth0", "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self.hosts

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        """Deletes the namespaces (and with them their veth pairs) and the bridge; idempotent."""
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
            subprocess.run(["ip", "link", "del", host.bridge_end], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
