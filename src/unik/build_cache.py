"""Content-addressed build cache: the same inputs give the same image files, so a rebuild of
unchanged sources reuses them instead of unpacking and compiling again.

The key is a sha256 over everything that goes into an image: the uploaded archive's bytes,
the compiler and the settings it builds with, the default arguments, the mount points, the
kernel (version, vmlinux and modules.dep digests), the guest init binary, the base kernel
modules, the daemon's own code that lays out images (compilers, guest), and the host's
package database (a toolchain upgraded with apt changes the key). Builds allowed on the
network are never cached: what they download may differ from one build to the next.

An entry is a folder `<data>/cache/images/<key>/` holding hard links to a built image's
files (those its Artifact names) plus `meta.json` (the artifact, the image digest, size and
what the record needs that is not in the files). Hard links cost no space while the image exists and keep the
files when it is deleted. An entry is trusted only if its files still hash to the recorded
digest; anything else is dropped and the image rebuilt. The cache keeps the most recently
used entries, bounded by count and bytes.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from unik.artifacts import artifact_digest, hardlink_or_copy
from unik.models import Artifact

log = logging.getLogger(__name__)

# Bumped when the entry layout or the key's ingredients change, so old entries never match.
FORMAT = "unik-build-cache-3"
MAX_ENTRIES = 32
MAX_BYTES = 4 << 30
_PACKAGE_DB = Path("/var/lib/dpkg/status")


class CachedBuild(BaseModel):
    """What a cache entry holds besides the files."""

    artifact: Artifact
    digest: str
    size: int
    memory_mb: int
    min_memory_mb: int = 0
    kernel_version: str


def archive_sha256(upload: BinaryIO) -> str | None:
    """The upload's sha256, read from the start and rewound; None if it cannot be rewound.

    A gzip upload is hashed decompressed: gzip's header carries the time it was packed, so
    the same folder uploaded twice (by the CLI, `tar czf`) differs there and nowhere else."""
    try:
        upload.seek(0)
        magic = upload.read(2)
        upload.seek(0)
    except (OSError, ValueError, AttributeError):
        return None
    sha = hashlib.sha256()
    try:
        if magic == b"\x1f\x8b":
            sha.update(b"gzip\0")
            with gzip.GzipFile(fileobj=upload, mode="rb") as stream:
                while block := stream.read(1 << 20):
                    sha.update(block)
        else:
            sha.update(b"raw\0")
            while block := upload.read(1 << 20):
                sha.update(block)
    except (OSError, EOFError, zlib.error):
        return None  # not a readable archive: the build's own unpacking says why
    finally:
        upload.seek(0)
    return sha.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """The daemon code that decides an image's content; computed once per process."""
    package = Path(__file__).resolve().parent
    sha = hashlib.sha256()
    for path in sorted([*package.glob("compilers/*.py"), *package.glob("guest/*")]):
        if path.is_file():
            sha.update(path.name.encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()


def host_packages() -> str:
    """Changes whenever apt installs or upgrades anything, toolchains included."""
    try:
        stat = _PACKAGE_DB.stat()
    except OSError:
        return "none"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(**parts: Any) -> str:
    """sha256 over the named parts (JSON-serialisable), in a canonical form."""
    canonical = json.dumps({"format": FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class BuildCache:
    def __init__(self, root: Path, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.root = root
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        # Half-written entries of a daemon that died mid-store are never looked up: drop them.
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def restore(self, key: str, staging: Path) -> CachedBuild | None:
        """Hard-link the entry's files into `staging` and return its metadata, or None (a miss).

        An entry whose files no longer hash to the recorded image digest is dropped, so a
        damaged cache costs a rebuild, never a broken image."""
        entry = self.root / key
        try:
            meta = CachedBuild.model_validate_json((entry / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("build cache entry %s is unreadable (%s): dropped", key[:16], exc)
            self._drop(entry)
            return None
        try:
            staging.mkdir(parents=True)
            for name in meta.artifact.names:
                os.link(entry / name, staging / name)
            digest, size = artifact_digest(staging, meta.artifact)
        except OSError as exc:
            # Also an entry evicted by a concurrent build between our read and our links.
            log.warning("build cache entry %s is incomplete (%s): dropped", key[:16], exc)
            shutil.rmtree(staging, ignore_errors=True)
            self._drop(entry)
            return None
        if (digest, size) != (meta.digest, meta.size):
            log.warning("build cache entry %s does not match its digest: dropped", key[:16])
            shutil.rmtree(staging, ignore_errors=True)
            self._drop(entry)
            return None
        # The meta file's mtime is the entry's last use, which eviction goes by.
        with contextlib.suppress(OSError):
            os.utime(entry / "meta.json")
        return meta

    def store(self, key: str, staging: Path, meta: CachedBuild) -> None:
        """Record a finished build (hard links to its files); never fails the build itself."""
        entry = self.root / key
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            for name in meta.artifact.names:
                hardlink_or_copy(staging / name, tmp / name)
            (tmp / "meta.json").write_text(meta.model_dump_json())
            # rename is atomic: a concurrent lookup sees the whole entry or none. If another
            # build stored the same key meanwhile its entry is as good as ours: keep it.
            if entry.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rename(entry)
        except OSError as exc:
            log.warning("could not store build cache entry %s: %s", key[:16], exc)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        self.evict()

    def entries(self) -> list[Path]:
        """Complete entries, least recently used first."""
        found: list[tuple[int, Path]] = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                continue
            try:
                found.append(((entry / "meta.json").stat().st_mtime_ns, entry))
            except OSError:
                found.append((0, entry))
        return [entry for _, entry in sorted(found)]

    def evict(self) -> None:
        entries = self.entries()
        sizes = [_entry_bytes(entry) for entry in entries]
        total = sum(sizes)
        while entries and (len(entries) > self.max_entries or total > self.max_bytes):
            oldest = entries.pop(0)
            total -= sizes.pop(0)
            log.info("build cache: evicted %s", oldest.name[:16])
            self._drop(oldest)

    def _drop(self, entry: Path) -> None:
        # Renamed away first, so a concurrent lookup never sees a half-deleted entry.
        doomed = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            entry.rename(doomed)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)


def _entry_bytes(entry: Path) -> int:
    """Bytes the entry alone keeps on disk: a file still linked from an image costs nothing extra."""
    total = 0
    for path in entry.iterdir():
        if path.name == "meta.json":
            continue
        with contextlib.suppress(OSError):
            stat = path.stat()
            # The kernel is shared by every image and the kernel cache; an initrd whose image
            # was deleted is held only here.
            if stat.st_nlink <= 1:
                total += stat.st_size
    return total

