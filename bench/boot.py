"""Boot and build benchmark, each beside its floor, measured in one interleaved run.

Boot:  POST /instances/run → the app's first console line seen through the logs API,
       beside the floor: the instance's own qemu command line (same machine, kernel and
       devices) booting a trivial static init (prints one line) in place of the image,
       started directly, with no daemon in between; and beside the bare machine's floor
       (the same qemu and kernel with no devices).
Build: POST /images/{name}/create of examples/c-hello, beside the compiler alone
       (musl-gcc -static -O2 on the same sources).

Rounds alternate ours/floor so the machine's noise hits both alike; medians and ratios
are printed as Markdown and written to bench/results/boot.md.

    .venv/bin/python bench/boot.py [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import api, daemon, publish, tarball

from unik import guest
from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel
from unik.providers.qemu import boot_argv, kvm_usable
from unik.providers.qemu.config import QemuProviderConfig

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "c-hello"
FIRST_APP_LINE = b"hello from unik"
FLOOR_LINE = b"floor: init running"
DEADLINE = 120.0

FLOOR_INIT = r"""
#include <sys/reboot.h>
#include <unistd.h>
int main(void) {
    static const char line[] = "floor: init running\n";
    write(1, line, sizeof line - 1);
#ifndef STAY_UP
    reboot(RB_POWER_OFF);
#endif
    for (;;) pause();
}
"""


def app_tarball() -> bytes:
    return tarball(APP)


def build_ours(base: str, tarball: bytes, name: str) -> float:
    http = api(base)
    started = time.perf_counter()
    response = http.post(
        f"/images/{name}/create",
        params={"base": "linux", "lang": "c", "provider": "qemu", "force": "true"},
        files={"tarfile": ("app.tar.gz", tarball)},
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def build_floor(work: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["musl-gcc", "-static", "-O2", "-o", str(work / "app"), *map(str, sorted(APP.glob("*.c"))), "-lm"],
        check=True,
    )
    return time.perf_counter() - started


def boot_to_line(base: str, image: str, name: str, marker: bytes, memory_mb: int = 0) -> float:
    """POST /instances/run → `marker` seen through `logs?follow=true`; the instance is deleted after."""
    http = api(base)
    body: dict[str, object] = {"InstanceName": name, "ImageName": image}
    if memory_mb:
        body["MemoryMb"] = memory_mb
    started = time.perf_counter()
    http.post("/instances/run", json=body).raise_for_status()
    seen = b""
    try:
        with http.stream("GET", f"/instances/{name}/logs", params={"follow": "true"}) as stream:
            for chunk in stream.iter_bytes():
                seen += chunk
                if marker in seen:
                    break
        elapsed = time.perf_counter() - started
    finally:
        http.delete(f"/instances/{name}", params={"force": "true"})
    if marker not in seen:
        raise RuntimeError(f"{name} never printed {marker!r}:\n{seen.decode(errors='replace')[-2000:]}")
    return elapsed


def boot_ours(base: str, image: str, name: str) -> float:
    """POST /instances/run → the app's first line read through `logs?follow=true`."""
    return boot_to_line(base, image, name, FIRST_APP_LINE)


def floor_initrd(work: Path, *, stay_up: bool = False) -> Path:
    """The floor's initramfs: the trivial init prints its line, then powers off (or idles)."""
    name = "floor-idle" if stay_up else "floor"
    source = work / "floor.c"
    source.write_text(FLOOR_INIT)
    flags = ["-DSTAY_UP"] if stay_up else []
    subprocess.run(["musl-gcc", "-static", "-Os", *flags, "-o", str(work / f"{name}-init"), str(source)], check=True)
    initrd = work / f"{name}.initrd"
    with open(initrd, "wb") as out:
        cpio = guest.CpioWriter(out)
        cpio.add_dir("/dev")
        cpio.add_char_device("/dev/console", 5, 1)
        cpio.add_file("/init", work / f"{name}-init", 0o755)
        cpio.close()
    return initrd


def boot_floor(kernel: Path, initrd: Path, accel: str, work: Path, round_no: int, kernel_version: str = "") -> float:
    """The same qemu, machine and kernel, a trivial init, started directly: launch → its line.
    `kernel_version` picks the firmware as for an image built with that kernel."""
    console = work / f"floor-{round_no}.log"
    argv = boot_argv(
        QemuProviderConfig(), accel, kernel=kernel, initrd=initrd, memory_mb=128, console=console,
        kernel_version=kernel_version,
    )  # fmt: skip
    return time_to_line(argv, console, FLOOR_LINE, "the floor VM")


def time_to_line(argv: list[str], console: Path, marker: bytes, what: str) -> float:
    """Start qemu in the foreground → `marker` on its console file; killed after."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < DEADLINE:
            exited = proc.poll() is not None  # asked first: a VM may print its line, then stop
            with contextlib.suppress(OSError):
                if marker in console.read_bytes():
                    return time.perf_counter() - started
            if exited:
                break
            time.sleep(0.005)
        raise RuntimeError(f"{what} never printed {marker!r}")
    finally:
        proc.kill()
        proc.wait()


def instance_console(data_dir: Path, instance_id: str) -> Path:
    return data_dir / "instances" / instance_id / "console.log"


def wait_for_console(console: Path, marker: bytes, deadline: float = DEADLINE) -> None:
    """Until `marker` is in the console file (a VM running in the background)."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        with contextlib.suppress(OSError):
            if marker in console.read_bytes():
                return
        time.sleep(0.05)
    raise RuntimeError(f"no {marker!r} on the console within {deadline:.0f} s")


