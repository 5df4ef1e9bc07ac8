"""daemon-config.yaml, with the original UniK's layout (the CLI owns client-config.yaml).

The original daemon config lists providers by kind, each kind a list of named
configurations (`providers: {qemu: [{name: my-qemu, ...}]}`); we keep that shape and
use the first entry of each kind.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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
    # user: qemu's user-mode stack, reachable through published ports (no privileges needed);
    # bridge: a tap per instance on `bridge`, with an address from `subnet` (needs root).
    network: Literal["user", "bridge", "none"] = "user"
    # A Linux interface name: at most 15 characters.
    bridge: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    subnet: IPv4Network | None = None
    # The host address published ports listen on; 127.0.0.1 keeps instances off the network.
    publish_address: IPv4Address = IPv4Address("127.0.0.1")
    # The guest's resolver in bridge mode (default: the bridge's own address).
    dns: IPv4Address | None = None
    # Which kernel new images get (under kernel_dir): "micro", the project's own (`make
    # kernel-micro`; boots in half the time), or "cloud", Debian's cloud kernel as fetched.
    # Built images keep the kernel they were built with.
    kernel: Literal["cloud", "micro"] = "micro"
    # The VM's firmware. qboot (shipped with qemu) only sets up what booting Linux needs; under
    # TCG it reaches the kernel ~0.06-0.09 s sooner than qemu's default, SeaBIOS ("seabios").
    # qboot never reaches Debian's cloud kernel (it hangs silently), so "auto" is qboot with
    # the micro kernel and SeaBIOS with the cloud one, by the kernel each image was built with.
    firmware: Literal["auto", "qboot", "seabios"] = "auto"
    # Under TCG, qemu's translated-code cache: it fills during boot and stays resident. None
    # sizes it by the guest's RAM (1/8, at least 16 MiB: ~6 MiB per small instance off the host;
    # a JVM at 352 MB boots in 6.5 s with 16 MiB, 3.0 s with 32); 0 is qemu's default (1 GiB).
    tcg_cache_mb: int | None = Field(default=None, ge=0, le=2048)
    # Where guest RAM comes from. "memfd": shared memory without transparent huge pages, so an
    # idle guest keeps resident only the pages it touched (64 MB c-hello: 19.6 MiB, against 28.0
    # with huge pages). "anonymous": qemu's default, the only memory the kernel's samepage
    # merging (KSM) dedupes across instances (with ksmd running: 2.1 MiB). "auto": anonymous
    # when the host runs KSM (/sys/kernel/mm/ksm/run is 1), a memfd otherwise.
    guest_memory: Literal["auto", "memfd", "anonymous"] = "auto"

    @model_validator(mode="after")
    def _bridge_needs_names(self) -> QemuProviderConfig:
        if self.network == "bridge":
            if not self.bridge or self.subnet is None:
                raise ValueError("network: bridge needs `bridge` (an interface name) and `subnet` (e.g. 10.77.0.0/24)")
            if self.subnet.num_addresses < 4:
                raise ValueError(f"subnet {self.subnet} is too small: it needs a gateway and instance addresses")
        return self


class ProvidersConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    qemu: list[QemuProviderConfig] = Field(default_factory=lambda: [QemuProviderConfig()])


class HubSettings(BaseModel):
    """Where the image hub keeps images; the endpoint and credentials come with each request."""

    model_config = ConfigDict(extra="ignore")

    bucket: str = Field(default="unik-hub", min_length=3, max_length=63)
    region: str = "us-east-1"
    # {user} is the hub user name, {image} the image name: the original UniK hub's layout.
    key: str = "{user}/{image}/latest"
    # Path style works with every S3-compatible store (MinIO, Ceph, moto); AWS accepts both.
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    # Memory held by one transfer is about chunk size x concurrency, whatever the image size.
    multipart_chunk_mb: int = Field(default=8, ge=5, le=512)
    max_concurrency: int = Field(default=4, ge=1, le=32)
    connect_timeout: float = Field(default=10, gt=0)
    read_timeout: float = Field(default=120, gt=0)

    @model_validator(mode="after")
    def _key_names_the_image(self) -> HubSettings:
        if "{image}" not in self.key:
            raise ValueError("hub.key must contain {image}")
        unknown = set(re.findall(r"{([^}]*)}", self.key)) - {"user", "image"}
        if unknown:
            raise ValueError(f"hub.key: unknown placeholder(s) {sorted(unknown)}; use {{user}} and {{image}}")
        return self


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    hub: HubSettings = Field(default_factory=HubSettings)
    max_upload_mb: int = Field(default=1024, gt=0)
    # Unpacked sources may be bigger than the upload; this bounds decompression bombs.
    max_unpacked_mb: int = Field(default=4096, gt=0)
    build_timeout: int = Field(default=600, gt=0)
    # Volume files are sparse, but an app may fill them: this bounds the host disk one can take.
    max_volume_mb: int = Field(default=65536, gt=0)
    version: str = ""
    # Whether builds may download (go modules, pip's index, npm ci); off, an upload must carry
    # its dependencies (vendor/, wheels/, node_modules/).
    build_network: bool = False
    # The interpreters and JDK the language compilers pack (None: the distribution's / PATH's).
    python_interpreter: str | None = None
    node_binary: str | None = None
    java_home: Path | None = None
    # When set (or $UNIK_AUTH_TOKEN), every route wants `Authorization: Bearer <token>`.
    auth_token: str | None = Field(default=None, min_length=8)
    # Running (or starting) instances at once; more is a 409, before anything starts.
    max_running_instances: int = Field(default=64, gt=0)
    # HTTPS: handed to uvicorn as they are (PEM files).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Builds run the user's toolchain on the user's code: with bubblewrap they see the host
    # read-only and nothing of the data dir but their own folder. auto: when bwrap works here.
    build_sandbox: Literal["auto", "bwrap", "off"] = "auto"

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
