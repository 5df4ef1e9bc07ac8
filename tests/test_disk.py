"""Bootable disk images: the raw GPT disk's layout, the six export formats, and real boots of one
disk under SeaBIOS (legacy BIOS, syslinux) and OVMF (UEFI, the unified kernel image)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import requires_vm, static_init_initrd
from unik.artifacts import disk
from unik.artifacts.disk import FORMATS, DiskToolError, build_raw_disk, convert_disk, missing_disk_tools
from unik.kernel import BOOT_ARGS, Kernel, default_kernel_root, load
from unik.models import DISK_FORMATS

BOOT_LINE = b"disk: init running"
BOOT_DEADLINE = 120.0
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# qemu-img check exists only for formats with metadata to check; raw and vpc have none.
CHECKABLE = {"qcow2", "vmdk", "vhdx", "vdi"}

INIT_SOURCE = r"""
#include <sys/reboot.h>
#include <unistd.h>
int main(void) {
    static const char line[] = "disk: init running\n";
    write(1, line, sizeof line - 1);
    reboot(RB_POWER_OFF);
    for (;;) pause();
}
"""

needs_tools = pytest.mark.skipif(missing_disk_tools() is not None, reason=f"disk tools: {missing_disk_tools()}")


# ---------------------------------------------------------------- no VM


def test_the_tools_are_installed_here() -> None:
    assert missing_disk_tools() is None


def test_unknown_format_raises(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 512)
    with pytest.raises(ValueError, match="unknown disk format 'iso'"):
        convert_disk(raw, "iso", tmp_path / "disk.iso")
    assert list(tmp_path.iterdir()) == [raw]


def test_six_formats_as_images_announce_them() -> None:
    assert tuple(FORMATS) == DISK_FORMATS == ("raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi")
    assert FORMATS["vhd"].driver == "vpc"


def test_a_failing_tool_carries_its_stderr() -> None:
    with pytest.raises(DiskToolError, match=r"exit 3.*boom") as info:
        disk._run(["sh", "-c", "echo boom >&2; exit 3"])
    assert info.value.returncode == 3


def test_partition_fits_both_copies() -> None:
    size = disk._partition_bytes(30 << 20, 5 << 20)
    assert size % disk.MIB == 0 and size >= 2 * (35 << 20)
    assert disk._partition_bytes(1, 1) == disk.MIN_PARTITION_BYTES  # FAT32's floor


# The DOS header's magic and its pointer (at 0x3c) to a PE signature: all has_efi_stub reads.
FAKE_PE = b"MZ" + b"\0" * 0x3A + (0x40).to_bytes(4, "little") + b"PE\0\0"


def test_a_kernel_without_the_efi_stub_is_refused(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"\xff" * 4096)
    initrd.write_bytes(b"i")
    assert not disk.has_efi_stub(kernel)
    with pytest.raises(ValueError, match="no EFI stub"):
        build_raw_disk(kernel, initrd, "quiet", tmp_path / "disk.raw")
    assert not (tmp_path / "disk.raw").exists()


@needs_tools
def test_layout_without_a_vm(tmp_path: Path) -> None:
    """A PE header and filler do as a kernel here: the layout is checked, not booted."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(FAKE_PE + b"k" * 100_000)
    initrd.write_bytes(b"i" * 10_000)
    out = tmp_path / "disk.raw"
    build_raw_disk(kernel, initrd, "console=ttyS0 quiet", out)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw", "initrd", "vmlinuz"]  # no leftovers
    assert out.stat().st_size % disk.MIB == 0
    table = json.loads(subprocess.run(["sfdisk", "--json", out], capture_output=True, check=True).stdout)
    (part,) = table["partitiontable"]["partitions"]
    assert part["start"] == 2048 and part["type"] == disk.ESP_TYPE and "LegacyBIOSBootable" in part["attrs"]
    gptmbr = disk._find(disk.GPTMBR_PATHS)
    assert gptmbr is not None
    head = out.read_bytes()[:512]
    assert head[:440] == gptmbr.read_bytes()[:440] and head[510:] == b"\x55\xaa"
    listing = subprocess.run(
        ["mdir", "-a", "-b", "-/", "-i", f"{out}@@1048576", "::"], capture_output=True, check=True, text=True
    ).stdout
    for name in ("ldlinux.sys", "ldlinux.c32", "syslinux.cfg", "vmlinuz", "initrd.img", "EFI/BOOT/BOOTX64.EFI"):
        assert f"::/{name}" in listing, listing
    cfg = subprocess.run(["mtype", "-i", f"{out}@@1048576", "::/syslinux.cfg"], capture_output=True, check=True)
    assert b"APPEND console=ttyS0 quiet" in cfg.stdout


