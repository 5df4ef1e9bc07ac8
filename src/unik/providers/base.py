"""The Provider interface every infrastructure implements, its capabilities and its config base."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from unik.artifacts import ArtifactStore
from unik.errors import NotImplementedByProvider
from unik.kernel import Kernel
from unik.models import KERNEL_INITRD, ImageMeta, LaunchSpec, PortMapping, VolumeAttachment, VolumeMeta

__all__ = ["Capability", "LaunchSpec", "Provider", "ProviderConfig", "ProviderContext", "VolumeAttachment"]


class ProviderConfig(BaseModel):
    """What every provider kind's config has; each kind's model adds its own keys."""

    model_config = ConfigDict(extra="ignore")

    name: str = ""
    default_memory_mb: int = Field(default=128, gt=0)
    max_memory_mb: int = Field(default=8192, gt=0)


class Capability(StrEnum):
    """What not every provider can do; the services answer 501 where one is missing."""

    HOT_PLUG = "attach or detach volumes while an instance runs"
    PUBLISHED_PORTS = "publish host ports"
    OWN_ADDRESSES = "give instances addresses of their own"
    DEBUG_PORT = "start instances halted for a debugger"
    WARM_START = "start instances warm, as clones of a VM template"


@dataclass(frozen=True)
class ProviderContext:
    """What the daemon hands every provider: where its files go and where images are."""

    data_dir: Path
    artifacts: ArtifactStore


def daemon_id(folder: Path) -> str:
    """This daemon's id in `folder` (made the first time): what tags the resources it makes on
    infrastructure other daemons may share (EC2 instances, libvirt domains)."""
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "daemon-id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex + "\n")
    return id_file.read_text().strip()


class Provider(ABC):
    # The config kind (`providers: {<kind>: [...]}`), which is also the name the API uses.
    name: ClassVar[str]
    infrastructure: ClassVar[str]
    # Artifact formats this provider boots.
    artifact_formats: ClassVar[frozenset[str]] = frozenset({KERNEL_INITRD})

    def __init__(self, config: ProviderConfig, context: ProviderContext) -> None:
        self.config = config
        self.context = context

    @property
    def default_memory_mb(self) -> int:
        return self.config.default_memory_mb

    @property
    def max_memory_mb(self) -> int:
        return self.config.max_memory_mb

    def capabilities(self) -> frozenset[Capability]:
        return frozenset()

    def require(self, capability: Capability) -> None:
        if capability not in self.capabilities():
            raise NotImplementedByProvider(f"provider {self.name} cannot {capability.value}")

    def image_modules(self) -> list[str]:
        """Kernel modules every image for this provider carries (its disks' and NIC's drivers)."""
        return []

    def volume_device(self, index: int) -> str:
        """The guest's name for the image's `index`-th volume at boot (DeviceMappings)."""
        return f"/dev/vd{chr(ord('b') + index)}"

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """What /version reports about this provider (usable? accelerator? kernel?)."""

    @abstractmethod
    def kernel(self) -> Kernel:
        """The kernel that images for this provider are built with (raises when it is missing)."""

    @abstractmethod
    async def launch(self, instance_id: str, spec: LaunchSpec) -> bool:
        """Boot the instance's VM, detached: it must survive a daemon restart. True when it
        started warm (a clone of a VM template, spec.warm_start), False when it booted."""

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

    async def publish_image(self, image_id: str, meta: ImageMeta) -> dict[str, str]:
        """The image's files are in place: make it bootable on the infrastructure (an AMI, say)
        before it is recorded. Returns what to keep in `ImageMeta.provider_data`; on failure it
        leaves nothing behind there."""
        return {}

    def forget_image(self, image_id: str, meta: ImageMeta) -> None:
        """The image is gone: drop what the provider keeps of it (its VM templates, its AMI)."""
        return None

    async def publish_volume(self, volume_id: str, disk: Path) -> dict[str, str]:
        """The volume's disk file is made: make it a disk of the infrastructure (an EBS volume).
        Returns what to keep in `VolumeMeta.provider_data`; on failure it leaves nothing there."""
        return {}

    def forget_volume(self, volume_id: str, meta: VolumeMeta) -> None:
        """The volume is deleted: drop what the provider made of it."""
        return None

    async def refresh_console(self, instance_id: str) -> None:
        """Bring console_path() up to date, for consoles that live elsewhere (EC2's)."""
        return None

    def unreachable(self, instance_id: str) -> str | None:
        """Why the provider cannot tell now whether the instance runs (its host does not
        answer), or None: then alive() is the truth."""
        return None

    def host_of(self, instance_id: str) -> str | None:
        """Which of the provider's hosts the instance runs on, for providers with several."""
        return None

    def address_of(self, instance_id: str) -> str | None:
        """The address the infrastructure gave a running instance, when the daemon did not."""
        return None

    def instance_ids(self) -> set[str]:
        """Every instance this provider holds on the host, by its files or a running VM: the
        daemon's start removes those no record names."""
        return set()

    async def attach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Hot-plug the disk and have the guest mount it."""
        self.require(Capability.HOT_PLUG)

    async def detach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Have the guest unmount the disk (Conflict when busy), then unplug it."""
        self.require(Capability.HOT_PLUG)

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

    def check_ports_free(self, ports: list[PortMapping]) -> None:
        """Raise Conflict when a host port cannot be bound right now."""
        if ports:
            self.require(Capability.PUBLISHED_PORTS)

    def release_network(self, instance_id: str) -> None:
        """The VM is gone: free what it held on the host (a tap device). Idempotent."""
        return None
