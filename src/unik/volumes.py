"""Volume disk images, built on the host without loop devices or mounts (no mount rights needed).

ext2/ext4 are filled by `mke2fs -d DIR`, FAT by `mkfs.fat` then `mcopy -s`; a raw upload
is used as it is. Every tool runs as an asyncio subprocess so a big volume never stalls
the daemon. Callers own the paths: on any failure the image file may be half-written and
is theirs to remove.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from unik.archive import safe_extract
from unik.errors import BadRequest, TooLarge, UnikError

FS_TYPES = ("ext2", "ext4", "fat")
DEFAULT_FS_TYPE = "ext2"
MB = 1 << 20

# Fitting a volume to its data (size 0/absent). Every file is counted in whole 4 KiB blocks
# (ext's and FAT's usual allocation unit), every directory and symlink as one block, every
# entry as 256 bytes of inode/directory entry. On top: 20% for the app to write into and
# for allocation the estimate misses, plus 4 MB for superblocks, bitmaps, FAT tables and
# ext4's journal (1 MB on small volumes, ~3% of large ones, inside the 20%).
BLOCK = 4096
ENTRY_OVERHEAD = 256
HEADROOM = 1.2
METADATA_MB = 4
# A sparse file costs the host nothing, and below 8 MB ext4 has no room left once its
# journal and inode tables are in; so no fitted volume is smaller.
MIN_FIT_MB = 8

# Phrases with which mke2fs and mcopy say the filesystem is full: the caller asked for too
# small a size, a 400, not a daemon fault.
_OUT_OF_ROOM = ("could not allocate", "disk full", "no space", "too small", "not enough space")


@dataclass(frozen=True)
class DataUsage:
    """What an unpacked folder needs on a filesystem (see the fitting rule above)."""

    bytes: int
    entries: int

    def fitted_mb(self) -> int:
        return max(MIN_FIT_MB, math.ceil(self.bytes * HEADROOM / MB) + METADATA_MB)


def check_fs_type(fs_type: str | None) -> str:
    if not fs_type:
        return DEFAULT_FS_TYPE
    lowered = fs_type.strip().lower()
    if lowered not in FS_TYPES:
        raise BadRequest(f"volume type {fs_type!r} is not supported: use one of {', '.join(FS_TYPES)}")
    return lowered


def check_size(size_mb: int, max_mb: int) -> None:
    """0 is allowed here: it means "fit the data" where there is data."""
    if size_mb < 0:
        raise BadRequest(f"size must not be negative (got {size_mb})")
    if size_mb > max_mb:
        raise BadRequest(f"size {size_mb} MB is more than the limit of {max_mb} MB (max_volume_mb)")


def measure(folder: Path) -> DataUsage:
    total = 0
    entries = 0
    for root, dirs, files in os.walk(folder):
        entries += len(dirs) + len(files)
        # This directory's own block, and each entry's inode and directory entry.
        total += BLOCK + ENTRY_OVERHEAD * (len(dirs) + len(files))
        for name in files:
            total += math.ceil(os.lstat(os.path.join(root, name)).st_size / BLOCK) * BLOCK
        # os.walk lists a symlinked directory in dirs without descending: it is one link.
        total += BLOCK * sum(os.path.islink(os.path.join(root, name)) for name in dirs)
    return DataUsage(total, entries)


async def create_empty(image: Path, fs_type: str, size_mb: int) -> int:
    """A new, empty filesystem of size_mb; returns the size in MB."""
    if size_mb <= 0:
        raise BadRequest("size (in MB, > 0) is required for a volume created without data")
    await _make_filesystem(image, fs_type, size_mb, None, None)
    return size_mb


async def create_from_tar(
    upload: BinaryIO, work: Path, image: Path, fs_type: str, size_mb: int, *, max_bytes: int, max_mb: int
) -> int:
    """Unpack the tar.gz into work/files, build a filesystem holding them; returns its size in MB.

    size_mb 0 fits the data (DataUsage.fitted_mb); a size too small for the data is a 400.
    """
    files = work / "files"
    await asyncio.to_thread(safe_extract, upload, files, max_bytes=max_bytes)
    usage = await asyncio.to_thread(measure, files)
    if fs_type == "fat":
        await asyncio.to_thread(_check_fat_names, files)
    if size_mb:
        await _make_filesystem(image, fs_type, size_mb, files, usage)
        return size_mb
    fitted = usage.fitted_mb()
    if fitted > max_mb:
        raise TooLarge(f"the data needs a volume of about {fitted} MB, more than the limit of {max_mb} MB")
    try:
        await _make_filesystem(image, fs_type, fitted, files, usage)
    except _OutOfRoom:
        # The estimate is deliberately simple (FAT's clusters grow with the volume, many
        # tiny files cost more than a block): one more try with twice the room.
        fitted = min(max_mb, fitted * 2)
        await _make_filesystem(image, fs_type, fitted, files, usage)
    return fitted


async def create_raw(upload: BinaryIO, image: Path, size_mb: int, *, max_mb: int) -> int:
    """Store the upload as the disk itself; a larger size_mb grows it. Returns the size in MB."""
    written = await asyncio.to_thread(_copy_bounded, upload, image, max_mb * MB)
    if written == 0:
        raise BadRequest("the raw disk image is empty")
    data_mb = math.ceil(written / MB)
    if size_mb and size_mb < data_mb:
        raise BadRequest(f"size {size_mb} MB is smaller than the raw disk image ({data_mb} MB)")
    # A disk is made of 512-byte sectors: qemu would silently drop a partial last one.
    length = size_mb * MB if size_mb else math.ceil(written / 512) * 512
    if length > written:
        await asyncio.to_thread(os.truncate, image, length)
    return size_mb or data_mb


class _OutOfRoom(BadRequest):
    pass


async def _make_filesystem(
    image: Path, fs_type: str, size_mb: int, files: Path | None, usage: DataUsage | None
) -> None:
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb * MB)  # sparse: the host pays only for what is written
    if fs_type == "fat":
        await _run(["mkfs.fat", str(image)], size_mb)
        if files is not None and any(files.iterdir()):
            sources = [str(p) for p in sorted(files.iterdir())]
            # -Q stops at the first failure (a full disk) instead of skipping files.
            await _run(["mcopy", "-i", str(image), "-s", "-m", "-Q", *sources, "::/"], size_mb)
        return
    command = [f"mkfs.{fs_type}", "-q", "-F"]
    if usage is not None:
        needed = usage.entries + 16  # 11 reserved inodes, lost+found, slack
        # mke2fs allots one inode per 4-16 KiB; many tiny files need more than that.
        if needed > size_mb * MB // 16384:
            command += ["-N", str(math.ceil(needed * 1.25))]
    if files is not None:
        command += ["-d", str(files)]
    await _run([*command, str(image)], size_mb)


async def _run(command: Sequence[str], size_mb: int) -> None:
    tool = command[0]
    if shutil.which(tool) is None:
        raise UnikError(f"{tool} is not installed on the daemon's host (Debian: e2fsprogs, dosfstools, mtools)")
    # mtools refuses odd geometries of plain image files unless told not to check.
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,  # mcopy would ask about name clashes on a terminal
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        output, _ = await process.communicate()
    except BaseException:
        # A cancelled request must not leave mkfs writing into a folder about to be removed.
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode == 0:
        return
    text = output.decode(errors="replace").strip()
    if any(phrase in text.lower() for phrase in _OUT_OF_ROOM):
        raise _OutOfRoom(f"a volume of {size_mb} MB is too small for the data ({tool}: {_last_line(text)})")
    raise UnikError(f"{tool} failed (exit {process.returncode}): {text[-2000:]}")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _check_fat_names(folder: Path) -> None:
    """FAT has no symlinks and folds case: refuse what it cannot hold rather than lose files."""
    for root, dirs, files in os.walk(folder):
        seen: dict[str, str] = {}
        for name in dirs + files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if os.path.islink(path):
                raise BadRequest(f"{relative!r} is a symlink, which a FAT volume cannot hold (use ext2 or ext4)")
            clash = seen.setdefault(name.lower(), relative)
            if clash != relative:
                raise BadRequest(f"{clash!r} and {relative!r} are the same name on a FAT volume (case-insensitive)")


def _copy_bounded(upload: BinaryIO, target: Path, limit: int) -> int:
    written = 0
    with open(target, "wb") as out:
        while block := upload.read(MB):
            written += len(block)
            if written > limit:
                raise TooLarge(f"the raw disk image is larger than the limit of {limit // MB} MB")
            out.write(block)
    return written
