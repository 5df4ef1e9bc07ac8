"""Disks: an image exported as a bootable disk (raw, qcow2, vmdk, vhd, vhdx, vdi) with a run
configuration baked in, made on demand and kept beside the image for the next same export.

A disk boots the disk kernel (the micro kernel plus the EFI stub and the drivers of common
virtual hardware, all built in), or, with ``disk_kernel: cloud``, Debian's cloud kernel with its
modules for that hardware. After the image's initrd comes an archive with today's init (it has
the DHCP client) and the modules to load (none for the disk kernel), then the run configuration
(env, args, network by DHCP). The disks live in the image's own folder
(`<data>/images/<id>/disks/`): deleting or replacing the image deletes them, and `disk_cache_mb`
bounds them all together.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shlex
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from unik import guest
from unik.artifacts import DIGESTS
from unik.artifacts.disk import FORMATS, build_raw_disk, convert_disk, missing_disk_tools
from unik.errors import BadRequest, NotImplementedByProvider
from unik.kernel import BOOT_ARGS, Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.models import KERNEL_INITRD, ExportDiskRequest
from unik.services.checks import check_env
from unik.services.context import Context, ImageRecord

log = logging.getLogger(__name__)

# Drivers for the disks and NICs of common virtual hardware that Debian's cloud kernel has as
# modules: virtio (QEMU/KVM, GCE), PIIX IDE, VMware's vmxnet3 and pvscsi, AWS's ENA (NVMe is
# built in). Hyper-V's need hv_vmbus, which fails to load elsewhere and would say so each boot;
# AHCI and e1000 it does not have at all. The disk kernel builds all of them in.
DISK_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "ata_piix",
    "vmxnet3", "vmw_pvscsi", "ena", "vfat", "nls_cp437", "nls_utf8", "nls_ascii",
)  # fmt: skip
EXTENSIONS = {"raw": "img"}
# The env baked into a disk travels in a URL: this bounds what one request can make the daemon write.
MAX_ENV_BYTES = 16 << 10
# Bumped when what goes on a disk changes, so no disk made by older code is handed out.
DISK_LAYOUT = 2
# A disk younger than this may still be streaming to a client: eviction leaves it alone.
EVICT_AFTER_SECONDS = 60.0


@dataclass(frozen=True)
class ExportedDisk:
    path: Path
    filename: str


class DiskService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._locks: dict[str, asyncio.Lock] = {}

    async def export(self, request: ExportDiskRequest) -> ExportedDisk:
        """The image as a bootable disk in its format, made now or found from an earlier export."""
        ref, fmt, args = request.image, request.format, request.args
        if fmt not in FORMATS:
            raise BadRequest(f"unknown disk format {fmt!r}; one of {', '.join(FORMATS)}")
        env = _parse_env(request.env)
        image = self.ctx.store.images.find(ref)
        if image.meta.artifact.format != KERNEL_INITRD:
            raise NotImplementedByProvider(
                f"image {image.name!r} is a {image.meta.artifact.format} image; disks are made of a kernel+initrd"
            )
        if problem := missing_disk_tools():
            raise NotImplementedByProvider(f"this host cannot make bootable disks: {problem}")
        try:
            default_args = image.meta.args if args is None else shlex.split(args)
        except ValueError as exc:
            raise BadRequest(f"args: {exc}") from exc
        flavour = self.ctx.config.disk_kernel
        try:
            kernel = load_kernel(default_kernel_root(), flavour)
        except FileNotFoundError as exc:
            raise NotImplementedByProvider(f"bootable disks boot the {flavour} kernel: {exc}") from exc
        init_binary = await asyncio.to_thread(guest.ensure_init_binary, self.ctx.cache_dir)
        modules = kernel.module_closure(list(DISK_MODULES)) if flavour == "cloud" else []
        overlay = guest.modules_cpio(modules, init_binary=init_binary) + guest.run_config_cpio(
            env=env, args=default_args, hostname=image.name, net=guest.DHCP
        )
        # Every format is converted from the raw disk of the same run config, kept as well:
        # making it is most of an export, converting it is what qemu-img alone costs.
        raw = self._disk_path(image, "raw", overlay, kernel)
        # One export of a disk at a time: the second waits and finds the first one's disk.
        made = False
        async with self._lock(raw):
            if raw.is_file():
                raw.touch()  # in use: the oldest go first when the cache is full
            else:
                await asyncio.to_thread(self._make_raw, image, overlay, kernel, raw)
                made = True
        target = raw
        if fmt != "raw":
            target = self._disk_path(image, fmt, overlay, kernel)
            async with self._lock(target):
                if not target.is_file():
                    await asyncio.to_thread(convert_disk, raw, fmt, target)
                    log.info("exported image %s as %s (%d MB)", image.name, fmt, target.stat().st_size >> 20)
                    made = True
        if made:  # only a new disk can take the cache over its bound
            await asyncio.to_thread(self._evict, keep={raw, target})
        return ExportedDisk(target, f"{image.name}.{EXTENSIONS.get(fmt, fmt)}")

    def _lock(self, disk: Path) -> asyncio.Lock:
        return self._locks.setdefault(disk.name, asyncio.Lock())

    def _disk_path(self, image: ImageRecord, fmt: str, overlay: bytes, kernel: Kernel) -> Path:
        key = _disk_key(image, fmt, overlay, kernel)
        return self.ctx.artifacts.folder(image.id) / "disks" / f"{key}.{EXTENSIONS.get(fmt, fmt)}"

    def _make_raw(self, image: ImageRecord, overlay: bytes, kernel: Kernel, target: Path) -> None:
        work = self.ctx.tmp_dir / f"disk-{uuid.uuid4().hex}"
        work.mkdir()
        try:
            initrd = work / "initrd"
            with open(initrd, "wb") as out:
                with open(self.ctx.artifacts.path(image.id, image.meta.artifact, "initrd"), "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
                out.write(overlay)
            raw = work / "disk.raw"
            build_raw_disk(kernel.bzimage, initrd, " ".join(BOOT_ARGS), raw)
            target.parent.mkdir(exist_ok=True)
            raw.rename(target)
            log.info("exported image %s as a raw disk (%d MB)", image.name, target.stat().st_size >> 20)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _evict(self, keep: set[Path]) -> None:
        """Oldest disks first until all of them fit in disk_cache_mb."""
        disks = [p for p in self.ctx.artifacts.root.glob("*/disks/*") if p.is_file()]
        total = sum(p.stat().st_size for p in disks)
        bound = self.ctx.config.disk_cache_mb << 20
        now = time.time()
        for disk in sorted(disks, key=lambda p: p.stat().st_mtime):
            if total <= bound:
                break
            if disk in keep or now - disk.stat().st_mtime < EVICT_AFTER_SECONDS:
                continue
            total -= disk.stat().st_size
            disk.unlink(missing_ok=True)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    if sum(len(p) for p in pairs) > MAX_ENV_BYTES:
        raise BadRequest(f"env is larger than {MAX_ENV_BYTES >> 10} KiB")
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadRequest(f"env {pair!r} is not KEY=VALUE")
        env[key] = value
    return check_env(env)


def _disk_key(image: ImageRecord, fmt: str, overlay: bytes, kernel: Kernel) -> str:
    parts = {
        "layout": DISK_LAYOUT,
        "image": image.meta.digest,
        "format": fmt,
        "overlay": hashlib.sha256(overlay).hexdigest(),
        "kernel": kernel.version,
        "bzimage": DIGESTS.sha256(kernel.bzimage),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
