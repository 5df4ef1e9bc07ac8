"""What qemu boots: the guest kernel command line and the uncompressed vmlinux taken out of a bzImage."""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

# Kernel command line for a unik guest on -M pc under TCG; what each saves is in bench/REPORT.md.
BOOT_ARGS: tuple[str, ...] = (
    "console=ttyS0",
    # Only errors reach the console: the app's output stays clean.
    "quiet",
    "loglevel=3",
    # A panic ends the VM at once (qemu runs with -no-reboot) instead of hanging on a deadline.
    "panic=-1",
    # One app is the only tenant of the guest kernel; the host is protected by the hypervisor,
    # and the mitigations' boot-time patching is slow under TCG.
    "mitigations=off",
    # AppArmor, Yama, landlock, ... have no policy to enforce here.
    "lsm=capability",
    "cryptomgr.notests",
    # ttyS0 is the console, ttyS1 the control channel to the guest init.
    "8250.nr_uarts=2",
    # Legacy PCI interrupt routing through ACPI interprets AML for each interrupt link, slow
    # under TCG. The devices use MSI-X, and the PIR table covers the rest.
    "acpi=noirq",
    # No PS/2 mouse probe; the keyboard port stays, it carries ctrl-alt-del (graceful stop).
    "i8042.noaux",
    # The boot-time check that the timer interrupt arrives through the IO-APIC within a busy
    # wait: a vCPU starved by a loaded host fails it and panics ("IO-APIC + timer doesn't
    # work!", seen with 40 VMs booting on 2 cores); KVM guests skip it the same way.
    "no_timer_check",
    # The CRNG is seeded from RDRAND (the VM's CPU has it, see providers/qemu/boot.py) at
    # boot. Without it the first getrandom() waits on the kernel's jitter entropy collection,
    # slow under TCG: CPython's hash seed and Node.js's start-up both wait on it. Debian's
    # kernel trusts the CPU by default; the micro kernel (tinyconfig) does not.
    "random.trust_cpu=on",
)

_ELF_MAGIC = b"\x7fELF"


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the uncompressed ELF kernel embedded in a bzImage to ``out`` (atomically)."""
    data = bzimage.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise ValueError(f"{bzimage} is not a bzImage (no HdrS setup header)")
    setup_sects = data[0x1F1] or 4  # 0 means 4, for ancient boot protocol compatibility
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = pm_start + payload_offset
    payload = data[start : start + payload_length]
    if len(payload) != payload_length:
        raise ValueError(f"{bzimage}: payload runs past the end of the file")

    elf = _decompress(payload)
    if not elf.startswith(_ELF_MAGIC):
        raise ValueError(f"{bzimage}: decompressed payload is not an ELF file")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)


def _decompress(payload: bytes) -> bytes:
    # The kernel build appends the uncompressed size (4 bytes, little endian) after the stream
    # (size_append in scripts/Makefile.lib); the stdlib decompressors stop at the stream's end,
    # the command-line tools would choke on it, so it is cut off for them.
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return _tool(["zstd", "-d", "-c", "-q"], payload[:-4])
    if payload.startswith(b"\x02\x21\x4c\x18"):
        return _tool(["lz4", "-d", "-c", "-q"], payload[:-4])
    raise ValueError(f"unknown kernel compression (magic {payload[:6].hex()})")


def _tool(cmd: list[str], payload: bytes) -> bytes:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"the kernel is compressed with {cmd[0]}; install the {cmd[0]} tool")
    proc = subprocess.run(cmd, input=payload, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
