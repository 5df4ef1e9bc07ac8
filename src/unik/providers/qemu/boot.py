"""The machine every instance boots on: boot_argv and what it decides (firmware, guest RAM, TCG's kernel arguments)."""

from __future__ import annotations

import functools
from pathlib import Path

from unik.kernel import BOOT_ARGS, MICRO_LOCALVERSION
from unik.providers.qemu.accel import accel_option
from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.options import Arg, ChardevFile, Device, Machine, MemoryBackend, Option, Serial, flatten

# qemu's default model plus RDRAND, which the guest kernel seeds its CRNG from at boot
# (random.trust_cpu in BOOT_ARGS). Under TCG the instruction returns the host's getrandom().
CPU_MODEL = "qemu64,+rdrand"
KSM_RUN = Path("/sys/kernel/mm/ksm/run")
GUEST_RAM_ID = "guest-ram"
CONSOLE_ID = "console"


def boot_argv(
    config: QemuProviderConfig,
    accel: str,
    *,
    kernel: Path,
    initrd: Path,
    memory_mb: int,
    console: Path,
    kernel_version: str = "",
    memory: MemoryBackend | None = None,
) -> list[str]:
    """The machine every instance boots on (the benchmark boots its floor on the same one).
    `memory` replaces where guest RAM comes from (a VM template's file)."""
    machine = [Machine(config.machine, {"memory-backend": memory.id}), memory] if memory else None
    options: list[Option] = [
        *(machine or _machine(config, memory_mb)),
        accel_option(config, accel, memory_mb),
        Arg("-m", memory_mb),
        Arg("-cpu", CPU_MODEL),
        Arg("-nodefaults"), Arg("-no-user-config"), Arg("-display", "none"), Arg("-no-reboot"),
        *([Arg("-bios", "qboot.rom")] if _firmware(config, kernel_version) == "qboot" else []),
        Arg("-kernel", kernel),
        Arg("-initrd", initrd),
        Arg("-append", " ".join([*BOOT_ARGS, *_tcg_boot_args(accel), config.kernel_cmdline]).strip()),
        ChardevFile(CONSOLE_ID, console),
        Serial(CONSOLE_ID),
        Device("isa-debug-exit", {"iobase": "0xf4", "iosize": "0x04"}),
        *([Device("virtio-balloon-pci", {"free-page-reporting": True})] if _is_micro(config, kernel_version) else []),
    ]  # fmt: skip
    return [config.qemu_binary, *flatten(options)]


def _machine(config: QemuProviderConfig, memory_mb: int) -> list[Option]:
    """The machine and where its RAM comes from. A memfd (shmem) rather than anonymous memory:
    qemu asks for transparent huge pages on anonymous guest RAM, and each 2 MiB the guest
    touches at all becomes resident, where a memfd keeps only the pages touched. Unless the
    host runs KSM, which merges only anonymous memory: there, identical guest pages (the
    kernel, zeroes) are shared by all instances."""
    memfd = config.guest_memory == "memfd" or (config.guest_memory == "auto" and not ksm_running())
    if not memfd:
        return [Machine(config.machine)]
    return [
        Machine(config.machine, {"memory-backend": GUEST_RAM_ID}),
        MemoryBackend(GUEST_RAM_ID, memory_mb, "memfd"),
    ]


def ksm_running() -> bool:
    """Whether the host's ksmd merges pages now (1; 0 is stopped, 2 stopped and unmerged)."""
    try:
        return KSM_RUN.read_text().strip() == "1"
    except OSError:
        return False


def _firmware(config: QemuProviderConfig, kernel_version: str) -> str:
    """qboot reaches the micro kernel sooner but never Debian's cloud kernel: under "auto", the
    kernel decides, by its release when known (an image keeps the kernel it was built with),
    else by the config's choice."""
    if config.firmware != "auto":
        return config.firmware
    return "qboot" if _is_micro(config, kernel_version) else "seabios"


def _is_micro(config: QemuProviderConfig, kernel_version: str) -> bool:
    """Whether the instance boots a micro kernel: by its release when known (an image keeps the
    kernel it was built with), else by the config's choice."""
    return MICRO_LOCALVERSION in kernel_version if kernel_version else config.kernel == "micro"


@functools.cache
def _host_tsc_khz() -> int | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def _tcg_boot_args(accel: str) -> list[str]:
    """Kernel arguments for a guest under TCG, which emulates no TSC-deadline timer.

    - The guest's TSC is the host's: telling the kernel its rate skips the early calibration,
      which on a loaded host sometimes goes wrong and hangs the boot.
    - Without a TSC-deadline timer the kernel calibrates the local APIC timer by waiting
      100 ms of wall time. `noapictimer` skips it: the guest (one vCPU, so no broadcast is
      needed) ticks on the HPET instead. Under KVM the deadline timer makes the calibration
      free, and the APIC timer does not exit to qemu.
    - The ACPI PM timer is a clocksource the guest never picks over the TSC, and checking it
      busy-waits 4.5 ms (udelay 0, 100, ... 900 us). `pmtmr=0` leaves it out; the HPET
      remains for the TSC's refined calibration and the clocksource watchdog."""
    if accel != "tcg":
        return []
    khz = _host_tsc_khz()
    return [*([f"tsc_early_khz={khz}"] if khz else []), "noapictimer", "pmtmr=0"]
