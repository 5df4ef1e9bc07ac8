"""The QEMU provider's config: one entry of `providers: {qemu: [...]}` in daemon-config.yaml."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from unik.providers.base import ProviderConfig


class QemuProviderConfig(ProviderConfig):
    name: str = "qemu"
    # "auto" uses KVM only when the CPU flag is there and a probe succeeds: an existing
    # /dev/kvm alone may not work.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    machine: Literal["pc", "q35"] = "pc"
    kernel_dir: Path | None = None
    qemu_binary: str = "qemu-system-x86_64"
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
    # The VM's firmware. qboot (shipped with qemu) only sets up what booting Linux needs, so it
    # reaches the kernel sooner than qemu's default, SeaBIOS ("seabios").
    # qboot never reaches Debian's cloud kernel (it hangs silently), so "auto" is qboot with
    # the micro kernel and SeaBIOS with the cloud one, by the kernel each image was built with.
    firmware: Literal["auto", "qboot", "seabios"] = "auto"
    # Under TCG, qemu's translated-code cache: it fills during boot and stays resident. None
    # sizes it by the guest's RAM (1/8, at least 16 MiB: small instances cost the host less,
    # a JVM still gets room); 0 is qemu's default (1 GiB).
    tcg_cache_mb: int | None = Field(default=None, ge=0, le=2048)
    # Where guest RAM comes from. "memfd": shared memory without transparent huge pages, so an
    # idle guest keeps resident only the pages it touched. "anonymous": qemu's default, the
    # only memory the kernel's samepage merging (KSM) dedupes across instances. "auto": anonymous
    # when the host runs KSM (/sys/kernel/mm/ksm/run is 1), a memfd otherwise.
    guest_memory: Literal["auto", "memfd", "anonymous"] = "auto"
    # VM templates for warm starts (RunInstanceRequest.WarmStart), kept under <data>/templates:
    # at most this many, and this many MB of RAM snapshots in all; the least recently used go.
    warm_templates: int = Field(default=8, ge=0)
    warm_templates_mb: int = Field(default=8192, ge=0)

    @model_validator(mode="after")
    def _bridge_needs_names(self) -> QemuProviderConfig:
        if self.network == "bridge":
            if not self.bridge or self.subnet is None:
                raise ValueError("network: bridge needs `bridge` (an interface name) and `subnet` (e.g. 10.77.0.0/24)")
            if self.subnet.num_addresses < 4:
                raise ValueError(f"subnet {self.subnet} is too small: it needs a gateway and instance addresses")
        return self
