"""Instances: run an image, start, stop and delete its VM, with the checks that come first."""

from __future__ import annotations

import logging
import uuid

from unik.errors import BadRequest, Conflict, NotFound
from unik.models import (
    Instance,
    InstanceMeta,
    InstanceState,
    LaunchSpec,
    PortMapping,
    RunInstanceRequest,
    now_rfc3339,
)
from unik.providers.base import Capability, Provider
from unik.services.checks import check_env, mount_points, raise_if_disk_full, require_name
from unik.services.context import LIVE_STATES, Context, ImageRecord, InstanceRecord, VolumeRecord
from unik.services.reconcile import Reconciler
from unik.store import Record

log = logging.getLogger(__name__)


class InstanceService:
    def __init__(self, ctx: Context, reconciler: Reconciler) -> None:
        self.ctx = ctx
        self.reconciler = reconciler

    def get(self, ref: str) -> Instance:
        return self.ctx.store.instances.find(ref).obj

    def list_json(self) -> bytes:
        return self.ctx.store.instances.all_wire_json()

    def get_json(self, ref: str) -> bytes:
        return self.ctx.store.instances.find_wire_json(ref)

    async def run(self, request: RunInstanceRequest) -> Instance:
        ctx = self.ctx
        require_name(request.InstanceName, "instance")
        if not request.ImageName:
            raise BadRequest("ImageName is required")
        image = ctx.store.images.find(request.ImageName)
        provider = ctx.provider(image.meta.provider)
        mounts = self._resolve_mounts(image, request.Mounts or {})
        memory = request.MemoryMb or image.obj.RunSpec.DefaultInstanceMemory
        if memory <= 0 or memory > provider.max_memory_mb:
            raise BadRequest(f"MemoryMb must be between 1 and {provider.max_memory_mb}")
        minimum = image.obj.RunSpec.MinInstanceMemoryMB
        if memory < minimum:
            # Below it the guest runs out of memory unpacking its initrd or starting its runtime:
            # a 201 would hand the user a VM that dies in its first second.
            raise BadRequest(
                f"MemoryMb {memory} is below image {image.name!r}'s minimum of {minimum} MB "
                f"(its default is {image.obj.RunSpec.DefaultInstanceMemory} MB)"
            )
        if request.DebugMode:
            provider.require(Capability.DEBUG_PORT)
        if request.WarmStart:
            provider.require(Capability.WARM_START)
        env = check_env(request.Env or {})
        ports = list(request.Ports or [])
        self._check_ports(provider, None, ports)
        instance_id = uuid.uuid4().hex
        ip_address, guest_address = self._address(provider, instance_id)
        instance = Instance(
            Id=instance_id,
            Name=request.InstanceName,
            State=InstanceState.pending.value,
            IpAddress=ip_address,
            ImageId=image.id,
            Infrastructure=image.obj.Infrastructure,
            Created=now_rfc3339(),
        )
        spec = LaunchSpec(
            image_id=image.id,
            artifact=image.meta.artifact,
            memory_mb=memory,
            kernel_version=image.meta.kernel_version,
            env=env,
            hostname=request.InstanceName,
            debug_mode=request.DebugMode,
            ports=ports,
            address=guest_address,
            warm_start=request.WarmStart,
            image_data=image.meta.provider_data,
        )
        record = Record(instance, InstanceMeta(provider=provider.name, spec=spec, no_cleanup=request.NoCleanup,
                                               booted=False))  # fmt: skip
        try:
            ctx.store.instances.insert(record)
        except BaseException:
            ctx.store.release_address(instance.Id)
            raise
        async with ctx.lock(instance.Id):
            try:
                self._claim_volumes(instance.Id, mounts)
                await self._boot(record, provider, spec)
            except BaseException as exc:
                if request.NoCleanup:
                    log.warning("no_cleanup: failed instance %s and its files are kept", instance.Name)
                else:
                    await provider.remove(instance.Id)
                    ctx.release_volumes(instance.Id)
                    ctx.store.instances.delete(instance.Id)
                    ctx.store.release_address(instance.Id)
                raise_if_disk_full(exc, ctx.data_dir)
                raise
        return record.obj

    def _check_ports(self, provider: Provider, instance_id: str | None, ports: list[PortMapping]) -> None:
        """Before anything starts: 400 for a port given twice, 409 for one that is taken."""
        wanted: set[tuple[int, str]] = set()
        for port in ports:
            key = (port.HostPort, port.Protocol)
            if key in wanted:
                raise BadRequest(f"host port {key[0]}/{key[1]} is published twice")
            wanted.add(key)
        if not ports:
            return
        provider.require(Capability.PUBLISHED_PORTS)
        # A booting instance has not bound its ports yet: only the records know about it.
        for other in self.ctx.store.instances.all():
            if other.id == instance_id or other.obj.State not in LIVE_STATES:
                continue
            clash = sorted(wanted & {(p.HostPort, p.Protocol) for p in other.meta.spec.ports})
            if clash:
                raise Conflict(f"host port {clash[0][0]}/{clash[0][1]} is published by instance {other.name!r}")
        provider.check_ports_free(ports)

    def _address(self, provider: Provider, instance_id: str) -> tuple[str, str]:
        """(IpAddress, the guest's address with prefix): its own address on a bridge network,
        else the host address its published ports listen on (the guest is not reachable directly)."""
        subnet = provider.instance_subnet()
        if subnet is None:
            return provider.publish_address() or "", ""
        address = self.ctx.store.allocate_address(instance_id, provider.address_candidates())
        return address, f"{address}/{subnet.prefixlen}"

    def _resolve_mounts(self, image: ImageRecord, requested: dict[str, str]) -> dict[str, VolumeRecord]:
        """Mount point → volume, checked before anything starts."""
        points = mount_points(list(requested))
        if len(points) != len(requested):
            raise BadRequest("Mounts: each mount point must be given once")
        expected = [m.MountPoint for m in image.obj.RunSpec.DeviceMappings]
        missing = [point for point in expected if point not in requested]
        if missing:
            raise BadRequest(f"image {image.name!r} expects volumes at {', '.join(missing)}: give them in Mounts")
        mounts: dict[str, VolumeRecord] = {}
        for point, ref in requested.items():
            volume = self.ctx.store.volumes.find(ref)
            if volume.obj.Attachment:
                raise Conflict(f"volume {volume.name!r} is attached to instance {volume.obj.Attachment}")
            if any(v.id == volume.id for v in mounts.values()):
                raise BadRequest(f"volume {volume.name!r} is given for two mount points")
            mounts[point] = volume
        return mounts

    def _claim_volumes(self, instance_id: str, mounts: dict[str, VolumeRecord]) -> None:
        for point, volume in mounts.items():
            if not self.ctx.store.set_volume_attachment(volume.id, instance_id, point, expect=""):
                raise Conflict(f"volume {volume.name!r} was attached to another instance meanwhile")

    async def start(self, ref: str) -> Instance:
        record = self.ctx.store.instances.find(ref)
        provider = self.ctx.provider(record.meta.provider)
        async with self.ctx.lock(record.id):
            record = self.reconciler.refresh(self.ctx.reload(record))
            if record.obj.State == InstanceState.unknown.value:
                # A second VM of it elsewhere would be two instances with one name and volume.
                why = provider.unreachable(record.id) or "its host did not answer"
                raise Conflict(f"instance {record.name!r} may still run: {why}")
            if record.obj.State != InstanceState.running.value:
                spec = record.meta.spec
                self._check_ports(provider, record.id, spec.ports)
                await self._boot(record, provider, spec)
        return record.obj

    async def _boot(self, record: InstanceRecord, provider: Provider, spec: LaunchSpec) -> None:
        """pending → running, or error if the VM does not start; the caller holds the instance lock."""
        ctx = self.ctx
        others = [r for r in ctx.store.instances.all() if r.id != record.id and r.obj.State in LIVE_STATES]
        cap = ctx.config.max_running_instances
        if len(others) >= cap:
            raise Conflict(f"{cap} instances are already running (max_running_instances): stop one first")
        ctx.set_state(record, InstanceState.pending)
        boot_spec = spec.model_copy(update={"volumes": ctx.attachments(record.id)})
        try:
            warm = await provider.launch(record.id, boot_spec)
        except BaseException:
            ctx.set_state(record, InstanceState.error)
            raise
        record.meta.booted = True
        record.obj.StartedWarm = bool(warm)
        record.obj.IpAddress = provider.address_of(record.id) or record.obj.IpAddress
        record.obj.Host = provider.host_of(record.id) or ""
        ctx.set_state(record, InstanceState.running)

    async def stop(self, ref: str) -> Instance:
        record = self.ctx.store.instances.find(ref)
        provider = self.ctx.provider(record.meta.provider)
        async with self.ctx.lock(record.id):
            await provider.stop(record.id)
            record = self.ctx.reload(record)
            self.ctx.set_state(record, InstanceState.stopped)
        return record.obj

    async def delete(self, ref: str, *, force: bool = False) -> None:
        ctx = self.ctx
        record = ctx.store.instances.find(ref)
        provider = ctx.provider_of(record)
        async with ctx.lock(record.id):
            alive = provider is not None and provider.alive(record.id)
            if alive and not force:
                raise Conflict(f"instance {record.name!r} is running (stop it first, or use force)")
            if provider is not None:
                await provider.remove(record.id, keep_files=record.meta.no_cleanup)
            # The VM is gone, so its disks are: the volumes (and their data) stay, detached.
            ctx.release_volumes(record.id)
            ctx.store.instances.delete(record.id)
            ctx.store.release_address(record.id)
        ctx.forget_lock(record.id)

    async def delete_quietly(self, instance_id: str) -> None:
        """Delete, logging what fails: for deletions nobody waits on."""
        try:
            await self.delete(instance_id, force=True)
        except NotFound:
            pass
        except Exception:
            log.exception("deleting instance %s failed", instance_id)
