"""What every service shares: the config, the store, the providers, the data dir's folders and
the per-instance locks, with the lookups that go with them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from unik.artifacts import ArtifactStore
from unik.config import DaemonConfig
from unik.errors import BadRequest, NotFound
from unik.models import Image, ImageMeta, Instance, InstanceMeta, InstanceState, Volume, VolumeAttachment, VolumeMeta
from unik.providers.base import Provider
from unik.store import Record, Store

ImageRecord = Record[Image, ImageMeta]
InstanceRecord = Record[Instance, InstanceMeta]
VolumeRecord = Record[Volume, VolumeMeta]

# Unknown: its host does not answer, so it may well still run (and hold its ports).
LIVE_STATES = {InstanceState.running.value, InstanceState.pending.value, InstanceState.unknown.value}


@dataclass
class Context:
    config: DaemonConfig
    data_dir: Path
    store: Store
    providers: dict[str, Provider]
    artifacts: ArtifactStore
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for folder in (self.tmp_dir, self.cache_dir, self.volumes_dir):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    def volume_disk(self, volume_id: str) -> Path:
        return self.volumes_dir / volume_id / "disk.img"

    # -- providers ------------------------------------------------------------------------

    def provider_names(self) -> list[str]:
        return sorted(self.providers)

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise BadRequest(
                f"provider {name!r} is not configured; available: {', '.join(self.provider_names()) or 'none'}"
            ) from None

    def provider_of(self, record: InstanceRecord) -> Provider | None:
        """The instance's provider, or None when the config no longer has it."""
        return self.providers.get(record.meta.provider)

    def only_provider(self) -> str:
        """docs/api.md lists `provider` but older clients may leave it out: unambiguous only with one."""
        if len(self.providers) == 1:
            return next(iter(self.providers))
        raise BadRequest(f"provider is required; available: {', '.join(self.provider_names()) or 'none'}")

    # -- instances --------------------------------------------------------------------------

    def lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    def forget_lock(self, instance_id: str) -> None:
        self._locks.pop(instance_id, None)

    def reload(self, record: InstanceRecord) -> InstanceRecord:
        fresh = self.store.instances.get(record.id)
        if fresh is None:
            raise NotFound(f"instance {record.name!r} not found")
        return fresh

    def set_state(self, record: InstanceRecord, state: InstanceState) -> None:
        record.obj.State = state.value
        self.store.instances.update(record)

    # -- volumes ----------------------------------------------------------------------------

    def reload_volume(self, volume: VolumeRecord) -> VolumeRecord:
        fresh = self.store.volumes.get(volume.id)
        if fresh is None:
            raise NotFound(f"volume {volume.name!r} not found")
        return fresh

    def attachment(self, volume: VolumeRecord) -> VolumeAttachment:
        # virtio-blk serials hold 20 characters; 20 hex digits of a random id are unique enough.
        return VolumeAttachment(
            serial=volume.id[:20],
            path=str(self.volume_disk(volume.id)),
            mount=volume.meta.mount or "",
            fs_type=volume.meta.fs_type,
            provider_data=volume.meta.provider_data,
        )

    def attachments(self, instance_id: str) -> list[VolumeAttachment]:
        return [self.attachment(v) for v in self.store.volumes.all() if v.obj.Attachment == instance_id]

    def release_volumes(self, instance_id: str) -> None:
        for volume in self.store.volumes.all():
            if volume.obj.Attachment == instance_id:
                self.store.set_volume_attachment(volume.id, "", None, expect=instance_id)
