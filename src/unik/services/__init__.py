"""The daemon's business logic, one service per resource, wired together over one Context.

Like docker-py's collections: `services.images`, `services.instances`, ... Each HTTP route
calls exactly one method of one of them; the CLI, the client and the dashboard all reach
the same rules (names, conflicts, cleanup on failure) through the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unik.artifacts import ArtifactStore
from unik.compilers import CompilerRegistry
from unik.config import DaemonConfig
from unik.providers.base import Provider
from unik.services.builds import BuildService
from unik.services.context import Context
from unik.services.disks import DiskService
from unik.services.hub import HubService
from unik.services.images import ImageService
from unik.services.instances import InstanceService
from unik.services.logs import LogService
from unik.services.reconcile import Reconciler
from unik.services.volumes import VolumeService
from unik.store import Store

__all__ = ["Context", "Services"]


@dataclass
class Services:
    ctx: Context
    reconciler: Reconciler
    instances: InstanceService
    images: ImageService
    builds: BuildService
    volumes: VolumeService
    logs: LogService
    hub: HubService
    disks: DiskService

    @classmethod
    def create(
        cls,
        config: DaemonConfig,
        data_dir: Path,
        store: Store,
        providers: dict[str, Provider],
        artifacts: ArtifactStore,
        compilers: CompilerRegistry,
        private_files: tuple[Path, ...] = (),
    ) -> Services:
        ctx = Context(config, data_dir, store, providers, artifacts)
        reconciler = Reconciler(ctx)
        instances = InstanceService(ctx, reconciler)
        images = ImageService(ctx, instances)
        return cls(
            ctx=ctx,
            reconciler=reconciler,
            instances=instances,
            images=images,
            builds=BuildService(ctx, images, compilers, private_files),
            volumes=VolumeService(ctx),
            logs=LogService(ctx, instances),
            hub=HubService(ctx, images),
            disks=DiskService(ctx),
        )

    @property
    def config(self) -> DaemonConfig:
        return self.ctx.config

    def provider_names(self) -> list[str]:
        return self.ctx.provider_names()

    def provider_status(self) -> dict[str, dict[str, Any]]:
        return {name: provider.status() for name, provider in self.ctx.providers.items()}
