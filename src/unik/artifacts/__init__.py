"""Image files on the daemon's disk: each image's folder holds the files its Artifact names.

The digest, the build cache, the hub and the providers all go through the manifest here
rather than assume a kernel and an initrd, so a new format (a bootable disk) is one more
manifest, not an edit in each of them. `archive` packs an image into the one tar the hub
stores and unpacks it again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from unik.models import Artifact

__all__ = ["ArtifactStore", "FileDigests", "artifact_digest", "hardlink_or_copy", "initrd_min_memory_mb"]

# Guest RAM a Linux guest needs beside its initrd before the app runs: the kernel, its
# allocations and the guest init. bench/min_memory.py measured the floors it is fitted to.
KERNEL_BASE_MB = 40
MEMORY_STEP_MB = 16


class FileDigests:
    """sha256 of files, remembered by file identity, not path: every image's kernel is a hard
    link to the same inode, hashed once."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int], str] = {}

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in self._known:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    sha.update(block)
            self._known[key] = sha.hexdigest()
        return self._known[key]


# One per process: the hashes are of immutable files, whoever asks.
DIGESTS = FileDigests()


def artifact_digest(folder: Path, artifact: Artifact) -> tuple[str, int]:
    """(digest, total size) of the artifact's files in `folder`: sha256 over each file's role
    and sha256, in the manifest's order (for kernel+initrd the digest images always had)."""
    lines, size = [], 0
    for file in artifact.files:
        path = folder / file.name
        lines.append(f"{file.role} {DIGESTS.sha256(path)}\n")
        size += path.stat().st_size
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest(), size


def initrd_min_memory_mb(initrd_bytes: int, runtime_mb: int) -> int:
    """The least guest memory a kernel+initrd image boots in: while the kernel unpacks the
    initrd, the archive and its unpacked copy are both in RAM; then the runtime needs its own.
    Rounded up to 16 MB, one step above the floors measured."""
    need = 2 * initrd_bytes / (1 << 20) + KERNEL_BASE_MB + runtime_mb
    return int(-(-need // MEMORY_STEP_MB) * MEMORY_STEP_MB)


def hardlink_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class ArtifactStore:
    """`<data>/images/<image id>/`: one folder per image, written once, removed with the image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, image_id: str) -> Path:
        return self.root / image_id

    def path(self, image_id: str, artifact: Artifact, role: str) -> Path:
        return self.folder(image_id) / artifact.name_of(role)

    def files(self, image_id: str, artifact: Artifact) -> dict[str, Path]:
        """Each file's name in the artifact -> its path on disk."""
        return {name: self.folder(image_id) / name for name in artifact.names}

    def digest(self, image_id: str, artifact: Artifact) -> tuple[str, int]:
        return artifact_digest(self.folder(image_id), artifact)

    def adopt(self, image_id: str, staging: Path) -> None:
        """A finished image's files, complete in `staging` (same filesystem), become the image's."""
        staging.rename(self.folder(image_id))

    def remove(self, image_id: str) -> None:
        shutil.rmtree(self.folder(image_id), ignore_errors=True)

    def image_ids(self) -> set[str]:
        return {entry.name for entry in self.root.iterdir()}

    def share_file(self, staged: Path, own: Path) -> None:
        """A pulled file byte-identical to one of the host's own (the provider's kernel) becomes
        a link to it, as a built image's is: no second copy on disk, nor in the page cache."""
        try:
            if own.stat().st_size != staged.stat().st_size or DIGESTS.sha256(own) != DIGESTS.sha256(staged):
                return
            link = staged.with_name(f".{staged.name}-link")
            os.link(own, link)
        except OSError:
            return  # another file, or another file system: the pulled copy stays
        os.replace(link, staged)
