"""Bootable disk images of a kernel + initrd: build_raw_disk, the export FORMATS and convert_disk.

One raw GPT disk boots under both legacy BIOS (SeaBIOS, ``-M pc``) and UEFI (OVMF, ``-M q35``),
and is written as a plain file: no loop device, nothing mounted, no root needed. Layout::

    sector 0          protective MBR whose 440-byte boot code is syslinux's gptmbr.bin
    sectors 1-33      primary GPT
    1 MiB ...         the only partition: an EFI System Partition (FAT32) with the GPT
                      attribute LegacyBIOSBootable, which gptmbr.bin looks for
        ldlinux.sys, ldlinux.c32    syslinux, its boot sector in the partition's first sector
        syslinux.cfg                LINUX /vmlinuz, INITRD /initrd.img, APPEND <cmdline>
        vmlinuz, initrd.img         what syslinux loads under BIOS
        EFI/BOOT/BOOTX64.EFI        a unified kernel image (systemd-boot's stub + os-release,
                                    cmdline, kernel and initrd as PE sections), the removable-
                                    media path UEFI firmware boots with no boot entry at all
    last 1 MiB        the backup GPT (33 sectors) and alignment

The kernel must be a bzImage with the EFI stub (the disk kernel and Debian's cloud kernel have
one; the micro kernel does not) and is stored twice, as is the initrd: once per firmware.
``convert_disk`` turns the raw disk into the formats clouds and desktop hypervisors import
(FORMATS, the wire's DISK_FORMATS), with ``qemu-img convert``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FORMATS",
    "DiskFormat",
    "DiskToolError",
    "build_raw_disk",
    "convert_disk",
    "has_efi_stub",
    "missing_disk_tools",
]

MIB = 1 << 20
SECTOR = 512
# The partition starts at 1 MiB (sector 2048), the alignment every partitioning tool uses.
PARTITION_OFFSET = MIB
# The GPT type GUID of an EFI System Partition.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# FAT32 needs 65525 clusters; mformat's smallest cluster (one sector) makes that ~33 MiB.
MIN_PARTITION_BYTES = 36 * MIB
# Room beside the files: FAT tables, syslinux (~130 KiB), the stub (~70 KiB), directories.
SLACK_BYTES = 4 * MIB

# Where distributions put the files: Debian/Ubuntu first, then Fedora and Arch.
GPTMBR_PATHS = (
    Path("/usr/lib/syslinux/mbr/gptmbr.bin"),
    Path("/usr/share/syslinux/gptmbr.bin"),
    Path("/usr/lib/syslinux/bios/gptmbr.bin"),
)
EFI_STUB_PATHS = (
    Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
    Path("/lib/systemd/boot/efi/linuxx64.efi.stub"),
)

# The UKI's sections at fixed addresses past the stub's own (which end below 0x20000), as
# systemd's documented objcopy recipe places them; ukify does not exist in Debian 12.
OSREL_VMA = 0x20000
CMDLINE_VMA = 0x30000
LINUX_VMA = 0x2000000
INITRD_VMA = 0x3000000
_VMA_ALIGN = 0x1000000


class DiskToolError(RuntimeError):
    """An external tool failed while a disk image was built or converted; carries its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{Path(argv[0]).name} failed (exit {returncode}): {stderr.strip() or '(no output)'}")


@dataclass(frozen=True)
class DiskFormat:
    """How qemu-img writes one export format: its driver (``-O``) and creation options (``-o``)."""

    driver: str
    options: tuple[str, ...] = ()


FORMATS: dict[str, DiskFormat] = {
    "raw": DiskFormat("raw"),
    "qcow2": DiskFormat("qcow2"),
    # streamOptimized (compressed, sequential) is what VMware OVAs carry and what AWS
    # ImportImage and VirtualBox import best; it is for import, not for running in place.
    "vmdk": DiskFormat("vmdk", ("subformat=streamOptimized",)),
    # Fixed: Azure, the one cloud taking VHD, accepts only fixed VHDs of a whole number of MiB.
    # force_size keeps the raw size (MiB-rounded) instead of rounding to a CHS geometry.
    # A fixed VHD is raw data plus a footer, so `qemu-img info` needs `-f vpc` to name it.
    "vhd": DiskFormat("vpc", ("subformat=fixed", "force_size=on")),
    "vhdx": DiskFormat("vhdx"),
    "vdi": DiskFormat("vdi"),
}


