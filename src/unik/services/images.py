"""Images: list, describe and delete them; making one (one build or pull per name at a time,
nothing left of a failed one) and recording it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from unik.errors import Conflict
from unik.models import Image, ImageMeta
from unik.services.checks import raise_if_disk_full
from unik.services.context import Context, ImageRecord
from unik.services.instances import InstanceService
from unik.store import Record

log = logging.getLogger(__name__)


class ImageService:
    def __init__(self, ctx: Context, instances: InstanceService) -> None:
        self.ctx = ctx
        self.instances = instances
        self._reserved: set[str] = set()

    def list_json(self) -> bytes:
        return self.ctx.store.images.all_wire_json()

    def get_json(self, ref: str) -> bytes:
        return self.ctx.store.images.find_wire_json(ref)

    async def make(
        self,
        name: str,
        *,
        force: bool,
        kind: str,
        produce: Callable[[str, Path], Awaitable[tuple[Image, ImageMeta]]],
        keep_work: bool = False,
    ) -> Image:
        """A new image `name`: `produce(image_id, work)` puts its files in place and describes it,
        then it is recorded. A failure leaves no image folder and no record; the work folder goes
        either way unless `keep_work` (a user's no_cleanup)."""
        ctx = self.ctx
        image_id = uuid.uuid4().hex
        work = ctx.tmp_dir / f"{kind}-{image_id}"
        with self._reserving(name, force):
            try:
                image, meta = await produce(image_id, work)
                provider = ctx.provider(meta.provider)
                meta.provider_data = await provider.publish_image(image_id, meta)
                try:
                    self.record(image, meta, force=force)
                except BaseException:
                    provider.forget_image(image_id, meta)
                    raise
                return image
            except BaseException as exc:
                ctx.artifacts.remove(image_id)
                raise_if_disk_full(exc, ctx.data_dir)
                raise
            finally:
                if keep_work:
                    log.warning("no_cleanup: %s files of image %s kept in %s", kind, name, work)
                else:
                    shutil.rmtree(work, ignore_errors=True)

    @contextlib.contextmanager
    def _reserving(self, name: str, force: bool) -> Iterator[None]:
        """One build or pull per name at a time; a taken name needs force."""
        if name in self._reserved:
            raise Conflict(f"image {name!r} is being built or pulled right now")
        if not force and self.ctx.store.images.has_name(name):
            raise Conflict(f"image {name!r} already exists (use force to replace it)")
        self._reserved.add(name)
        try:
            yield
        finally:
            self._reserved.discard(name)

    def record(self, image: Image, meta: ImageMeta, *, force: bool) -> None:
        """Record an image whose files are in place; with force it replaces one of the same name."""
        replaced = self.ctx.store.images.insert(Record(image, meta), replace_name=force)
        if replaced is not None:
            # Instances keep their own links to the files, so the old folder can go now.
            self._remove_files(replaced)

    async def delete(self, ref: str, *, force: bool = False) -> None:
        ctx = self.ctx
        record = ctx.store.images.find(ref)
        users = [r for r in ctx.store.instances.all() if r.obj.ImageId == record.id]
        if users and not force:
            names = ", ".join(r.name for r in users)
            raise Conflict(f"image {record.name!r} is used by instances {names} (use force to delete them too)")
        for user in users:
            await self.instances.delete(user.id, force=True)
        ctx.store.images.delete(record.id)
        await asyncio.to_thread(self._remove_files, record)
        log.info("deleted image %s (%s)", record.name, record.id)

    def _remove_files(self, record: ImageRecord) -> None:
        """The image's folder (with its exported disks) and what its provider keeps of it."""
        self.ctx.artifacts.remove(record.id)
        provider = self.ctx.providers.get(record.meta.provider)
        if provider is not None:
            provider.forget_image(record.id, record.meta)