@needs_tools
def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(FAKE_PE)
    initrd.write_bytes(b"i")
    real_run = disk._run

    def failing_mcopy(argv: list[str | Path], *, stdin: bytes | None = None) -> None:
        if argv[0] == "mcopy":
            raise DiskToolError(["mcopy"], 1, "disk full")
        real_run(argv, stdin=stdin)

    monkeypatch.setattr(disk, "_run", failing_mcopy)
    with pytest.raises(DiskToolError, match="disk full"):
        build_raw_disk(kernel, initrd, "quiet", tmp_path / "disk.raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["initrd", "vmlinuz"]


# ---------------------------------------------------------------- real boots


@pytest.fixture(scope="module")
def raw_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One disk for every VM test: Debian's cloud kernel (it has the EFI stub) and an init that
    prints BOOT_LINE and powers off."""
    if (problem := missing_disk_tools()) is not None:
        pytest.skip(f"cannot build disks: {problem}")
    if shutil.which("musl-gcc") is None:
        pytest.skip("musl-gcc is not installed (apt-get install -y musl-tools)")
    try:
        kernel: Kernel = load(default_kernel_root(), "cloud")
    except FileNotFoundError as exc:
        pytest.skip(f"no cloud kernel: {exc}")
    work = tmp_path_factory.mktemp("disk")
    initrd = static_init_initrd(work, INIT_SOURCE)
    out = work / "disk.raw"
    started = time.perf_counter()
    build_raw_disk(kernel.bzimage, initrd, " ".join(BOOT_ARGS), out)
    print(f"\nraw disk built in {time.perf_counter() - started:.2f} s: {out.stat().st_size} bytes")
    return out


@pytest.fixture(scope="module")
def exported(raw_disk: Path) -> dict[str, Path]:
    paths = {}
    for fmt in FORMATS:
        paths[fmt] = raw_disk.with_name(f"export.{fmt}")
        convert_disk(raw_disk, fmt, paths[fmt])
    return paths


def _qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


@pytest.mark.vm
@requires_vm
def test_every_format_checks_out(raw_disk: Path, exported: dict[str, Path]) -> None:
    raw_size = raw_disk.stat().st_size
    for fmt, path in exported.items():
        driver = FORMATS[fmt].driver
        if fmt in CHECKABLE:
            check = _qemu_img("check", "-f", driver, path)
            assert check.returncode == 0, f"{fmt}: {check.stdout}{check.stderr}"
        # -f always: a fixed VHD (raw data plus a footer) would otherwise be probed as raw.
        info = _qemu_img("info", "-f", driver, "--output=json", path)
        assert info.returncode == 0, f"{fmt}: {info.stderr}"
        facts = json.loads(info.stdout)
        assert facts["format"] == driver
        assert facts["virtual-size"] >= raw_size, f"{fmt}: {facts['virtual-size']} < {raw_size}"
        print(f"{fmt}: {path.stat().st_size} bytes in the file, {facts['actual-size']} on disk")


def _boot(argv: list[str], console: Path, what: str, line: bytes = BOOT_LINE) -> float:
    """Start qemu → `line` on its serial console file, in seconds; qemu is killed after."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while time.perf_counter() - started < BOOT_DEADLINE:
            exited = proc.poll() is not None  # asked first: the VM prints its line, then powers off
            with contextlib.suppress(OSError):
                if line in console.read_bytes():
                    elapsed = time.perf_counter() - started
                    print(f"\n{what}: {line.decode()!r} after {elapsed:.2f} s")
                    return elapsed
            if exited:
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    log = console.read_bytes()[-2000:] if console.exists() else b"(no console output)"
    pytest.fail(f"{what} never printed {line!r}; qemu: {stderr.decode(errors='replace')}; console: {log!r}")


def _qemu(machine: str, console: Path, *drives: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-M", machine, "-accel", "tcg", "-m", "256", "-cpu", "qemu64,+rdrand",
        "-display", "none", "-serial", f"file:{console}", "-no-reboot", "-nodefaults",
        *(arg for drive in drives for arg in ("-drive", drive)),
    ]  # fmt: skip


@pytest.mark.vm
@requires_vm
def test_raw_boots_under_seabios(raw_disk: Path, tmp_path: Path) -> None:
    console = tmp_path / "bios.log"
    _boot(_qemu("pc", console, f"file={raw_disk},format=raw,if=virtio,readonly=on"), console, "SeaBIOS, raw")


@pytest.mark.vm
@requires_vm
def test_qcow2_boots_under_ovmf(exported: dict[str, Path], tmp_path: Path) -> None:
    if not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        pytest.skip("OVMF is not installed (apt-get install -y ovmf)")
    # A fresh variable store per VM: a reused one keeps a stale boot entry and lands in the shell.
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    console = tmp_path / "uefi.log"
    drives = (
        f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        f"if=pflash,format=raw,file={vars_copy}",
        f"file={exported['qcow2']},format=qcow2,if=virtio,readonly=on",
    )
    _boot(_qemu("q35", console, *drives), console, "OVMF, qcow2")
