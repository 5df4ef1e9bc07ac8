"""Host side of instance networking for the QEMU provider.

Two modes, chosen by the provider config's ``network``:

- ``user``: qemu's user-mode stack (slirp). The guest is always 10.0.2.15/24 behind qemu's
  own gateway (10.0.2.2) and resolver (10.0.2.3); it is reached through published ports,
  ``hostfwd`` rules bound to ``publish_address``. No privileges needed, nothing on the host.
- ``bridge``: each instance gets a tap device on a Linux bridge and its own address from
  ``subnet`` (allocated and persisted by the daemon, see ``Store.allocate_address``). The
  bridge is created when missing, with the subnet's first address as the guests' gateway.
  Several daemons (or first boots) may share one bridge and set it up at the same moment:
  each step accepts finding its work already done by another.

Taps are made persistent by the daemon (``ip tuntap add``) rather than by qemu, so they
outlive a daemon restart while the VM runs, and the daemon removes them when the VM is gone
(stop, delete, or noticed by the monitor when it exits on its own).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any

from unik.errors import BadRequest, Conflict, UnikError

if TYPE_CHECKING:
    # Only a type here: importing the qemu package at run time would cycle back through its
    # provider, which imports this module.
    from unik.providers.qemu.config import QemuProviderConfig

log = logging.getLogger(__name__)

USER_GUEST = {"address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns": "10.0.2.3"}
TAP_PREFIX = "unik"
# qemu's own words when a hostfwd port cannot be bound (a race lost after our check).
HOSTFWD_FAILURE = "host forwarding rule"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the debugger's, the tests' daemons)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mac_address(instance_id: str) -> str:
    """Stable per instance (so the guest keeps its identity across restarts), locally administered."""
    digest = hashlib.sha256(instance_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def tap_name(instance_id: str) -> str:
    # IFNAMSIZ: 15 characters at most.
    return f"{TAP_PREFIX}{instance_id[: 15 - len(TAP_PREFIX)]}"


class HostNetwork:
    def __init__(self, config: QemuProviderConfig) -> None:
        self.config = config
        self.mode = config.network
        # Orders this daemon's own launches and releases (a tap's del-then-add must not
        # interleave with its release); other daemons are handled by idempotent steps.
        self._lock = threading.Lock()
        if self.mode == "bridge" and os.geteuid() != 0:
            raise ValueError("network: bridge needs the daemon to run as root (it creates the bridge and taps)")
        if self.mode == "bridge" and shutil.which("ip") is None:
            raise ValueError("network: bridge needs iproute2's `ip` on the daemon's PATH")

    # -- what the provider asks --------------------------------------------------------

    def subnet(self) -> IPv4Network | None:
        return self.config.subnet if self.mode == "bridge" else None

    def gateway(self) -> IPv4Address:
        assert self.config.subnet is not None
        return next(self.config.subnet.hosts())

    def publish_address(self) -> str | None:
        return str(self.config.publish_address) if self.mode == "user" else None

    def check_ports_free(self, ports: list[dict[str, Any]]) -> None:
        if ports and self.mode != "user":
            raise BadRequest(f"published ports need `network: user`; this daemon runs `network: {self.mode}`")
        address = str(self.config.publish_address)
        for port in ports:
            _check_bindable(address, int(port["HostPort"]), str(port["Protocol"]))

    # -- what qemu needs --------------------------------------------------------------

    def guest_config(self, address: str) -> dict[str, str] | None:
        """The guest's /unik/run/net, or None when it has no interface."""
        if self.mode == "user":
            return dict(USER_GUEST)
        if self.mode == "bridge":
            if not address:
                raise UnikError(
                    "this instance has no address on the bridge (it was created under another network mode): "
                    "delete it and run it again"
                )
            dns = str(self.config.dns or self.gateway())
            return {"address": address, "gateway": str(self.gateway()), "dns": dns}
        return None

    def qemu_args(self, instance_id: str, ports: list[dict[str, Any]]) -> list[str]:
        if self.mode == "none":
            return []
        if self.mode == "user":
            netdev = "user,id=n0"
            address = str(self.config.publish_address)
            for port in ports:
                netdev += f",hostfwd={port['Protocol']}:{address}:{int(port['HostPort'])}-:{int(port['GuestPort'])}"
        else:
            netdev = f"tap,id=n0,ifname={tap_name(instance_id)},script=no,downscript=no"
        # romfile= drops the NIC's network-boot ROM: the kernel comes from -kernel, and the ROM
        # is 256 KiB of guest ROM each qemu keeps resident.
        device = f"virtio-net-pci,netdev=n0,mac={mac_address(instance_id)},romfile="
        return ["-netdev", netdev, "-device", device]

    def prepare(self, instance_id: str) -> None:
        """Before qemu starts: the bridge and this instance's tap (bridge mode)."""
        if self.mode != "bridge":
            return
        with self._lock:
            self._ensure_bridge()
            tap = tap_name(instance_id)
            try:
                # A tap left by a VM whose end nobody saw (host crash): start clean.
                if _link_exists(tap):
                    _ip("link", "del", tap)
                _ip("tuntap", "add", "dev", tap, "mode", "tap")
                try:
                    _ip("link", "set", tap, "master", str(self.config.bridge), "up")
                except UnikError:
                    if _link_exists(tap):
                        _run_ip("link", "del", tap)
                    raise
            except UnikError as exc:
                bridge = self.config.bridge
                raise UnikError(f"network: cannot plug tap {tap} into bridge {bridge}: {exc.message}") from None

    def release(self, instance_id: str) -> None:
        if self.mode != "bridge":
            return
        tap = tap_name(instance_id)
        with self._lock:
            if _link_exists(tap):
                try:
                    _ip("link", "del", tap)
                except UnikError as exc:
                    log.warning("cannot remove tap %s: %s", tap, exc)

    def _ensure_bridge(self) -> None:
        """The bridge, up, with the guests' gateway address. The lock orders only this daemon's
        launches: another daemon on the same bridge may be taking the same steps right now, so
        each step accepts finding its work already done (by that daemon, or by ours earlier)."""
        bridge = str(self.config.bridge)
        assert self.config.subnet is not None
        gateway = f"{self.gateway()}/{self.config.subnet.prefixlen}"
        try:
            link = _link_state(bridge)
            if link is None:
                log.info("creating bridge %s for %s", bridge, self.config.subnet)
                added = _run_ip("link", "add", "name", bridge, "type", "bridge")
                # Read back whatever happened: a "File exists" means another daemon created it
                # since we looked, and theirs serves as well as ours.
                link = _link_state(bridge)
                if link is None:
                    raise UnikError(f"ip link add name {bridge} type bridge failed: {added.stderr.strip()}")
            if link.kind != "bridge":
                what = f"a {link.kind} interface" if link.kind else "a device of no virtual kind"
                raise UnikError(
                    f"an interface named {bridge} exists and is not a bridge ({what}): "
                    "remove it or name another bridge in the daemon config"
                )
            if gateway not in link.addresses:
                # On another interface, the address would take the guests' traffic there.
                elsewhere = sorted(set(_interfaces_with(self.gateway())) - {bridge})
                if elsewhere:
                    raise UnikError(
                        f"the guests' gateway {self.gateway()} is already an address of {', '.join(elsewhere)}: "
                        "give this daemon another subnet, or remove the address there"
                    )
                # `replace`, not `add`: it succeeds where another daemon assigned the address
                # since we looked, where `add` fails with "Address already assigned".
                _ip("addr", "replace", gateway, "dev", bridge)
            if not link.up:
                _ip("link", "set", bridge, "up")
        except UnikError as exc:
            raise UnikError(f"network: cannot set up bridge {bridge} for {self.config.subnet}: {exc.message}") from None


