"""The libvirt provider's config: the hosts it places instances on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unik.providers.base import ProviderConfig


class LibvirtProviderConfig(ProviderConfig):
    # libvirt URIs: qemu:///system, qemu+tcp://host/system, qemu+libssh://root@host/system?keyfile=...
    hosts: list[str] = Field(default_factory=lambda: ["qemu:///system"], min_length=1)
    # "kvm" only where it really runs (a host without VT-x may advertise it, and hang); "auto":
    # kvm on each host where a probe domain boots under it within probe_timeout, else qemu.
    domain_type: Literal["qemu", "kvm", "auto"] = "qemu"
    probe_timeout: float = Field(default=20.0, gt=0)
    # A `dir` storage pool on each host holding the images' and instances' boot files; made
    # (at pool_path) when the host has none of that name.
    pool: str = "unik"
    pool_path: str = "/var/lib/unik/pool"
    # Every libvirt call has this deadline: a host that does not answer fails the call.
    call_timeout: float = Field(default=30.0, gt=0)
    # Seconds the app gets between SIGTERM and SIGKILL on a graceful stop (as on qemu).
    stop_timeout: int = Field(default=5, ge=0, le=600)
    # The host's state of the daemon's domains is read this often (alive() reads only that).
    poll_interval: float = Field(default=1.0, gt=0)
    # The address published ports listen on, on the instance's host (its loopback by default:
    # reachable from that host only; 0.0.0.0 for everyone who reaches the host).
    publish_address: str = "127.0.0.1"
