"""Volumes: create a disk (empty, from a tar.gz, or raw), delete it, attach and detach it."""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid

from unik import volumes
from unik.errors import BadRequest, Conflict
from unik.models import AttachVolumeRequest, CreateVolumeRequest, Volume, VolumeMeta, now_rfc3339
from unik.providers.base import Capability
from unik.services.checks import mount_points, raise_if_disk_full, require_name
from unik.services.context import Context
from unik.store import Record

log = logging.getLogger(__name__)


class VolumeService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._creating: set[str] = set()

    def list(self) -> list[Volume]:
        return [r.obj for r in self.ctx.store.volumes.all()]

    def get(self, ref: str) -> Volume:
        return self.ctx.store.volumes.find(ref).obj

    async def create(self, request: CreateVolumeRequest) -> Volume:
        """A new volume: empty (size_mb required), filled from a tar.gz, or a raw disk image.

        size_mb 0 with data fits the data (unik.volumes.DataUsage.fitted_mb)."""
        ctx, name, config = self.ctx, request.name, self.ctx.config
        require_name(name, "volume")
        provider = ctx.provider(request.provider or ctx.only_provider())
        kind = volumes.check_fs_type(request.fs_type)
        if request.raw:
            if request.data is None:
                raise BadRequest("raw=true needs the disk image as the multipart file `tarfile`")
            kind = "raw"
        volumes.check_size(request.size_mb, config.max_volume_mb)
        if name in self._creating or ctx.store.volumes.has_name(name):
            raise Conflict(f"volume {name!r} already exists")
        self._creating.add(name)
        volume_id = uuid.uuid4().hex
        work = ctx.tmp_dir / f"volume-{volume_id}"
        final = ctx.volume_disk(volume_id).parent
        try:
            work.mkdir(parents=True)
            disk = work / "disk.img"
            if request.data is None:
                size = await volumes.create_empty(disk, kind, request.size_mb)
            elif request.raw:
                size = await volumes.create_raw(request.data, disk, request.size_mb, max_mb=config.max_volume_mb)
            else:
                size = await volumes.create_from_tar(
                    request.data, work, disk, kind, request.size_mb,
                    max_bytes=min(config.max_unpacked_mb, config.max_volume_mb) << 20, max_mb=config.max_volume_mb,
                )  # fmt: skip
            final.mkdir()
            # Same filesystem as tmp: the disk appears complete or not at all.
            disk.rename(ctx.volume_disk(volume_id))
            volume = Volume(Id=volume_id, Name=name, SizeMb=size, Attachment="",
                            Infrastructure=provider.infrastructure, Created=now_rfc3339())  # fmt: skip
            meta = VolumeMeta(provider=provider.name, fs_type=kind)
            meta.provider_data = await provider.publish_volume(volume_id, ctx.volume_disk(volume_id))
            try:
                ctx.store.volumes.insert(Record(volume, meta))
            except BaseException:
                await asyncio.to_thread(provider.forget_volume, volume_id, meta)
                raise
            log.info("created %s volume %s (%s, %d MB) in %s", kind, name, volume_id, size, final)
            return volume
        except BaseException as exc:
            shutil.rmtree(final, ignore_errors=True)
            raise_if_disk_full(exc, ctx.data_dir)
            raise
        finally:
            self._creating.discard(name)
            if request.no_cleanup:
                log.warning("no_cleanup: work files of volume %s kept in %s", name, work)
            else:
                await asyncio.to_thread(shutil.rmtree, work, True)

    async def delete(self, ref: str, *, force: bool = False) -> None:
        record = self.ctx.store.volumes.find(ref)
        if record.obj.Attachment:
            if not force:
                raise Conflict(
                    f"volume {record.name!r} is attached to instance {record.obj.Attachment} "
                    "(detach it first, or use force)"
                )
            await self.detach(record.id)
            record = self.ctx.reload_volume(record)
            if record.obj.Attachment:
                raise Conflict(f"volume {record.name!r} was attached again meanwhile")
        self.ctx.store.volumes.delete(record.id)
        provider = self.ctx.providers.get(record.meta.provider)
        if provider is not None:
            await asyncio.to_thread(provider.forget_volume, record.id, record.meta)
        await asyncio.to_thread(shutil.rmtree, self.ctx.volume_disk(record.id).parent, True)
        log.info("deleted volume %s (%s)", record.name, record.id)

    async def attach(self, request: AttachVolumeRequest) -> str:
        """Attach a volume at `mount`: hot-plugged and mounted now if the instance runs,
        otherwise mounted at its next start."""
        ctx = self.ctx
        point = mount_points([request.mount])[0] if request.mount.strip() else ""
        if not point:
            raise BadRequest("mount: an absolute mount point is required")
        volume = ctx.store.volumes.find(request.volume)
        instance = ctx.store.instances.find(request.instance)
        provider = ctx.provider(instance.meta.provider)
        async with ctx.lock(instance.id):
            if volume.obj.Attachment:
                raise Conflict(f"volume {volume.name!r} is already attached to instance {volume.obj.Attachment}")
            if point in [v.mount for v in ctx.attachments(instance.id)]:
                raise Conflict(f"instance {instance.name!r} already has a volume at {point}")
            running = provider.alive(instance.id)
            if running:
                provider.require(Capability.HOT_PLUG)
            if not ctx.store.set_volume_attachment(volume.id, instance.id, point, expect=""):
                raise Conflict(f"volume {volume.name!r} was attached to another instance meanwhile")
            if running:
                try:
                    await provider.attach_volume(instance.id, ctx.attachment(ctx.reload_volume(volume)))
                except BaseException:
                    ctx.store.set_volume_attachment(volume.id, "", None, expect=instance.id)
                    raise
        return volume.name

    async def detach(self, ref: str) -> str:
        """Unmounted by the guest first (409 if busy: it stays attached and intact), then unplugged."""
        ctx = self.ctx
        volume = ctx.store.volumes.find(ref)
        instance_id = volume.obj.Attachment
        if not instance_id:
            raise Conflict(f"volume {volume.name!r} is not attached")
        instance = ctx.store.instances.get(instance_id)
        provider = ctx.provider_of(instance) if instance else None
        async with ctx.lock(instance_id):
            volume = ctx.reload_volume(volume)
            if volume.obj.Attachment != instance_id:
                raise Conflict(f"volume {volume.name!r} changed while waiting; try again")
            if provider is not None and provider.alive(instance_id):
                provider.require(Capability.HOT_PLUG)
                await provider.detach_volume(instance_id, ctx.attachment(volume))
            ctx.store.set_volume_attachment(volume.id, "", None, expect=instance_id)
        return volume.name
