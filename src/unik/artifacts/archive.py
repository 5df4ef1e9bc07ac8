"""An image as one archive, what the hub stores: an uncompressed tar (PAX) of regular files,
manifest.json first,
    manifest.json   {"format": 1, "image": <Image JSON>, "digest": "sha256:...", "provider": ...,
                     "compiler": ..., "kernel_version": ..., "args": [...], "artifact": {...}}
then each file the image's Artifact names (for kernel+initrd: `kernel`, the uncompressed
vmlinux the image boots, and `initrd`, its initramfs; an archive made before the manifest
named its files is kernel+initrd). Uncompressed because kernel and initramfs are read and
written as they are: packing and unpacking run at disk speed and stay out of the CPU's way.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

from pydantic import BaseModel, ValidationError

from unik.errors import BadGateway
from unik.models import Artifact, Image

ARTIFACT_FORMAT = 1
MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 1 << 20


class Manifest(BaseModel):
    """manifest.json inside the artifact: what a pull needs to record the image."""

    format: int = ARTIFACT_FORMAT
    image: Image
    digest: str
    provider: str
    compiler: str = ""
    kernel_version: str = ""
    args: list[str] = []
    artifact: Artifact = Artifact()


def pack_artifact(manifest: Manifest, folder: Path, dest: Path) -> str:
    """Write the artifact tar of the image files in `folder` to `dest`, streamed from disk;
    returns its sha256 (hex)."""
    body = manifest.model_dump_json().encode()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(MANIFEST, len(body)), io.BytesIO(body))
        for name in manifest.artifact.names:
            path = folder / name
            with open(path, "rb") as source:
                tar.addfile(_member(name, path.stat().st_size), source)
    with open(dest, "rb") as artifact:
        return hashlib.file_digest(artifact, "sha256").hexdigest()


def _member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the same image always packs to the same bytes.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info


def unpack_artifact(artifact: Path, expected_sha256: str, staging: Path) -> Manifest:
    """Check the artifact's sha256, then extract the manifest's files into `staging`.

    The manifest first, then only the names it lists, only regular files, each once: a damaged
    or hostile artifact can place nothing anywhere else. Raises BadGateway on any damage.
    """
    with open(artifact, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected_sha256:
        raise BadGateway(f"the downloaded image is corrupt: sha256 {actual} does not match the hub's {expected_sha256}")
    staging.mkdir(parents=True)
    seen: set[str] = set()
    manifest: Manifest | None = None
    try:
        with tarfile.open(artifact, "r:") as tar:
            for member in tar:
                expected = {MANIFEST} if manifest is None else set(manifest.artifact.names)
                if member.name not in expected or member.name in seen or not member.isreg():
                    raise BadGateway(f"the downloaded image has an unexpected member {member.name!r}")
                seen.add(member.name)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has data
                if member.name == MANIFEST:
                    if member.size > _MAX_MANIFEST_BYTES:
                        raise BadGateway("the downloaded image's manifest is implausibly large")
                    manifest = Manifest.model_validate_json(source.read())
                else:
                    with open(staging / member.name, "wb") as target:
                        shutil.copyfileobj(source, target, 1 << 20)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadGateway(f"the downloaded image is damaged: {exc}") from exc
    except ValidationError as exc:
        raise BadGateway(f"the downloaded image's manifest is invalid: {exc}") from exc
    missing = {MANIFEST, *(manifest.artifact.names if manifest else [])} - seen
    if missing or manifest is None:
        raise BadGateway(f"the downloaded image lacks {', '.join(sorted(missing))}")
    if manifest.format != ARTIFACT_FORMAT:
        raise BadGateway(f"the image on the hub has format {manifest.format}; this daemon reads {ARTIFACT_FORMAT}")
    return manifest
