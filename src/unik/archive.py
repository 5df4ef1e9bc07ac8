"""Safe unpacking of uploaded tar.gz archives.

Every member is checked before it is written: no absolute paths, no `..`, no link
that points outside the destination, no device files or FIFOs, and a bound on the total
unpacked size and member count (decompression bombs). On any refusal the destination is
left empty for the caller to remove.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from unik.errors import BadRequest, TooLarge

MAX_MEMBERS = 100_000
# Zero blocks that pad a tar after its end marker (tar pads to 10 KiB records; be generous).
TRAILER_SLACK = 1 << 20


def _safe_relpath(name: str) -> str:
    if name.startswith("/") or name.startswith("\\"):
        raise BadRequest(f"archive member {name!r} has an absolute path")
    normalized = posixpath.normpath(name)
    if normalized == ".":
        return normalized
    if normalized == ".." or normalized.startswith("../") or "\x00" in name:
        raise BadRequest(f"archive member {name!r} escapes the destination")
    return normalized


def _check_link(member: tarfile.TarInfo, relpath: str) -> None:
    target = member.linkname
    if member.issym():
        if target.startswith("/"):
            raise BadRequest(f"symlink {member.name!r} points to an absolute path {target!r}")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relpath), target))
    else:
        resolved = posixpath.normpath(target)
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise BadRequest(f"link {member.name!r} points outside the archive ({target!r})")


def safe_extract(archive: Path | io.BufferedIOBase, dest: Path, *, max_bytes: int) -> int:
    """Unpack a tar (optionally gzip/bz2/xz-compressed) into dest; returns the unpacked byte count."""
    dest.mkdir(parents=True, exist_ok=True)
    # Resolved once: every member's landing place is checked against it.
    root = dest.resolve()
    try:
        source = {"name": archive} if isinstance(archive, Path) else {"fileobj": archive}
        tar = tarfile.open(mode="r:*", **source)  # type: ignore[arg-type]  # noqa: SIM115 - closed by `with tar`
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadRequest(f"the upload is not a readable tar.gz archive: {exc}") from exc
    total = 0
    count = 0
    try:
        with tar:
            for member in _iter_members(tar):
                count += 1
                if count > MAX_MEMBERS:
                    raise TooLarge(f"the archive has more than {MAX_MEMBERS} entries")
                relpath = _safe_relpath(member.name)
                if member.isdev() or member.isfifo():
                    raise BadRequest(f"archive member {member.name!r} is a device file or FIFO")
                if member.issym() or member.islnk():
                    _check_link(member, relpath)
                elif not (member.isfile() or member.isdir()):
                    raise BadRequest(f"archive member {member.name!r} has an unsupported type")
                total += max(member.size, 0)
                if total > max_bytes:
                    raise TooLarge(f"the archive unpacks to more than {max_bytes // (1 << 20)} MB")
                _extract_member(tar, member, relpath, dest, root)
            # Reading to the end makes gzip check its CRC and length: a corrupt or truncated
            # upload is refused instead of silently unpacked.
            _drain(tar.fileobj, max_bytes - total + TRAILER_SLACK)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
        raise BadRequest(f"the upload is not a valid tar.gz archive: {exc}") from exc
    return total


def _drain(stream: object, limit: int) -> None:
    read = getattr(stream, "read", None)
    if read is None:
        return
    while block := read(1 << 20):
        limit -= len(block)
        if limit < 0:
            raise TooLarge("the archive has too much data after its end")


def _iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    # Iterating lazily keeps a bomb with millions of headers from being listed in memory first.
    while True:
        member = tar.next()
        if member is None:
            return
        yield member


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, relpath: str, dest: Path, root: Path) -> None:
    """Write one checked member; `root` is dest resolved."""
    if relpath == ".":
        return
    target = dest / relpath
    # A parent that is a symlink (planted by an earlier member) must not redirect writes.
    # (dest itself is `root`: a top-level member, the common case, needs no lookups.)
    parent = target.parent
    if parent != dest and not parent.resolve().is_relative_to(root):
        raise BadRequest(f"archive member {member.name!r} would be written outside the destination")
    # One lstat answers both questions below (is it a link? is anything there?).
    try:
        existing: int | None = os.lstat(target).st_mode
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISLNK(existing):
        # Replace, never follow: a planted link must not redirect a later mkdir or chmod.
        target.unlink()
        existing = None
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o755 | (member.mode & 0o700))
        return
    if parent != dest:
        parent.mkdir(parents=True, exist_ok=True)
    if existing is not None:
        if stat.S_ISDIR(existing):
            shutil.rmtree(target)
        else:
            target.unlink()
    if member.issym():
        # Judge the link by where it lands on disk, through links planted before it.
        landing = os.path.realpath(os.path.join(parent, member.linkname))
        if not Path(landing).is_relative_to(root):
            raise BadRequest(f"symlink {member.name!r} points outside the archive ({member.linkname!r})")
        os.symlink(member.linkname, target)
    elif member.islnk():
        source = dest / posixpath.normpath(member.linkname)
        if not source.resolve().is_relative_to(root) or not source.is_file():
            raise BadRequest(f"hard link {member.name!r} points outside the archive")
        shutil.copyfile(source, target)
        os.chmod(target, source.stat().st_mode & 0o777)
    else:
        extracted = tar.extractfile(member)
        assert extracted is not None
        with extracted, open(target, "wb") as out:
            shutil.copyfileobj(extracted, out, 1 << 20)
            # Keep the executable bits, drop setuid/setgid/sticky (on the open file: no lookup).
            os.fchmod(out.fileno(), (member.mode & 0o777) | 0o600)
