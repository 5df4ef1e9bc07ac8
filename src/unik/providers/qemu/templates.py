"""VM templates for warm starts: a ready instance's RAM and device state, cloned in a fraction of a boot.

A warm run whose key has no template boots cold with its RAM in a shared file of its own
(`<instance>/ram`). Once its app is ready, `capture` snapshots it: qemu migrates only the
device state (the `x-ignore-shared` capability skips shared RAM) to `state`, the VM stays
paused meanwhile, its RAM file is copied (sparse) to `ram`, and the VM goes on. A clone maps
that `ram` privately (copy-on-write: clones share every page they do not write) and restores
`state` with `-incoming`. Layout under `<data>/templates/`::

    KEY/ram             the guest's RAM when it was ready
    KEY/state           qemu's device state (a migration stream)
    KEY/meta.json       what the key was made of, the qemu/kernel fingerprint, the image id
    .tmp-KEY-*/         a capture in progress (removed at the provider's start)

KEY hashes the image, Env, args, memory, kernel and the fingerprint of qemu and the provider
config, so a template of another qemu, kernel or machine is never found; `clean` deletes
those at start. Templates are bounded in number and bytes (the least recently used go).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from unik.models import LaunchSpec

log = logging.getLogger(__name__)

# Bumped when what a template holds changes, so none made by older code is restored.
TEMPLATE_LAYOUT = 1
META = "meta.json"


@dataclass(frozen=True)
class Template:
    key: str
    folder: Path

    @property
    def ram(self) -> Path:
        return self.folder / "ram"

    @property
    def state(self) -> Path:
        return self.folder / "state"


def template_key(spec: LaunchSpec, fingerprint: str) -> str:
    """What a clone must share with its template; hostname, ports and address are its own."""
    parts = {
        "layout": TEMPLATE_LAYOUT,
        "image": spec.image_id,
        "artifact": spec.artifact.model_dump(mode="json"),
        "kernel": spec.kernel_version,
        "memory_mb": spec.memory_mb,
        "env": spec.env,
        "args": spec.args,
        "fingerprint": fingerprint,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def qemu_fingerprint(qemu_binary: str, provider_config: str) -> str:
    """qemu's identity (its resolved path, size and mtime: an upgrade changes them) and the
    provider config (the machine a template was made on)."""
    path = shutil.which(qemu_binary) or qemu_binary
    try:
        real = Path(path).resolve()
        stat = real.stat()
        identity = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        identity = path
    return hashlib.sha256(f"{identity}\n{provider_config}".encode()).hexdigest()[:16]


class TemplateStore:
    def __init__(self, root: Path, *, max_count: int, max_mb: int) -> None:
        self.root = root
        self.max_count = max_count
        self.max_bytes = max_mb << 20
        root.mkdir(parents=True, exist_ok=True)

    def find(self, key: str) -> Template | None:
        template = Template(key, self.root / key)
        meta = template.folder / META
        if not (meta.is_file() and template.ram.is_file() and template.state.is_file()):
            return None
        with contextlib.suppress(OSError):
            meta.touch()  # in use: the least recently used go first
        return template

    def work_dir(self, key: str) -> Path:
        work = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        return work

    def publish(self, work: Path, key: str, *, image_id: str, fingerprint: str) -> Template:
        """Make the capture in `work` the template of `key` (atomically), then keep the bounds."""
        (work / META).write_text(
            json.dumps({"key": key, "image_id": image_id, "fingerprint": fingerprint, "created": time.time()})
        )
        target = self.root / key
        shutil.rmtree(target, ignore_errors=True)
        os.rename(work, target)
        self.evict(keep=key)
        return Template(key, target)

    def remove_image(self, image_id: str) -> None:
        for key, meta in self._templates():
            if meta.get("image_id") == image_id:
                shutil.rmtree(self.root / key, ignore_errors=True)

    def clean(self, fingerprint: str) -> None:
        """At start: captures cut short, and templates of another qemu or provider config."""
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for key, meta in self._templates():
            if meta.get("fingerprint") != fingerprint:
                log.info("removing VM template %s: made by another qemu or provider config", key)
                shutil.rmtree(self.root / key, ignore_errors=True)

    def evict(self, keep: str = "") -> None:
        entries = []
        for key, _ in self._templates():
            folder = self.root / key
            try:
                used = (folder / META).stat().st_mtime
                size = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
            except OSError:
                continue
            entries.append((used, key, size))
        entries.sort()
        count, total = len(entries), sum(size for _, _, size in entries)
        for _, key, size in entries:
            if count <= self.max_count and total <= self.max_bytes:
                break
            if key == keep:
                continue
            log.info("evicting VM template %s (%d MB)", key, size >> 20)
            shutil.rmtree(self.root / key, ignore_errors=True)
            count, total = count - 1, total - size

    def _templates(self) -> list[tuple[str, dict[str, object]]]:
        found = []
        for folder in self.root.iterdir():
            if folder.name.startswith("."):
                continue
            try:
                found.append((folder.name, json.loads((folder / META).read_text())))
            except (OSError, ValueError):
                shutil.rmtree(folder, ignore_errors=True)  # not a complete template
        return found


def copy_sparse(source: Path, target: Path) -> None:
    """The guest's RAM file is mostly holes (pages it never touched): they stay holes."""
    subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True, capture_output=True)
