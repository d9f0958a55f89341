"""Test helper: several "hosts" on this machine, as network namespaces on one bridge.

Each host is a network namespace (`ip netns`, Debian's iproute2) with its own address on a
private /24, joined to a bridge in the root namespace by a veth pair. The root namespace keeps
the bridge's address and is a host too (the one with PostgreSQL on its loopback). Processes
run on a host through `ip netns exec`; killing a host kills every process in its namespace,
as a machine losing power would. Needs root; `unavailable()` says why it cannot run here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.7"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"imgedit-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Hosts:
    """The hosts of one test: name -> address; `prefix(name)` runs a command on one."""

    tag: str
    bridge: str
    gateway: str
    addresses: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def namespace(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(name)]

    def pids(self, name: str) -> list[int]:
        out = _ip("netns", "pids", self.namespace(name), check=False).stdout
        return [int(p) for p in out.split()]

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path
    ) -> subprocess.Popen[bytes]:
        """`argv` on host `name`, output to `log`; ended with the host."""
        proc = subprocess.Popen(
            [*self.prefix(name), *argv],
            env=env,
            cwd=cwd,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def kill(self, name: str) -> int:
        """SIGKILL every process on the host (its whole process tree); how many there were."""
        pids = self.pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Namespaces and bridges left by a test process that died before its clean-up (they
    would hold SUBNET's addresses); those of a live process are left alone."""
    spaces = _ip("netns", "list", check=False).stdout.split("\n")
    for name in (line.split()[0] for line in spaces if line.strip()):
        m = re.fullmatch(r"ie(\d+)-\w+", name)
        if m and not _alive(int(m.group(1))):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for bridge, pid in re.findall(r"^\d+: (ie(\d+)-br)[:@]", links, flags=re.M):
        if not _alive(int(pid)):
            _ip("link", "del", bridge, check=False)


@contextlib.contextmanager
def hosts(names: Sequence[str]) -> Iterator[Hosts]:
    """Namespaces `names` on one bridge, addresses SUBNET.11, .12...; removed on exit."""
    _remove_stale()
    tag = f"ie{os.getpid()}"
    net = Hosts(tag=tag, bridge=f"{tag}-br", gateway=f"{SUBNET}.1")
    made: list[str] = []
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i, name in enumerate(names):
            ns = net.namespace(name)
            outer, inner = f"{tag}-{i}a", f"{tag}-{i}b"
            _ip("netns", "add", ns)
            made.append(name)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", net.bridge)
            _ip("link", "set", outer, "up")
            address = f"{SUBNET}.{11 + i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            net.addresses[name] = address
        yield net
    finally:
        for name in made:
            net.kill(name)
            _ip("netns", "del", net.namespace(name), check=False)
        _ip("link", "del", net.bridge, check=False)
        for proc in net.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def wait_for(url: str, timeout: float = 60) -> None:
    """Until `url` answers (any status), from the root namespace."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
