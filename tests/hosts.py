"""Two test hosts on this machine: network namespaces joined by a veth pair, each with its own address and host
name, for torchrun jobs that span hosts. They reach each other only over the veth (each has its own loopback),
and share the file system, which stands for a cluster's shared filesystem.

Creating them needs root (CAP_NET_ADMIN). Every name holds the creating process's id and a token of its own, so a
run that crashed before its clean-up cannot collide with the next, which removes what it left; `close` kills the
hosts' processes and removes the namespaces (their veth ends with them) and the /etc/netns files that give each its
hosts table."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SUBNET = "10.238.38"  # each pair is isolated in its own namespaces: every pair can use the same addresses


class Refused(Exception):
    """The machine does not let this process create network namespaces."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {' '.join(done.stderr.split())}")


class TwoHosts:
    """Hosts 0 and 1 (`names`, `addresses`); `popen(i, ...)` runs a command on host i."""

    def __init__(self) -> None:
        if shutil.which("ip") is None:
            raise Refused("the `ip` command (iproute2) is not installed")
        _sweep()
        token = secrets.token_hex(3)
        self.namespaces = [f"lmlab-{os.getpid()}-{token}-{i}" for i in (0, 1)]
        self.links = [f"lm{token}v{i}" for i in (0, 1)]  # an interface name has at most 15 characters
        self.names = ["node0", "node1"]
        self.addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]
        try:
            _ip("netns", "add", self.namespaces[0])
        except OSError as err:
            raise Refused(str(err)) from None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.namespaces[1])
        _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(self.addresses, self.names))
        for ns, link, address in zip(self.namespaces, self.links, self.addresses):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts: each host resolves both names
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts, encoding="utf-8")

    def command(self, host: int, args: list[str]) -> list[str]:
        """`args` as run on `host`: in its namespace, under its own host name."""
        return ["ip", "netns", "exec", self.namespaces[host], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.names[host], *args]

    def popen(self, host: int, args: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, args), **kw)

    def link(self, up: bool) -> None:
        """Take the veth between the hosts down (both ends) or bring it back up."""
        for ns, link in zip(self.namespaces, self.links):
            _ip("-n", ns, "link", "set", link, "up" if up else "down")

    def received(self, host: int) -> int:
        """Bytes `host` has received over the veth."""
        done = subprocess.run(["ip", "-n", self.namespaces[host], "-j", "-s", "link", "show", "dev", self.links[host]],
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)[0]["stats64"]["rx"]["bytes"]

    def pids(self, host: int) -> list[int]:
        """Every process running on `host` now."""
        done = subprocess.run(["ip", "netns", "pids", self.namespaces[host]], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def signal(self, host: int, sig: int) -> None:
        """Send `sig` to every process of `host` at once: SIGKILL, as a machine that loses power; SIGSTOP, as one
        that freezes (until SIGCONT)."""
        for pid in self.pids(host):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for host, ns in enumerate(self.namespaces):
            self.signal(host, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for link in self.links:  # left in the root namespace only if the set-up failed before moving it
            subprocess.run(["ip", "link", "del", link], capture_output=True)


@contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """Hosts 0 and 1, removed afterwards whatever happened; a one-line skip where namespaces are refused."""
    try:
        hosts = TwoHosts()
    except Refused as why:
        pytest.skip(f"two test hosts need network namespaces, which this machine refuses ({why}): run as root")
    try:
        yield hosts
    finally:
        hosts.close()


def _sweep() -> None:
    """Remove the namespaces that test processes no longer alive left behind (killed before their clean-up)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for ns in listed:
        parts = ns.split("-")
        if len(parts) == 4 and parts[0] == "lmlab" and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def wait_until(predicate, what: str, timeout: float = 300) -> None:
    """Poll an observable condition; fail naming `what` after `timeout` seconds: a bound on a hang, not a verdict on
    speed (a torchrun restart's rendezvous on a busy machine takes minutes)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
