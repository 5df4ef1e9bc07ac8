"""Exported disks booted as a user's hypervisor would, in one interleaved run.

For each disk kernel ("disk", ours with every driver built in; "cloud", Debian's with its
modules) one daemon exports examples/c-hello as a raw disk, and each round boots, in turn:

- bios:   the disk under SeaBIOS (-M pc, virtio disk), syslinux loading kernel and initrd;
- uefi:   the disk under OVMF (q35, a fresh variable store), the unified kernel image;
- direct: the same kernel, initrd and command line taken out of the disk, with -kernel;
- floor:  the same kernel with a trivial init that prints a line, with -kernel.

Every VM has a virtio NIC on user-mode networking, so each app boot includes its DHCP lease.
Launch → the app's first line on the serial console. Also: the kernels' and disks' sizes.

    .venv/bin/python bench/disk_boot.py [--rounds N]   # needs `make kernel kernel-disk`

Writes bench/results/disk_boot.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from boot import FLOOR_LINE, floor_initrd, time_to_line
from common import EXAMPLES, daemon, publish, tarball

from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel

KERNELS = ("disk", "cloud")
WAYS = ("bios", "uefi", "direct", "floor")
APP_LINE = b"hello from unik: bench"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
ESP = "@@1048576"  # the partition's offset, for mtools


def export_raw(work: Path, flavour: str) -> Path:
    with daemon(work / f"data-{flavour}", f"disk_kernel: {flavour}\n") as base:
        httpx.post(
            f"{base}/images/hello/create",
            params={"base": "linux", "lang": "c", "provider": "qemu"},
            files={"tarfile": ("app.tar.gz", tarball(EXAMPLES / "c-hello"))},
            timeout=600,
        ).raise_for_status()
        disk = work / f"{flavour}.img"
        answer = httpx.get(f"{base}/images/hello/disk", params={"format": "raw", "env": ["GREETING=bench", "TICKS=1"]},
                           timeout=600)  # fmt: skip
        answer.raise_for_status()
        disk.write_bytes(answer.content)
    return disk


def from_disk(disk: Path, name: str, dest: Path) -> Path:
    subprocess.run(["mcopy", "-n", "-i", f"{disk}{ESP}", f"::/{name}", str(dest)], check=True)
    return dest


def qemu(machine: str, console: Path, *extra: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-M", machine, "-accel", "tcg", "-m", "256", "-cpu", "qemu64,+rdrand",
        "-display", "none", "-serial", f"file:{console}", "-no-reboot", "-nodefaults",
        "-nic", "user,model=virtio-net-pci", *extra,
    ]  # fmt: skip


def boot(way: str, flavour: str, disk: Path, files: dict[str, Path], work: Path, n: int) -> float:
    console = work / f"{flavour}-{way}-{n}.log"
    console.unlink(missing_ok=True)
    drive = ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on"]
    if way == "bios":
        argv = qemu("pc", console, *drive)
    elif way == "uefi":
        vars_copy = work / "VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv = qemu("q35", console, "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,file={vars_copy}", *drive)  # fmt: skip
    else:
        initrd = files["floor"] if way == "floor" else files["initrd"]
        cmdline = files["cmdline"].read_text()
        argv = qemu("pc", console, "-kernel", str(files["kernel"]), "-initrd", str(initrd), "-append", cmdline)
    return time_to_line(argv, console, FLOOR_LINE if way == "floor" else APP_LINE, f"{flavour} {way}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {(k, w): [] for k in KERNELS for w in WAYS}
    sizes: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="unik-bench-", dir="/tmp") as work_dir:
        work = Path(work_dir)
        floor = floor_initrd(work)
        disks, files = {}, {}
        for flavour in KERNELS:
            load_kernel(default_kernel_root(), flavour)  # fails early with how to get it
            disks[flavour] = export_raw(work, flavour)
            kernel = from_disk(disks[flavour], "vmlinuz", work / f"{flavour}.vmlinuz")
            initrd = from_disk(disks[flavour], "initrd.img", work / f"{flavour}.initrd")
            cfg = from_disk(disks[flavour], "syslinux.cfg", work / f"{flavour}.cfg").read_text()
            cmdline = work / f"{flavour}.cmdline"
            append = next(line for line in cfg.splitlines() if line.strip().startswith("APPEND"))
            cmdline.write_text(append.split(None, 1)[1])
            files[flavour] = {"kernel": kernel, "initrd": initrd, "cmdline": cmdline, "floor": floor}
            sizes[flavour] = {"kernel": kernel.stat().st_size, "initrd": initrd.stat().st_size,
                              "disk": disks[flavour].stat().st_size}  # fmt: skip
        for n in range(options.rounds):
            for flavour in KERNELS if n % 2 == 0 else reversed(KERNELS):
                for way in WAYS if n % 2 == 0 else reversed(WAYS):
                    elapsed = boot(way, flavour, disks[flavour], files[flavour], work, n)
                    times[(flavour, way)].append(elapsed)
                    print(f"round {n + 1}: {flavour} {way} {elapsed:.2f} s", file=sys.stderr)
    lines = [
        "# Exported disks: boot by firmware and kernel",
        "",
        f"Host {platform.node()}, TCG; launch → c-hello's first line (the floor: a trivial init's line), "
        f"median (min-max) of {options.rounds} interleaved rounds. Each VM has a virtio NIC on "
        "user-mode networking; the app's boots include a DHCP lease.",
        "",
        "| kernel | bios | uefi | direct -kernel | floor (trivial init, -kernel) | bzImage | initrd | raw disk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for flavour in KERNELS:
        cells = []
        for way in WAYS:
            values = times[(flavour, way)]
            cells.append(f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})")
        size = sizes[flavour]
        lines.append(
            f"| {flavour} | {' | '.join(cells)} | {size['kernel'] / 2**20:.1f} MiB | {size['initrd'] / 2**20:.1f} MiB "
            f"| {size['disk'] / 2**20:.0f} MiB |"
        )
    publish("\n".join(lines), "disk_boot.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
