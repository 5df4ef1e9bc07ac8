"""The Provider interface: one module per hypervisor or cloud, like OPS's provider/<name>/."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from unik.errors import NotImplementedByProvider
from unik.kernel import Kernel


@dataclass(frozen=True)
class VolumeAttachment:
    """A volume as the guest sees it: a disk with this serial, mounted at `mount`."""

    serial: str
    path: str
    mount: str
    fs_type: str


@dataclass
class LaunchSpec:
    """Everything needed to boot an instance; stored with it so `start` boots it the same way."""

    kernel: str
    initrd: str
    memory_mb: int
    # The image's kernel release: the firmware follows the kernel the image was built with, not
    # the config's current choice. Empty for specs stored before it was recorded.
    kernel_version: str = ""
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] | None = None
    hostname: str = ""
    debug_mode: bool = False
    # Not stored: volumes come and go after the run, so each boot is told the current ones.
    volumes: list[VolumeAttachment] = field(default_factory=list)
    # Published ports, as PortMapping dicts (HostPort, GuestPort, Protocol): user-mode network.
    ports: list[dict[str, Any]] = field(default_factory=list)
    # The instance's own address with prefix ("10.77.0.2/24"), allocated by the daemon: bridge mode.
    address: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "volumes"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Provider(ABC):
    name: str
    infrastructure: str

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """What /version reports about this provider (usable? accelerator? kernel?)."""

    @abstractmethod
    def kernel(self) -> Kernel:
        """The kernel that images for this provider are built with (raises when it is missing)."""

    @abstractmethod
    async def launch(self, instance_id: str, spec: LaunchSpec) -> None:
        """Boot the instance's VM, detached: it must survive a daemon restart."""

    @abstractmethod
    async def stop(self, instance_id: str) -> None:
        """Graceful power-off with a deadline, then forced."""

    @abstractmethod
    def alive(self, instance_id: str) -> bool:
        """Is the instance's VM process running (checked cheaply, polled every second)?"""

    @abstractmethod
    def console_path(self, instance_id: str) -> Path:
        """The file holding the guest console, appended across restarts."""

    @abstractmethod
    async def remove(self, instance_id: str, *, keep_files: bool = False) -> None:
        """Kill the VM if it runs and delete the instance's files."""

    def debug_port(self, instance_id: str) -> int | None:
        return None

    def instance_ids(self) -> set[str]:
        """Every instance this provider holds on the host, by its files or a running VM: the
        daemon's start removes those no record names."""
        return set()

    async def attach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Hot-plug the disk and have the guest mount it."""
        raise NotImplementedByProvider(f"provider {self.name} cannot attach volumes to running instances")

    async def detach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Have the guest unmount the disk (Conflict when busy), then unplug it."""
        raise NotImplementedByProvider(f"provider {self.name} cannot detach volumes from running instances")

    def instance_subnet(self) -> IPv4Network | None:
        """The subnet the daemon gives each instance its own address from, or None (no own address)."""
        return None

    def address_candidates(self) -> Iterator[str]:
        """Addresses an instance may get, in order: the subnet's hosts but the first (the gateway)."""
        subnet = self.instance_subnet()
        hosts = iter(subnet.hosts() if subnet is not None else [])
        next(hosts, None)
        return (str(ip) for ip in hosts)

    def publish_address(self) -> str | None:
        """The host address published ports listen on, or None when ports cannot be published."""
        return None

    def check_ports_free(self, ports: list[dict[str, Any]]) -> None:
        """Raise Conflict when a host port cannot be bound right now."""
        if ports:
            raise NotImplementedByProvider(f"provider {self.name} cannot publish ports")

    def release_network(self, instance_id: str) -> None:
        """The VM is gone: free what it held on the host (a tap device). Idempotent."""
        return None