def capture_vm(base: str, data_dir: Path, image: str, marker: bytes, work: Path, memory_mb: int = 0) -> list[str]:
    """The qemu command line the daemon runs for `image` (in `memory_mb`, or its default), with
    its files linked into `work` (a probe instance, deleted after), so the same VM can be
    started directly."""
    name = f"{image}-probe"
    body: dict[str, object] = {"InstanceName": name, "ImageName": image}
    if memory_mb:
        body["MemoryMb"] = memory_mb
    http = api(base)
    instance = http.post("/instances/run", json=body).json()
    folder = data_dir / "instances" / instance["Id"]
    try:
        wait_for_console(instance_console(data_dir, instance["Id"]), marker)
        pid = int((folder / "qemu.pid").read_text())
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
        own = work / f"direct-{image}"
        own.mkdir()
        # The boot initrd, or for a big image its own initrd plus the run archive (fw_cfg).
        for file in ("kernel", "boot.initrd", "image.initrd", "run.cpio"):
            if (folder / file).exists():
                os.link(folder / file, own / file)
    finally:
        http.delete(f"/instances/{name}", params={"force": "true"})
    direct: list[str] = []
    options = iter(argv)
    for arg in options:
        if arg == "-daemonize":
            continue
        if arg in ("-pidfile", "-qmp"):
            next(options)  # the daemon's own handles on the VM, not part of the machine
            continue
        direct.append(arg.replace(str(folder), str(own)))
    return direct


def with_initrd(argv: list[str], initrd: Path) -> list[str]:
    """The same VM booting another initrd: with the floor's, it is the floor on this VM's devices."""
    at = argv.index("-initrd") + 1
    return [*argv[:at], str(initrd), *argv[at + 1 :]]


def with_console(argv: list[str], console: Path) -> list[str]:
    """A captured VM writing its console to `console`, its stale control socket gone."""
    folder = Path(next(a for a in argv if a.endswith("/kernel"))).parent
    (folder / "ctl.sock").unlink(missing_ok=True)
    return [a.replace(str(folder / "console.log"), str(console)) for a in argv]


def boot_direct(argv: list[str], marker: bytes, tag: str, work: Path) -> float:
    """A captured VM started directly (no API, no -daemonize) → `marker` on its console."""
    console = work / f"{tag}.log"
    return time_to_line(with_console(argv, console), console, marker, f"{tag}: the directly started VM")


def row(label: str, ours: list[float], floor: list[float]) -> str:
    mine, base = statistics.median(ours), statistics.median(floor)
    return f"| {label} | {mine:.3f} s | {base:.3f} s | {mine / base:.2f}x | {min(ours):.3f}-{max(ours):.3f} s |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()

    # The floor must boot the kernel the daemon's default provider gives images.
    kernel = load_kernel(default_kernel_root(), QemuProviderConfig().kernel)
    accel = "kvm" if kvm_usable()[0] else "tcg"
    tarball = app_tarball()
    boots_ours: list[float] = []
    boots_floor: list[float] = []
    boots_vm_floor: list[float] = []
    builds_ours: list[float] = []
    builds_floor: list[float] = []
    work = Path(tempfile.mkdtemp(prefix="unik-bench-", dir="/tmp"))
    try:
        initrd = floor_initrd(work)
        with daemon(work / "data") as base:
            build_ours(base, tarball, "bench")  # warm-up: the guest init is compiled once and cached
            vm_floor = with_initrd(capture_vm(base, work / "data", "bench", FIRST_APP_LINE, work), initrd)
            for n in range(options.rounds):
                builds_ours.append(build_ours(base, tarball, "bench"))
                builds_floor.append(build_floor(work))
                boots_ours.append(boot_ours(base, "bench", f"bench-{n}"))
                boots_floor.append(boot_floor(kernel.vmlinux, initrd, accel, work, n, kernel.version))
                boots_vm_floor.append(boot_direct(vm_floor, FLOOR_LINE, f"vm-floor-{n}", work))
                print(
                    f"round {n + 1}: boot {boots_ours[-1]:.3f} s (floor {boots_vm_floor[-1]:.3f} s, "
                    f"bare {boots_floor[-1]:.3f} s), "
                    f"build {builds_ours[-1]:.3f} s (floor {builds_floor[-1]:.3f} s)",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = "\n".join(
        [
            f"# unik boot and build benchmark ({options.rounds} interleaved rounds)",
            "",
            f"Host: {platform.node()}, {platform.machine()}, accel {accel}, kernel {kernel.version}, machine pc.",
            "",
            "| measure | unik (median) | floor (median) | ratio | unik range |",
            "|---|---|---|---|---|",
            row("boot: POST /instances/run → first app line", boots_ours, boots_vm_floor),
            row("boot, beside the bare machine's floor", boots_ours, boots_floor),
            row("build: tar.gz → image (c-hello)", builds_ours, builds_floor),
            "",
            "Boot floor: the instance's own qemu command line (machine, kernel, NIC, control port),",
            "started directly with a trivial static init in place of the image's initrd.",
            "Bare machine's floor: the same qemu, kernel and machine with no devices at all.",
            "Build floor: musl-gcc -static -O2 on the same sources.",
        ]
    )
    publish(report, "boot.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
