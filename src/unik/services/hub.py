"""The hub: push an image's artifact to S3, pull one back (verified before it is recorded),
search, delete remotely, and the board of transfers in progress."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import shutil
import uuid
from pathlib import Path

from unik import hub
from unik.artifacts import artifact_digest
from unik.artifacts.archive import Manifest, pack_artifact, unpack_artifact
from unik.errors import BadGateway, UnikError
from unik.models import HubConfig, HubImage, HubTransfer, Image, ImageMeta, PullImageRequest
from unik.providers.base import Provider
from unik.services.checks import raise_if_disk_full, require_name
from unik.services.context import Context
from unik.services.images import ImageService

log = logging.getLogger(__name__)


class HubService:
    def __init__(self, ctx: Context, images: ImageService) -> None:
        self.ctx = ctx
        self.images = images
        self.transfers = hub.TransferBoard()

    def _remote(self, credentials: HubConfig) -> hub.Hub:
        return hub.Hub(self.ctx.config.hub, credentials)

    def list_transfers(self) -> list[HubTransfer]:
        return self.transfers.list()

    async def push(self, ref: str, credentials: HubConfig) -> None:
        """Upload the image as one artifact to `<user>/<name>/latest`, replacing what was there."""
        ctx = self.ctx
        record = ctx.store.images.find(ref)
        remote = self._remote(credentials)
        meta = record.meta
        manifest = Manifest(
            image=record.obj, digest=meta.digest, provider=meta.provider, compiler=meta.compiler,
            kernel_version=meta.kernel_version, args=meta.args, artifact=meta.artifact,
        )  # fmt: skip
        metadata_of = functools.partial(hub.artifact_metadata, digest=manifest.digest, provider=manifest.provider)
        work = ctx.tmp_dir / f"push-{uuid.uuid4().hex}"
        work.mkdir()
        try:
            with self.transfers.track(record.name, record.id, "push", "packing") as transfer:
                artifact = work / "image.tar"
                folder = ctx.artifacts.folder(record.id)
                sha256 = await asyncio.to_thread(pack_artifact, manifest, folder, artifact)
                await asyncio.to_thread(remote.push, record.name, artifact, metadata_of(sha256), transfer)
            log.info("pushed image %s (%s) to %s", record.name, record.id, remote.where(record.name))
        except BaseException as exc:
            raise_if_disk_full(exc, ctx.data_dir)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def pull(self, request: PullImageRequest) -> Image:
        """Download, verify, then record: a damaged download leaves no image behind."""
        ctx, name = self.ctx, request.name
        require_name(name, "image")
        provider = ctx.provider(request.provider)
        remote = self._remote(request.credentials)

        async def produce(image_id: str, work: Path) -> tuple[Image, ImageMeta]:
            return await self._pull(name, remote, image_id, work, provider)

        image = await self.images.make(name, force=request.force, kind="pull", produce=produce)
        log.info("pulled image %s (%s) from %s", name, image.Id, remote.where(name))
        return image

    async def _pull(
        self, name: str, remote_hub: hub.Hub, image_id: str, work: Path, provider: Provider
    ) -> tuple[Image, ImageMeta]:
        staging = work / "image"
        with self.transfers.track(name, image_id, "pull", "downloading") as transfer:
            remote = await asyncio.to_thread(remote_hub.head, name)
            hub.require_provider(name, remote.provider or provider.name, provider.name)
            work.mkdir()
            await asyncio.to_thread(remote_hub.download, remote, work / "image.tar", transfer)
            transfer.begin("verifying")
            manifest = await asyncio.to_thread(unpack_artifact, work / "image.tar", remote.sha256, staging)
            # The same function that made the digest at build time, over the files as unpacked.
            digest, size = await asyncio.to_thread(artifact_digest, staging, manifest.artifact)
        if digest != manifest.digest or (remote.digest and remote.digest != digest):
            raise BadGateway(f"the pulled image's digest {digest} does not match the hub's {manifest.digest}")
        hub.require_provider(name, manifest.provider, provider.name)
        if manifest.artifact.format not in provider.artifact_formats:
            kind = manifest.artifact.format
            raise BadGateway(f"the pulled image is a {kind} image, which provider {provider.name} cannot boot")
        await asyncio.to_thread(self._share_kernel, staging, manifest, provider)
        image = manifest.image.model_copy(
            update={
                "Id": image_id,
                "Name": name,
                "SizeMb": max(1, math.ceil(size / (1 << 20))),
                "Infrastructure": provider.infrastructure,
            }
        )
        self.ctx.artifacts.adopt(image_id, staging)
        meta = ImageMeta(
            provider=provider.name, compiler=manifest.compiler, kernel_version=manifest.kernel_version,
            digest=digest, args=manifest.args, artifact=manifest.artifact, pulled_from=remote_hub.where(name),
        )  # fmt: skip
        return image, meta

    def _share_kernel(self, staging: Path, manifest: Manifest, provider: Provider) -> None:
        """A pulled kernel byte-identical to the provider's own becomes a link to it, as a
        built image's is."""
        try:
            kernel_name = manifest.artifact.name_of("kernel")
            own = provider.kernel().vmlinux
        except (KeyError, UnikError):
            return
        self.ctx.artifacts.share_file(staging / kernel_name, own)

    async def remote_delete(self, name: str, credentials: HubConfig) -> None:
        remote = self._remote(credentials)
        await asyncio.to_thread(remote.delete, name)
        log.info("deleted image %s from %s", name, remote.where(name))

    async def search(self, credentials: HubConfig) -> list[HubImage]:
        return await asyncio.to_thread(self._remote(credentials).search)