@dataclass(frozen=True)
class _Link:
    kind: str  # the driver ("bridge", "tun", "veth"), empty for a physical device or loopback
    addresses: frozenset[str]  # IPv4 addresses as "a.b.c.d/prefixlen"
    up: bool  # administratively up


def _link_state(name: str) -> _Link | None:
    """What the host has under `name` now, None when there is no such interface."""
    # Looked up first, so that a link another daemon makes meanwhile is not taken for `ip` failing.
    if not _link_exists(name):
        return None
    proc = _run_ip("-d", "-j", "addr", "show", "dev", name)
    if proc.returncode != 0:
        if not _link_exists(name):
            return None
        raise UnikError(f"ip addr show dev {name} failed: {proc.stderr.strip()}")
    try:
        links = json.loads(proc.stdout or "[]")
        if not links:
            return None
        link = links[0]
        return _Link(
            kind=str(link.get("linkinfo", {}).get("info_kind", "")),
            addresses=frozenset(
                f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"
            ),
            up="UP" in link.get("flags", []),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnikError(f"cannot read what `ip -j addr show dev {name}` printed: {exc!r}") from None


def _interfaces_with(address: IPv4Address) -> list[str]:
    shown = _ip("-j", "-4", "addr", "show", "to", f"{address}/32")
    try:
        return [str(link["ifname"]) for link in json.loads(shown or "[]")]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnikError(f"cannot read what `ip -j addr show to {address}/32` printed: {exc!r}") from None


def _check_bindable(address: str, port: int, protocol: str) -> None:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if kind == socket.SOCK_STREAM:
            # slirp binds its listeners with SO_REUSEADDR too: a port in TIME_WAIT is usable.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Conflict(f"host port {address}:{port}/{protocol} is already in use") from None
            raise BadRequest(f"cannot publish {address}:{port}/{protocol}: {exc.strerror}") from None


def _link_exists(name: str) -> bool:
    # Asked of the kernel in our own network namespace: /sys/class/net shows the namespace
    # sysfs was mounted from, which is not ours under a bare `unshare --net`.
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _run_ip(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True)
    except OSError as exc:
        raise UnikError(f"cannot run iproute2's `ip`: {exc}") from None


def _ip(*args: str) -> str:
    proc = _run_ip(*args)
    if proc.returncode != 0:
        raise UnikError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout
