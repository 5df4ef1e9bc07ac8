"""An in-memory provider for unit tests of the services: no VM, every call recorded.

A "VM" is a flag and a console file that says what it was booted with, so the services'
rules (lifecycle, conflicts, volumes, recovery) can be tested in milliseconds. Its kernel is a
stand-in: images built for it are real initrds around a kernel file that boots nothing.
Tests register it (`registry.register(FAKE_KIND)`); the daemon's built-in registry does not.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from unik.errors import Conflict
from unik.kernel import Kernel
from unik.models import LaunchSpec, PortMapping, VolumeAttachment
from unik.providers.base import Capability, Provider, ProviderConfig, ProviderContext
from unik.providers.registry import ProviderKind

FAKE_KERNEL_VERSION = "0.0.0-unik-fake"


class FakeProviderConfig(ProviderConfig):
    name: str = "fake"
    # Which Capability names this provider claims; all by default.
    capabilities: list[str] = Field(default_factory=lambda: [c.name for c in Capability])
    # A launch fails with this message when set (to test the cleanup of failed runs).
    fail_launch: str = ""


@dataclass
class FakeVM:
    spec: LaunchSpec
    running: bool = True
    volumes: dict[str, VolumeAttachment] = field(default_factory=dict)


class FakeProvider(Provider):
    name = "fake"
    infrastructure = "QEMU"

    def __init__(self, config: ProviderConfig, context: ProviderContext) -> None:
        super().__init__(config, context)
        self.fake_config = config if isinstance(config, FakeProviderConfig) else FakeProviderConfig()
        self.root = context.data_dir / "fake"
        self.vms: dict[str, FakeVM] = {}
        self.calls: list[tuple[str, str]] = []

    def capabilities(self) -> frozenset[Capability]:
        return frozenset(Capability[name] for name in self.fake_config.capabilities)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "vms": len(self.vms)}

    def kernel(self) -> Kernel:
        kernel = Kernel(FAKE_KERNEL_VERSION, self.root / "kernel")
        if not kernel.is_complete():
            kernel.modules_dir.mkdir(parents=True, exist_ok=True)
            (kernel.modules_dir / "modules.dep").write_text("")
            kernel.vmlinux.write_bytes(b"not a kernel\n")
            kernel.bzimage.write_bytes(b"not a kernel\n")
        return kernel

    def _folder(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id

    def console_path(self, instance_id: str) -> Path:
        return self._folder(instance_id) / "console.log"

    async def launch(self, instance_id: str, spec: LaunchSpec) -> bool:
        self.calls.append(("launch", instance_id))
        if self.fake_config.fail_launch:
            raise Conflict(self.fake_config.fail_launch)
        for file in self.context.artifacts.files(spec.image_id, spec.artifact).values():
            if not file.is_file():
                raise FileNotFoundError(file)
        self._folder(instance_id).mkdir(parents=True, exist_ok=True)
        mounts = [v.mount for v in spec.volumes]
        with open(self.console_path(instance_id), "a") as console:
            console.write(f"booted {spec.image_id} env={sorted(spec.env.items())} mounts={mounts}\n")
        self.vms[instance_id] = FakeVM(spec, volumes={v.serial: v for v in spec.volumes})
        return False

    async def stop(self, instance_id: str) -> None:
        self.calls.append(("stop", instance_id))
        if instance_id in self.vms:
            self.vms[instance_id].running = False

    def alive(self, instance_id: str) -> bool:
        vm = self.vms.get(instance_id)
        return vm is not None and vm.running

    def exit(self, instance_id: str) -> None:
        """The app exits on its own, as a real guest's may."""
        self.vms[instance_id].running = False

    async def remove(self, instance_id: str, *, keep_files: bool = False) -> None:
        self.calls.append(("remove", instance_id))
        self.vms.pop(instance_id, None)
        if not keep_files:
            shutil.rmtree(self._folder(instance_id), ignore_errors=True)

    def instance_ids(self) -> set[str]:
        folder = self.root / "instances"
        on_disk = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
        return on_disk | set(self.vms)

    def debug_port(self, instance_id: str) -> int | None:
        vm = self.vms.get(instance_id)
        return 1234 if vm is not None and vm.spec.debug_mode else None

    async def attach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        self.require(Capability.HOT_PLUG)
        self.vms[instance_id].volumes[volume.serial] = volume

    async def detach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        self.require(Capability.HOT_PLUG)
        self.vms[instance_id].volumes.pop(volume.serial, None)

    def publish_address(self) -> str | None:
        return "127.0.0.1" if Capability.PUBLISHED_PORTS in self.capabilities() else None

    def check_ports_free(self, ports: list[PortMapping]) -> None:
        if ports:
            self.require(Capability.PUBLISHED_PORTS)


FAKE_KIND = ProviderKind("fake", FakeProviderConfig, FakeProvider)
