"""Cloud kernel vs the project's micro kernel, measured in one interleaved run.

For each kernel: boot to c-hello's first line through a daemon whose qemu provider uses that
kernel (POST /instances/run → logs), beside its floor (the same qemu and kernel booting a
trivial static init directly); the kernel files' sizes and the c-hello image's SizeMb.
Rounds alternate the kernels (and ours/floor) so the machine's noise hits all four alike.

    .venv/bin/python bench/kernels.py [--rounds N]     # needs `make kernel kernel-micro`

Writes bench/results/kernels.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

# Run as a script, bench/ is on sys.path: the boot benchmark's steps are reused as they are.
from boot import app_tarball, boot_floor, boot_ours, build_ours, floor_initrd
from common import daemon, publish

from unik.kernel import Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.providers.qemu import kvm_usable

ROOT = Path(__file__).resolve().parent.parent
FLAVOURS = ("cloud", "micro")


def image_size_mb(base: str, name: str) -> int:
    for image in httpx.get(f"{base}/images", timeout=30).json():
        if image["Name"] == name:
            return int(image["SizeMb"])
    raise RuntimeError(f"image {name} not listed")


def mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()

    kernels: dict[str, Kernel] = {f: load_kernel(default_kernel_root(), f) for f in FLAVOURS}
    accel = "kvm" if kvm_usable()[0] else "tcg"
    tarball = app_tarball()
    ours: dict[str, list[float]] = {f: [] for f in FLAVOURS}
    floor: dict[str, list[float]] = {f: [] for f in FLAVOURS}
    sizes: dict[str, int] = {}
    work = Path(tempfile.mkdtemp(prefix="unik-kbench-", dir="/tmp"))
    try:
        initrd = floor_initrd(work)
        # One daemon per kernel, each with a qemu provider that boots only that kernel.
        configs = {f: yaml.safe_dump({"providers": {"qemu": [{"kernel": f}]}}) for f in FLAVOURS}
        with daemon(work / "cloud", configs["cloud"]) as cloud, daemon(work / "micro", configs["micro"]) as micro:
            bases = {"cloud": cloud, "micro": micro}
            for flavour, base in bases.items():
                build_ours(base, tarball, "bench")
                sizes[flavour] = image_size_mb(base, "bench")
            for n in range(options.rounds):
                # Alternate which kernel goes first, so neither always follows the other.
                for flavour in FLAVOURS if n % 2 == 0 else tuple(reversed(FLAVOURS)):
                    ours[flavour].append(boot_ours(bases[flavour], "bench", f"bench-{n}"))
                    # Each kernel's floor writes its own console files: boot_floor names them by round.
                    floor_dir = work / f"floor-{flavour}"
                    floor_dir.mkdir(exist_ok=True)
                    kernel = kernels[flavour]
                    floor[flavour].append(boot_floor(kernel.vmlinux, initrd, accel, floor_dir, n, kernel.version))
                print(
                    f"round {n + 1}: "
                    + ", ".join(f"{f} {ours[f][-1]:.3f} s (floor {floor[f][-1]:.3f} s)" for f in FLAVOURS),
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"# Guest kernels: cloud vs micro ({options.rounds} interleaved rounds)",
        "",
        f"Host: {platform.node()}, {platform.machine()}, accel {accel}, machine pc, PVH boot of vmlinux.",
        "",
        "| kernel | boot c-hello (median) | floor (median) | c-hello range | vmlinux | bzImage | image SizeMb |",
        "|---|---|---|---|---|---|---|",
    ]
    for flavour in FLAVOURS:
        kernel, mine, base = kernels[flavour], ours[flavour], floor[flavour]
        lines.append(
            f"| {flavour} ({kernel.version}) | {statistics.median(mine):.3f} s | {statistics.median(base):.3f} s "
            f"| {min(mine):.3f}-{max(mine):.3f} s | {mb(kernel.vmlinux)} | {mb(kernel.bzimage)} | {sizes[flavour]} |"
        )
    lines += [
        "",
        "Boot: POST /instances/run → c-hello's first line through the logs API.",
        "Floor: the same qemu/kernel/machine booting a trivial static init directly (no daemon).",
        "vmlinux is the stripped ELF qemu loads; image SizeMb is that kernel plus the initrd.",
    ]
    report = "\n".join(lines)
    publish(report, "kernels.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
