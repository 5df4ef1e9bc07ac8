"""daemon-config.yaml, with the original UniK's layout (the CLI owns client-config.yaml).

The original daemon config lists providers by kind, each kind a list of named
configurations (`providers: {qemu: [{name: my-qemu, ...}]}`); we keep that shape and
use the first entry of each kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class QemuProviderConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = "qemu"
    # "auto" uses KVM only when the CPU flag is there and a probe succeeds (PLATFORM.md).
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    machine: Literal["pc", "q35"] = "pc"
    kernel_dir: Path | None = None
    qemu_binary: str = "qemu-system-x86_64"
    default_memory_mb: int = Field(default=128, gt=0)
    max_memory_mb: int = Field(default=8192, gt=0)
    # Seconds the guest app gets between SIGTERM and SIGKILL on a graceful stop.
    stop_timeout: int = Field(default=5, ge=0, le=600)
    kernel_cmdline: str = ""
    debugger_port: int = 0
    no_graphic: bool = True


class ProvidersConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    qemu: list[QemuProviderConfig] = Field(default_factory=lambda: [QemuProviderConfig()])


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    max_upload_mb: int = Field(default=1024, gt=0)
    # Unpacked sources may be bigger than the upload; this bounds decompression bombs.
    max_unpacked_mb: int = Field(default=4096, gt=0)
    build_timeout: int = Field(default=600, gt=0)
    version: str = ""

    @property
    def qemu(self) -> QemuProviderConfig | None:
        return self.providers.qemu[0] if self.providers.qemu else None


def load_daemon_config(path: Path | None) -> DaemonConfig:
    """Absent file → the built-in default (one qemu provider)."""
    if path is None or not path.exists():
        return DaemonConfig()
    try:
        raw: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    providers = raw.get("providers")
    if isinstance(providers, dict):
        # A kind may be written as one mapping instead of a list of them.
        raw["providers"] = {k: ([v] if isinstance(v, dict) else v) for k, v in providers.items()}
    try:
        return DaemonConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from exc
