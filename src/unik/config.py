"""daemon-config.yaml and client-config.yaml, with the original UniK's layout.

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
    raw: Any = yaml.safe_load(path.read_text()) or {}
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


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    host: str = "localhost:3000"
    token: str | None = None


def client_config_path() -> Path:
    return Path.home() / ".unik" / "client-config.yaml"


def load_client_config(path: Path | None = None) -> ClientConfig:
    path = path or client_config_path()
    if not path.exists():
        return ClientConfig()
    raw = yaml.safe_load(path.read_text()) or {}
    return ClientConfig.model_validate(raw if isinstance(raw, dict) else {})


def save_client_config(config: ClientConfig, path: Path | None = None) -> Path:
    path = path or client_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(exclude_none=True)))
    return path
