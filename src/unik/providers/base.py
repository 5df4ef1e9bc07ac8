"""The Provider interface: one module per hypervisor or cloud, like OPS's provider/<name>/."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unik.errors import NotImplementedByProvider
from unik.kernel import Kernel


@dataclass
class LaunchSpec:
    """Everything needed to boot an instance; stored with it so `start` boots it the same way."""

    kernel: str
    initrd: str
    memory_mb: int
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] | None = None
    hostname: str = ""
    debug_mode: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

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

    async def attach_volume(self, instance_id: str, volume_path: Path, mount: str) -> None:
        raise NotImplementedByProvider(f"provider {self.name} cannot attach volumes to running instances yet")

    async def detach_volume(self, instance_id: str, volume_path: Path) -> None:
        raise NotImplementedByProvider(f"provider {self.name} cannot detach volumes from running instances yet")