def _find(paths: Sequence[Path]) -> Path | None:
    return next((path for path in paths if path.is_file()), None)


def _syslinux() -> str | None:
    """The mtools installer: Debian ships it as `syslinux` (`syslinux-mtools` on some others)."""
    return shutil.which("syslinux") or shutil.which("syslinux-mtools")


def missing_disk_tools() -> str | None:
    """None when every tool and file build_raw_disk needs is present, else what to install."""
    checks: list[tuple[object, str]] = [
        (shutil.which("sfdisk"), "fdisk (sfdisk)"),
        (all(map(shutil.which, ("mformat", "mmd", "mcopy"))), "mtools (mformat, mmd, mcopy)"),
        (_syslinux(), "syslinux (the mtools installer)"),
        (shutil.which("objcopy"), "binutils (objcopy)"),
        (_find(EFI_STUB_PATHS), "systemd-boot-efi (linuxx64.efi.stub)"),
        (_find(GPTMBR_PATHS), "syslinux-common (gptmbr.bin)"),
    ]
    missing = [package for found, package in checks if not found]
    return f"install {', '.join(missing)}" if missing else None


def _run(argv: Sequence[str | Path], *, stdin: bytes | None = None) -> None:
    cmd = [str(arg) for arg in argv]
    # mtools refuses an image whose size is not a whole number of its guessed tracks.
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env)
    except FileNotFoundError as exc:
        raise DiskToolError(cmd, 127, f"{cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        raise DiskToolError(cmd, proc.returncode, proc.stderr.decode(errors="replace"))


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _partition_bytes(kernel_bytes: int, initrd_bytes: int) -> int:
    """The ESP holds the kernel and initrd twice: loose for syslinux, inside the UKI for UEFI."""
    need = 2 * (kernel_bytes + initrd_bytes) + SLACK_BYTES
    return _round_up(max(need, MIN_PARTITION_BYTES), MIB)


def _uki(stub: Path, kernel: Path, initrd: Path, cmdline: str, work: Path) -> Path:
    """A unified kernel image: the stub boots the .linux section with .initrd and .cmdline."""
    osrel = work / "os-release"
    osrel.write_text('NAME="unik"\nID=unik\n')
    cmdline_file = work / "cmdline"
    cmdline_file.write_text(cmdline)
    # A kernel above 16 MiB would run into the initrd at its usual address: move it up.
    initrd_vma = max(INITRD_VMA, _round_up(LINUX_VMA + kernel.stat().st_size, _VMA_ALIGN))
    uki = work / "BOOTX64.EFI"
    sections = [(".osrel", osrel, OSREL_VMA), (".cmdline", cmdline_file, CMDLINE_VMA),
                (".linux", kernel, LINUX_VMA), (".initrd", initrd, initrd_vma)]  # fmt: skip
    argv: list[str | Path] = ["objcopy"]
    for name, path, vma in sections:
        argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={vma:#x}"]
    _run([*argv, stub, uki])
    return uki


def has_efi_stub(bzimage: Path) -> bool:
    """Whether a bzImage is also a PE executable, which UEFI firmware and the UKI stub can start."""
    with open(bzimage, "rb") as f:
        head = f.read(4096)
    if head[:2] != b"MZ" or len(head) < 0x40:
        return False
    pe = int.from_bytes(head[0x3C:0x40], "little")
    return head[pe : pe + 4] == b"PE\0\0"


def _syslinux_cfg(cmdline: str, work: Path) -> Path:
    cfg = work / "syslinux.cfg"
    # PROMPT 0 with TIMEOUT 0: boot the default at once, no menu wait.
    lines = ["DEFAULT linux", "PROMPT 0", "TIMEOUT 0", "LABEL linux", "  LINUX /vmlinuz", "  INITRD /initrd.img"]
    cfg.write_text("\n".join([*lines, f"  APPEND {cmdline}", ""]))
    return cfg


def build_raw_disk(kernel_bzimage: Path, initrd: Path, cmdline: str, out: Path) -> None:
    """Write a raw GPT disk to ``out`` that boots ``kernel_bzimage`` with ``initrd`` and
    ``cmdline`` under legacy BIOS (syslinux) and UEFI (a unified kernel image). ``out`` appears
    complete or not at all. Raises ValueError for a kernel without the EFI stub, DiskToolError
    when a tool fails (with its stderr), and RuntimeError when a tool or file is missing."""
    if problem := missing_disk_tools():
        raise RuntimeError(f"cannot build a bootable disk: {problem}")
    if "\n" in cmdline:
        raise ValueError("the kernel command line must be one line")
    if not has_efi_stub(kernel_bzimage):
        # The UKI would be written and then fail under UEFI only: refuse before anything.
        raise ValueError(f"{kernel_bzimage} has no EFI stub (CONFIG_EFI_STUB): it cannot boot under UEFI")
    stub, gptmbr, syslinux = _find(EFI_STUB_PATHS), _find(GPTMBR_PATHS), _syslinux()
    assert stub is not None and gptmbr is not None and syslinux is not None  # missing_disk_tools said so

    partition = _partition_bytes(kernel_bzimage.stat().st_size, initrd.stat().st_size)
    # 1 MiB before the partition (MBR, primary GPT), 1 MiB after it (backup GPT, alignment).
    disk_bytes = PARTITION_OFFSET + partition + MIB
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    image = f"{tmp}@@{PARTITION_OFFSET}"
    try:
        with tempfile.TemporaryDirectory(prefix=".disk-", dir=out.parent) as work_dir:
            work = Path(work_dir)
            with open(tmp, "wb") as f:
                f.truncate(disk_bytes)
            table = (
                "label: gpt\n"
                f"start={PARTITION_OFFSET // SECTOR}, size={partition // SECTOR}, type={ESP_TYPE}, "
                'name="ESP", attrs="LegacyBIOSBootable"\n'
            )
            _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", tmp], stdin=table.encode())
            # -T: the partition's size, else mtools would take the rest of the file, backup GPT included.
            _run(["mformat", "-i", image, "-F", "-T", str(partition // SECTOR), "-v", "UNIK", "::"])
            _run([syslinux, "--install", "--offset", str(PARTITION_OFFSET), tmp])
            uki = _uki(stub, kernel_bzimage, initrd, cmdline, work)
            _run(["mmd", "-i", image, "::/EFI", "::/EFI/BOOT"])
            _run(["mcopy", "-i", image, uki, "::/EFI/BOOT/BOOTX64.EFI"])
            _run(["mcopy", "-i", image, kernel_bzimage, "::/vmlinuz"])
            _run(["mcopy", "-i", image, initrd, "::/initrd.img"])
            _run(["mcopy", "-i", image, _syslinux_cfg(cmdline, work), "::/syslinux.cfg"])
            # Boot code only: bytes 440 on (disk signature, partition table) are sfdisk's.
            _run(["dd", f"if={gptmbr}", f"of={tmp}", "bs=440", "count=1", "conv=notrunc", "status=none"])
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def convert_disk(raw: Path, fmt: str, out: Path) -> None:
    """Write the raw disk ``raw`` to ``out`` in export format ``fmt`` (a key of FORMATS), atomically."""
    try:
        target = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown disk format {fmt!r} (known: {', '.join(FORMATS)})") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    options = ["-o", ",".join(target.options)] if target.options else []
    try:
        _run(["qemu-img", "convert", "-f", "raw", "-O", target.driver, *options, raw, tmp])
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
