"""The daemon's business logic: images, instances and volumes over the store, compilers and providers.

The API layer only translates HTTP to these calls; everything a CLI user or a script can do
goes through here, so the rules (names, conflicts, cleanup on failure) live in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import shlex
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from unik import guest, hub, volumes
from unik.archive import safe_extract
from unik.build_cache import BuildCache, CachedBuild, archive_sha256, cache_key, code_fingerprint, host_packages
from unik.compilers import Compiler, CompilerRegistry, build_settings
from unik.compilers.base import AppBundle, Sandbox, build_sandbox, sandbox_available
from unik.compilers.toolchain import which
from unik.config import DaemonConfig
from unik.errors import BadGateway, BadRequest, Conflict, NotFound, UnikError, disk_full
from unik.filewatch import FileChanges
from unik.models import (
    DeviceMapping,
    HubConfig,
    HubImage,
    HubTransfer,
    Image,
    ImageRunSpec,
    ImageStageSpec,
    Instance,
    InstanceState,
    RunInstanceRequest,
    Volume,
    is_valid_name,
    now_rfc3339,
)
from unik.providers.base import LaunchSpec, Provider, VolumeAttachment
from unik.store import Record, Store

log = logging.getLogger(__name__)

MONITOR_INTERVAL = 0.5
LOG_POLL_INTERVAL = 0.05
# How often a log follower with nothing new to read checks that the VM still runs.
LOG_LIVENESS_INTERVAL = 0.25
# Kernel modules every image carries (the cloud kernel has the serial ports, which carry the
# console and the control channel, ext4 and the i8042 keyboard controller built in): virtio
# disks for volumes, FAT with its code pages for `fat` volumes, and the virtio NIC (with its
# failover deps) that every network mode but `none` plugs in.
BASE_MODULES: list[str] = [
    "virtio_pci", "virtio_blk", "vfat", "nls_cp437", "nls_utf8", "nls_ascii", "virtio_net",
]  # fmt: skip

LIVE_STATES = {InstanceState.running.value, InstanceState.pending.value}


class Manager:
    def __init__(
        self,
        config: DaemonConfig,
        data_dir: Path,
        store: Store,
        providers: dict[str, Provider],
        compilers: CompilerRegistry,
        private_files: tuple[Path, ...] = (),
    ) -> None:
        """`private_files`: host files of the daemon's own that builds must not read (its
        config file, which may hold the API token, and its TLS key)."""
        self.config = config
        self.data_dir = data_dir
        self.store = store
        self.providers = providers
        self.compilers = compilers
        self.images_dir = data_dir / "images"
        self.tmp_dir = data_dir / "tmp"
        self.cache_dir = data_dir / "cache"
        self.volumes_dir = data_dir / "volumes"
        for folder in (self.images_dir, self.tmp_dir, self.cache_dir, self.volumes_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Toolchain caches (Go, Cargo, jlink) are the only place outside its own folder a
        # sandboxed build may write; the guest init cached in cache_dir stays out of reach.
        self.toolchain_cache = self.cache_dir / "toolchains"
        self.build_cache = BuildCache(self.cache_dir / "images")
        self.sandboxed_builds = _use_sandbox(config)
        self.private_files = tuple(path.resolve() for path in private_files)
        self.configured_toolchains = _configured_toolchains(config)
        self._building: set[str] = set()
        self._instance_locks: dict[str, asyncio.Lock] = {}
        self._creating_volumes: set[str] = set()
        # (provider, instance id) of runs cut short by a crash and of instances no record names:
        # recover() finds them, monitor() removes their VMs and files once the loop runs.
        self._half_made: list[tuple[Provider, str]] = []

    # -- start-up and monitoring ---------------------------------------------------------

    def recover(self) -> None:
        """After a (possibly unclean) restart: drop leftovers, re-adopt VMs that still run."""
        for leftover in self.tmp_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        known = {r.id for r in self.store.images.all()}
        for folder in self.images_dir.iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
        # A crash between building a volume's disk and recording it leaves an orphan folder.
        known_volumes = {r.id for r in self.store.volumes.all()}
        for folder in self.volumes_dir.iterdir():
            if folder.name not in known_volumes:
                shutil.rmtree(folder, ignore_errors=True)
        instances = self.store.instances.all()
        # VMs outlive the daemon by design, so one whose record is lost (a store restored from
        # a backup, a record deleted by hand) would run unseen and unreachable for good.
        known_instances = {r.id for r in instances}
        for provider in self.providers.values():
            for stray in sorted(provider.instance_ids() - known_instances):
                log.warning("removing instance %s: its VM or files are on this host, but no record names it", stray)
                self._half_made.append((provider, stray))
        self.store.release_unheld_addresses()
        for record in instances:
            if record.obj.State == InstanceState.pending.value and not self._recover_boot(record):
                continue
            self._refresh_state(record)

    def _recover_boot(self, record: Record[Instance]) -> bool:
        """The daemon died while booting this instance; False if the instance is gone for good."""
        provider = self.providers.get(record.internal.get("provider", ""))
        if provider is not None and provider.alive(record.id):
            # qemu -daemonize returns only once the VM runs: the boot had in fact succeeded.
            self._set_state(record, InstanceState.running)
            return True
        if record.internal.get("booted", True):
            return True  # a start of an existing instance that did not come up: it reads stopped
        # A run that never answered: the client never got this instance, so it goes entirely
        # rather than be listed half-made. Its files go once the event loop runs (monitor).
        self._release_volumes(record.id)
        self.store.instances.delete(record.id)
        self.store.release_address(record.id)
        if provider is not None:
            self._half_made.append((provider, record.id))
        log.warning("removed instance %s: the daemon stopped while it was being created", record.name)
        return False

    def _refresh_state(self, record: Record[Instance]) -> Record[Instance]:
        provider = self.providers.get(record.internal.get("provider", ""))
        if record.obj.State not in LIVE_STATES:
            return record
        alive = provider is not None and provider.alive(record.id)
        if alive and record.obj.State == InstanceState.running.value:
            return record
        if not alive:
            if provider is not None:
                # The VM ended on its own: what it held on the host (its tap) goes now.
                provider.release_network(record.id)
            with contextlib.suppress(NotFound):
                self._set_state(record, InstanceState.stopped)
        return record

    async def monitor(self) -> None:
        """Notice VMs that ended on their own (app exit, crash, kill) within a second."""
        while self._half_made:
            provider, instance_id = self._half_made.pop()
            try:
                await provider.remove(instance_id)
            except Exception:
                log.exception("removing half-made instance %s failed", instance_id)
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                # Only running ones are parsed: with many stopped instances a full scan twice a
                # second held the event loop (and every request waiting on it) for milliseconds.
                for record in self.store.instances.in_state(InstanceState.running.value):
                    if not self._lock(record.id).locked():
                        self._refresh_state(record)
            except Exception:
                log.exception("instance monitor failed")

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._instance_locks.setdefault(instance_id, asyncio.Lock())

    # -- info ------------------------------------------------------------------------------

    def available_providers(self) -> list[str]:
        return sorted(self.providers)

    def available_compilers(self) -> list[str]:
        return self.compilers.available()

    def describe_compiler(self, provider: str, base: str, lang: str) -> str:
        compiler = self.compilers.lookup(base, lang, provider)
        if compiler is None:
            return "<missing compiler description>"
        missing = compiler.missing_toolchain()
        text = compiler.description()
        return text if missing is None else f"{text}\nNOT AVAILABLE on this host: {missing}\n"

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise BadRequest(
                f"provider {name!r} is not configured; available: {', '.join(self.available_providers()) or 'none'}"
            ) from None

    # -- images ------------------------------------------------------------------------------

    def list_images_json(self) -> bytes:
        return self.store.images.all_wire_json()

    def get_image_json(self, ref: str) -> bytes:
        return self.store.images.find_wire_json(ref)

    async def build_image(
        self,
        name: str,
        upload: BinaryIO,
        *,
        base: str,
        lang: str,
        provider_name: str,
        args: str = "",
        mounts: list[str] | None = None,
        force: bool = False,
        no_cleanup: bool = False,
    ) -> Image:
        _require_name(name, "image")
        compiler = self.compilers.require(base, lang, provider_name)
        provider = self.provider(provider_name)
        try:
            default_args = shlex.split(args)
        except ValueError as exc:
            raise BadRequest(f"args: {exc}") from exc
        mount_points = _mount_points(mounts or [])
        image_id = uuid.uuid4().hex
        work = self.tmp_dir / f"build-{image_id}"
        final = self.images_dir / image_id
        with self._reserving_image(name, force):
            try:
                return await self._build(
                    name, upload, image_id, work, compiler, provider, default_args, mount_points, force
                )
            except BaseException as exc:
                shutil.rmtree(final, ignore_errors=True)
                _raise_if_disk_full(exc, self.data_dir)
                raise
            finally:
                if no_cleanup:
                    log.warning("no_cleanup: build files of image %s kept in %s", name, work)
                else:
                    shutil.rmtree(work, ignore_errors=True)

    @contextlib.contextmanager
    def _reserving_image(self, name: str, force: bool) -> Iterator[None]:
        """One build or pull per name at a time; a taken name needs force."""
        if name in self._building:
            raise Conflict(f"image {name!r} is being built or pulled right now")
        if not force and self.store.images.has_name(name):
            raise Conflict(f"image {name!r} already exists (use force to replace it)")
        self._building.add(name)
        try:
            yield
        finally:
            self._building.discard(name)

    def _record_image(self, image: Image, internal: dict[str, object], *, force: bool) -> None:
        replaced = self.store.images.insert(Record(image, internal), replace_name=force)
        if replaced is not None:
            # Instances keep their own links to the files, so the old folder can go now.
            shutil.rmtree(self.images_dir / replaced.id, ignore_errors=True)

    async def _build(
        self,
        name: str,
        upload: BinaryIO,
        image_id: str,
        work: Path,
        compiler: Compiler,
        provider: Provider,
        default_args: list[str],
        mount_points: list[str],
        force: bool,
    ) -> Image:
        final = self.images_dir / image_id
        staging = work / "image"
        # One worker-thread hop for the lookup and, on a miss, the unpacking: every hop is a
        # thread wake-up on the build's critical path.
        build_key, cached = await asyncio.to_thread(
            self._restore_or_unpack, upload, work, staging, compiler.name, default_args, mount_points, provider
        )
        if cached is not None:
            assert build_key is not None
            log.info("build cache hit for image %s (key %s): not unpacked, not compiled", name, build_key[:16])
            built = cached
        else:
            built = await self._compile(work, staging, compiler, provider, default_args, build_key)
        digest, size, memory_mb, kernel_version = built.digest, built.size, built.memory_mb, built.kernel_version
        image = Image(
            Id=image_id,
            Name=name,
            SizeMb=max(1, math.ceil(size / (1 << 20))),
            Infrastructure=provider.infrastructure,
            Created=now_rfc3339(),
            StageSpec=ImageStageSpec(ImageFormat="folder"),
            RunSpec=ImageRunSpec(
                DeviceMappings=[
                    DeviceMapping(MountPoint=m, DeviceName=f"/dev/vd{chr(ord('b') + i)}")
                    for i, m in enumerate(mount_points)
                ],
                DefaultInstanceMemory=max(provider_default_memory(self.config), memory_mb),
                Compiler=compiler.name,
            ),
        )
        staging.rename(final)
        internal = {
            "provider": provider.name,
            "compiler": compiler.name,
            "kernel_version": kernel_version,
            "digest": digest,
            "args": default_args,
            "dir": str(final),
            # hit: the files came from the build cache; miss: compiled (and cached); off: not cacheable.
            "build_cache": "off" if build_key is None else "hit" if cached is not None else "miss",
        }
        self._record_image(image, internal, force=force)
        log.info("built image %s (%s) in %s", name, image_id, final)
        return image

    def _restore_or_unpack(
        self,
        upload: BinaryIO,
        work: Path,
        staging: Path,
        compiler: str,
        args: list[str],
        mounts: list[str],
        provider: Provider,
    ) -> tuple[str | None, CachedBuild | None]:
        """In a worker thread: (cache key, the cached build restored into `staging`), or on a
        miss (key, None) with the upload unpacked into work/src for a compile."""
        build_key = self._build_cache_key(upload, compiler, args, mounts, provider)
        if build_key is not None:
            cached = self.build_cache.restore(build_key, staging, _image_digest)
            if cached is not None:
                return build_key, cached
        safe_extract(upload, work / "src", max_bytes=self.config.max_unpacked_mb << 20)
        return build_key, None

    async def _compile(
        self,
        work: Path,
        staging: Path,
        compiler: Compiler,
        provider: Provider,
        default_args: list[str],
        build_key: str | None,
    ) -> CachedBuild:
        """Compile the unpacked sources in the sandbox, then assemble kernel + initrd into
        `staging` and cache them under `build_key` (None: not cacheable)."""
        with self._sandbox(work):
            bundle = await compiler.compile(work / "src", work / "build", timeout=self.config.build_timeout)
        # All of the assembly in one worker-thread hop (see _restore_or_unpack).
        return await asyncio.to_thread(self._assemble, bundle, staging, provider, default_args, build_key)

    def _assemble(
        self, bundle: AppBundle, staging: Path, provider: Provider, default_args: list[str], build_key: str | None
    ) -> CachedBuild:
        kernel = provider.kernel()
        init_binary = guest.ensure_init_binary(self.cache_dir)
        try:
            modules = kernel.module_closure(BASE_MODULES + bundle.modules)
        except ValueError as exc:
            raise UnikError(f"kernel {kernel.version}: {exc}") from exc
        try:
            # The build could write in `work`: whatever it left where the image goes fails this.
            staging.mkdir()
        except FileExistsError:
            raise BadRequest(f"the build must not write outside its sources (it made {staging.name})") from None
        guest.assemble_initrd(
            staging / "initrd",
            init_binary=init_binary,
            app_root=bundle.root,
            entrypoint=bundle.entrypoint,
            args=default_args,
            env=bundle.env,
            modules=modules,
        )
        _hardlink_or_copy(kernel.vmlinux, staging / "kernel")
        digest, size = _image_digest(staging / "kernel", staging / "initrd")
        built = CachedBuild(digest=digest, size=size, memory_mb=bundle.memory_mb, kernel_version=kernel.version)
        if build_key is not None:
            self.build_cache.store(build_key, staging, built)
        return built

    def _build_cache_key(
        self, upload: BinaryIO, compiler: str, args: list[str], mounts: list[str], provider: Provider
    ) -> str | None:
        """The build cache key for these inputs, or None when this build must not be cached."""
        if self.config.build_network:
            return None  # what a build downloads may change between two builds of the same sources
        try:
            kernel = provider.kernel()
            init_binary = guest.ensure_init_binary(self.cache_dir)
            kernel_parts = {
                "version": kernel.version,
                "vmlinux": _file_sha256(kernel.vmlinux),
                "modules.dep": _file_sha256(kernel.modules_dir / "modules.dep"),
            }
        except (UnikError, RuntimeError, OSError):
            return None  # the build reports these itself, after the upload's own errors
        archive = archive_sha256(upload)
        if archive is None:
            return None
        settings = self.config
        return cache_key(
            archive=archive,
            compiler=compiler,
            toolchain={
                "python": settings.python_interpreter,
                "node": settings.node_binary,
                "java_home": str(settings.java_home) if settings.java_home else None,
                "host_packages": host_packages(),
            },
            args=args,
            mounts=mounts,
            kernel=kernel_parts,
            init=_file_sha256(init_binary),
            base_modules=BASE_MODULES,
            code=code_fingerprint(),
        )

    @contextlib.contextmanager
    def _sandbox(self, work: Path) -> Iterator[None]:
        if not self.sandboxed_builds:
            yield
            return
        writable = (work, self.toolchain_cache)
        sandbox = Sandbox(
            self.data_dir, writable, network=self.config.build_network, private=self.private_files,
            toolchains=self.configured_toolchains,
        )  # fmt: skip
        token = build_sandbox.set(sandbox)
        try:
            yield
        finally:
            build_sandbox.reset(token)

    async def delete_image(self, ref: str, *, force: bool = False) -> None:
        record = self.store.images.find(ref)
        users = [r for r in self.store.instances.all() if r.obj.ImageId == record.id]
        if users and not force:
            names = ", ".join(r.name for r in users)
            raise Conflict(f"image {record.name!r} is used by instances {names} (use force to delete them too)")
        for user in users:
            await self.delete_instance(user.id, force=True)
        self.store.images.delete(record.id)
        await asyncio.to_thread(shutil.rmtree, self.images_dir / record.id, True)

    # -- instances -------------------------------------------------------------------------

    def get_instance(self, ref: str) -> Instance:
        return self.store.instances.find(ref).obj

    def list_instances_json(self) -> bytes:
        return self.store.instances.all_wire_json()

    def get_instance_json(self, ref: str) -> bytes:
        return self.store.instances.find_wire_json(ref)

    async def run_instance(self, request: RunInstanceRequest) -> Instance:
        _require_name(request.InstanceName, "instance")
        if not request.ImageName:
            raise BadRequest("ImageName is required")
        image = self.store.images.find(request.ImageName)
        provider = self.provider(image.internal["provider"])
        mounts = self._resolve_mounts(image, request.Mounts or {})
        memory = request.MemoryMb or image.obj.RunSpec.DefaultInstanceMemory
        max_memory = provider_max_memory(self.config)
        if memory <= 0 or memory > max_memory:
            raise BadRequest(f"MemoryMb must be between 1 and {max_memory}")
        env = _check_env(request.Env or {})
        ports = [p.model_dump() for p in request.Ports or []]
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
            kernel=str(self.images_dir / image.id / "kernel"),
            initrd=str(self.images_dir / image.id / "initrd"),
            memory_mb=memory,
            kernel_version=image.internal.get("kernel_version", ""),
            env=env,
            hostname=request.InstanceName,
            debug_mode=request.DebugMode,
            ports=ports,
            address=guest_address,
        )
        record = Record(
            instance,
            # booted: whether a run ever completed; recover() drops a first boot cut short.
            {"provider": provider.name, "spec": spec.to_dict(), "no_cleanup": request.NoCleanup, "booted": False},
        )
        try:
            self.store.instances.insert(record)
        except BaseException:
            self.store.release_address(instance.Id)
            raise
        async with self._lock(instance.Id):
            try:
                self._claim_volumes(instance.Id, mounts)
                await self._boot(record, provider, spec)
            except BaseException as exc:
                if request.NoCleanup:
                    log.warning("no_cleanup: failed instance %s and its files are kept", instance.Name)
                else:
                    await provider.remove(instance.Id)
                    self._release_volumes(instance.Id)
                    self.store.instances.delete(instance.Id)
                    self.store.release_address(instance.Id)
                _raise_if_disk_full(exc, self.data_dir)
                raise
        return record.obj

    def _check_ports(self, provider: Provider, instance_id: str | None, ports: list[dict[str, Any]]) -> None:
        """Before anything starts: 400 for a port given twice, 409 for one that is taken."""
        wanted: set[tuple[int, str]] = set()
        for port in ports:
            key = (int(port["HostPort"]), str(port["Protocol"]))
            if key in wanted:
                raise BadRequest(f"host port {key[0]}/{key[1]} is published twice")
            wanted.add(key)
        if not ports:
            return
        # A booting instance has not bound its ports yet: only the records know about it.
        for other in self.store.instances.all():
            if other.id == instance_id or other.obj.State not in LIVE_STATES:
                continue
            held = {(int(p["HostPort"]), str(p["Protocol"])) for p in other.internal.get("spec", {}).get("ports", [])}
            clash = sorted(wanted & held)
            if clash:
                raise Conflict(f"host port {clash[0][0]}/{clash[0][1]} is published by instance {other.name!r}")
        provider.check_ports_free(ports)

    def _address(self, provider: Provider, instance_id: str) -> tuple[str, str]:
        """(IpAddress, the guest's address with prefix): its own address on a bridge network,
        else the host address its published ports listen on (the guest is not reachable directly)."""
        subnet = provider.instance_subnet()
        if subnet is None:
            return provider.publish_address() or "", ""
        address = self.store.allocate_address(instance_id, provider.address_candidates())
        return address, f"{address}/{subnet.prefixlen}"

    def _resolve_mounts(self, image: Record[Image], requested: dict[str, str]) -> dict[str, Record[Volume]]:
        """Mount point → volume, checked before anything starts."""
        points = _mount_points(list(requested))
        if len(points) != len(requested):
            raise BadRequest("Mounts: each mount point must be given once")
        expected = [m.MountPoint for m in image.obj.RunSpec.DeviceMappings]
        missing = [point for point in expected if point not in requested]
        if missing:
            raise BadRequest(f"image {image.name!r} expects volumes at {', '.join(missing)}: give them in Mounts")
        mounts: dict[str, Record[Volume]] = {}
        for point, ref in requested.items():
            volume = self.store.volumes.find(ref)
            if volume.obj.Attachment:
                raise Conflict(f"volume {volume.name!r} is attached to instance {volume.obj.Attachment}")
            if any(v.id == volume.id for v in mounts.values()):
                raise BadRequest(f"volume {volume.name!r} is given for two mount points")
            mounts[point] = volume
        return mounts

    def _claim_volumes(self, instance_id: str, mounts: dict[str, Record[Volume]]) -> None:
        for point, volume in mounts.items():
            if not self.store.set_volume_attachment(volume.id, instance_id, point, expect=""):
                raise Conflict(f"volume {volume.name!r} was attached to another instance meanwhile")

    def _release_volumes(self, instance_id: str) -> None:
        for volume in self.store.volumes.all():
            if volume.obj.Attachment == instance_id:
                self.store.set_volume_attachment(volume.id, "", None, expect=instance_id)

    def _attachments(self, instance_id: str) -> list[VolumeAttachment]:
        return [
            _attachment(volume) for volume in self.store.volumes.all() if volume.obj.Attachment == instance_id
        ]

    async def start_instance(self, ref: str) -> Instance:
        record = self.store.instances.find(ref)
        provider = self.provider(record.internal["provider"])
        async with self._lock(record.id):
            record = self._refresh_state(self._reload(record))
            if record.obj.State != InstanceState.running.value:
                spec = LaunchSpec.from_dict(record.internal["spec"])
                self._check_ports(provider, record.id, spec.ports)
                await self._boot(record, provider, spec)
        return record.obj

    async def _boot(self, record: Record[Instance], provider: Provider, spec: LaunchSpec) -> None:
        """pending → running, or error if the VM does not start; the caller holds the instance lock."""
        others = [r for r in self.store.instances.all() if r.id != record.id and r.obj.State in LIVE_STATES]
        cap = self.config.max_running_instances
        if len(others) >= cap:
            raise Conflict(f"{cap} instances are already running (max_running_instances): stop one first")
        self._set_state(record, InstanceState.pending)
        spec.volumes = self._attachments(record.id)
        try:
            await provider.launch(record.id, spec)
        except BaseException:
            self._set_state(record, InstanceState.error)
            raise
        record.internal["booted"] = True
        self._set_state(record, InstanceState.running)

    def _set_state(self, record: Record[Instance], state: InstanceState) -> None:
        record.obj.State = state.value
        self.store.instances.update(record)

    async def stop_instance(self, ref: str) -> Instance:
        record = self.store.instances.find(ref)
        provider = self.provider(record.internal["provider"])
        async with self._lock(record.id):
            await provider.stop(record.id)
            record = self._reload(record)
            self._set_state(record, InstanceState.stopped)
        return record.obj

    async def delete_instance(self, ref: str, *, force: bool = False) -> None:
        record = self.store.instances.find(ref)
        provider = self.providers.get(record.internal.get("provider", ""))
        async with self._lock(record.id):
            alive = provider is not None and provider.alive(record.id)
            if alive and not force:
                raise Conflict(f"instance {record.name!r} is running (stop it first, or use force)")
            if provider is not None:
                await provider.remove(record.id, keep_files=bool(record.internal.get("no_cleanup")))
            # The VM is gone, so its disks are: the volumes (and their data) stay, detached.
            self._release_volumes(record.id)
            self.store.instances.delete(record.id)
            self.store.release_address(record.id)
        self._instance_locks.pop(record.id, None)

    def _reload(self, record: Record[Instance]) -> Record[Instance]:
        fresh = self.store.instances.get(record.id)
        if fresh is None:
            raise NotFound(f"instance {record.name!r} not found")
        return fresh

    # -- attaching volumes ------------------------------------------------------------------

    async def attach_volume(self, volume_ref: str, instance_ref: str, mount: str) -> str:
        """Attach a volume at `mount`: hot-plugged and mounted now if the instance runs,
        otherwise mounted at its next start."""
        point = _mount_points([mount])[0] if mount.strip() else ""
        if not point:
            raise BadRequest("mount: an absolute mount point is required")
        volume = self.store.volumes.find(volume_ref)
        instance = self.store.instances.find(instance_ref)
        provider = self.provider(instance.internal["provider"])
        async with self._lock(instance.id):
            if volume.obj.Attachment:
                raise Conflict(f"volume {volume.name!r} is already attached to instance {volume.obj.Attachment}")
            taken = [v.mount for v in self._attachments(instance.id)]
            if point in taken:
                raise Conflict(f"instance {instance.name!r} already has a volume at {point}")
            if not self.store.set_volume_attachment(volume.id, instance.id, point, expect=""):
                raise Conflict(f"volume {volume.name!r} was attached to another instance meanwhile")
            if provider.alive(instance.id):
                try:
                    await provider.attach_volume(instance.id, _attachment(self._reload_volume(volume)))
                except BaseException:
                    self.store.set_volume_attachment(volume.id, "", None, expect=instance.id)
                    raise
        return volume.name

    async def detach_volume(self, volume_ref: str) -> str:
        """Unmounted by the guest first (409 if busy: it stays attached and intact), then unplugged."""
        volume = self.store.volumes.find(volume_ref)
        instance_id = volume.obj.Attachment
        if not instance_id:
            raise Conflict(f"volume {volume.name!r} is not attached")
        instance = self.store.instances.get(instance_id)
        provider = self.providers.get(instance.internal.get("provider", "")) if instance else None
        async with self._lock(instance_id):
            volume = self._reload_volume(volume)
            if volume.obj.Attachment != instance_id:
                raise Conflict(f"volume {volume.name!r} changed while waiting; try again")
            if provider is not None and provider.alive(instance_id):
                await provider.detach_volume(instance_id, _attachment(volume))
            self.store.set_volume_attachment(volume.id, "", None, expect=instance_id)
        return volume.name

    def _reload_volume(self, volume: Record[Volume]) -> Record[Volume]:
        fresh = self.store.volumes.get(volume.id)
        if fresh is None:
            raise NotFound(f"volume {volume.name!r} not found")
        return fresh

    # -- logs --------------------------------------------------------------------------------

    def _console(self, ref: str) -> tuple[Record[Instance], Path, Provider]:
        record = self.store.instances.find(ref)
        provider = self.provider(record.internal["provider"])
        return record, provider.console_path(record.id), provider

    async def logs(self, ref: str) -> str:
        _, path, _ = self._console(ref)
        return await asyncio.to_thread(_read_text, path)

    async def follow_logs(self, ref: str, *, delete: bool = False) -> AsyncIterator[bytes]:
        """Console output so far, then new output as it appears, until the VM stops."""
        record, path, provider = self._console(ref)
        position = 0
        changes = FileChanges(path, LOG_POLL_INTERVAL)
        try:
            while True:
                chunk = await asyncio.to_thread(_read_from, path, position)
                if chunk:
                    position += len(chunk)
                    yield chunk
                    continue
                current = self.store.instances.get(record.id)
                if current is None:
                    return
                starting = current.obj.State == InstanceState.pending.value
                if not starting and not provider.alive(record.id):
                    tail = await asyncio.to_thread(_read_from, path, position)
                    if tail:
                        yield tail
                    return
                await changes.wait(LOG_LIVENESS_INTERVAL)
        finally:
            changes.close()
            if delete:
                # The client is gone (or the VM ended): the task must outlive this generator.
                task = asyncio.get_running_loop().create_task(self._delete_quietly(record.id))
                _background.add(task)
                task.add_done_callback(_background.discard)

    async def _delete_quietly(self, instance_id: str) -> None:
        try:
            await self.delete_instance(instance_id, force=True)
        except NotFound:
            pass
        except Exception:
            log.exception("deleting instance %s after its log stream ended failed", instance_id)

    # -- volumes -----------------------------------------------------------------------------

    def list_volumes(self) -> list[Volume]:
        return [r.obj for r in self.store.volumes.all()]

    def get_volume(self, ref: str) -> Volume:
        return self.store.volumes.find(ref).obj

    async def create_volume(
        self,
        name: str,
        upload: BinaryIO | None,
        *,
        provider_name: str | None = None,
        raw: bool = False,
        fs_type: str | None = None,
        size_mb: int = 0,
        no_cleanup: bool = False,
    ) -> Volume:
        """A new volume: empty (size_mb required), filled from a tar.gz, or a raw disk image.

        size_mb 0 with data fits the data (unik.volumes.DataUsage.fitted_mb).
        """
        _require_name(name, "volume")
        provider = self.provider(provider_name or self._only_provider())
        kind = volumes.check_fs_type(fs_type)
        if raw:
            if upload is None:
                raise BadRequest("raw=true needs the disk image as the multipart file `tarfile`")
            kind = "raw"
        volumes.check_size(size_mb, self.config.max_volume_mb)
        if name in self._creating_volumes or self.store.volumes.has_name(name):
            raise Conflict(f"volume {name!r} already exists")
        self._creating_volumes.add(name)
        volume_id = uuid.uuid4().hex
        work = self.tmp_dir / f"volume-{volume_id}"
        final = self.volumes_dir / volume_id
        try:
            work.mkdir(parents=True)
            disk = work / "disk.img"
            if upload is None:
                size = await volumes.create_empty(disk, kind, size_mb)
            elif raw:
                size = await volumes.create_raw(upload, disk, size_mb, max_mb=self.config.max_volume_mb)
            else:
                size = await volumes.create_from_tar(
                    upload,
                    work,
                    disk,
                    kind,
                    size_mb,
                    max_bytes=min(self.config.max_unpacked_mb, self.config.max_volume_mb) << 20,
                    max_mb=self.config.max_volume_mb,
                )
            final.mkdir()
            # Same filesystem as tmp: the disk appears complete or not at all.
            disk.rename(final / "disk.img")
            volume = Volume(
                Id=volume_id,
                Name=name,
                SizeMb=size,
                Attachment="",
                Infrastructure=provider.infrastructure,
                Created=now_rfc3339(),
            )
            internal = {"path": str(final / "disk.img"), "fs_type": kind, "provider": provider.name, "mount": None}
            self.store.volumes.insert(Record(volume, internal))
            log.info("created %s volume %s (%s, %d MB) in %s", kind, name, volume_id, size, final)
            return volume
        except BaseException as exc:
            shutil.rmtree(final, ignore_errors=True)
            _raise_if_disk_full(exc, self.data_dir)
            raise
        finally:
            self._creating_volumes.discard(name)
            if no_cleanup:
                log.warning("no_cleanup: work files of volume %s kept in %s", name, work)
            else:
                await asyncio.to_thread(shutil.rmtree, work, True)

    def _only_provider(self) -> str:
        """API.md lists `provider` but older clients may leave it out: unambiguous only with one."""
        if len(self.providers) == 1:
            return next(iter(self.providers))
        raise BadRequest(f"provider is required; available: {', '.join(self.available_providers()) or 'none'}")

    async def delete_volume(self, ref: str, *, force: bool = False) -> None:
        record = self.store.volumes.find(ref)
        if record.obj.Attachment:
            if not force:
                raise Conflict(
                    f"volume {record.name!r} is attached to instance {record.obj.Attachment} "
                    "(detach it first, or use force)"
                )
            await self.detach_volume(record.id)
            record = self._reload_volume(record)
            if record.obj.Attachment:
                raise Conflict(f"volume {record.name!r} was attached again meanwhile")
        self.store.volumes.delete(record.id)
        await asyncio.to_thread(shutil.rmtree, self.volumes_dir / record.id, True)
        log.info("deleted volume %s (%s)", record.name, record.id)

    # -- hub -----------------------------------------------------------------------------------

    @functools.cached_property
    def hub_transfers(self) -> hub.TransferBoard:
        return hub.TransferBoard()

    def list_hub_transfers(self) -> list[HubTransfer]:
        return self.hub_transfers.list()

    async def push_image(self, ref: str, credentials: HubConfig) -> None:
        """Upload the image as one artifact to `<user>/<name>/latest`, replacing what was there."""
        record = self.store.images.find(ref)
        remote = hub.Hub(self.config.hub, credentials)
        folder = self.images_dir / record.id
        manifest = hub.Manifest(
            image=record.obj,
            digest=record.internal["digest"],
            provider=record.internal["provider"],
            compiler=record.internal.get("compiler", ""),
            kernel_version=record.internal.get("kernel_version", ""),
            args=record.internal.get("args", []),
        )
        metadata_of = functools.partial(hub.artifact_metadata, digest=manifest.digest, provider=manifest.provider)
        work = self.tmp_dir / f"push-{uuid.uuid4().hex}"
        work.mkdir()
        try:
            with self.hub_transfers.track(record.name, record.id, "push", "packing") as transfer:
                artifact = work / "image.tar"
                sha256 = await asyncio.to_thread(
                    hub.pack_artifact, manifest, folder / "kernel", folder / "initrd", artifact
                )
                await asyncio.to_thread(remote.push, record.name, artifact, metadata_of(sha256), transfer)
            log.info("pushed image %s (%s) to %s", record.name, record.id, remote.where(record.name))
        except BaseException as exc:
            _raise_if_disk_full(exc, self.data_dir)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def pull_image(self, name: str, credentials: HubConfig, *, provider_name: str, force: bool = False) -> Image:
        """Download, verify, then record: a damaged download leaves no image behind."""
        _require_name(name, "image")
        provider = self.provider(provider_name)
        remote_hub = hub.Hub(self.config.hub, credentials)
        image_id = uuid.uuid4().hex
        work = self.tmp_dir / f"pull-{image_id}"
        final = self.images_dir / image_id
        with self._reserving_image(name, force):
            try:
                return await self._pull(name, remote_hub, image_id, work, provider, force)
            except BaseException as exc:
                shutil.rmtree(final, ignore_errors=True)
                _raise_if_disk_full(exc, self.data_dir)
                raise
            finally:
                shutil.rmtree(work, ignore_errors=True)

    async def _pull(
        self, name: str, remote_hub: hub.Hub, image_id: str, work: Path, provider: Provider, force: bool
    ) -> Image:
        staging = work / "image"
        final = self.images_dir / image_id
        with self.hub_transfers.track(name, image_id, "pull", "downloading") as transfer:
            remote = await asyncio.to_thread(remote_hub.head, name)
            hub.require_provider(name, remote.provider or provider.name, provider.name)
            work.mkdir()
            await asyncio.to_thread(remote_hub.download, remote, work / "image.tar", transfer)
            transfer.begin("verifying")
            manifest = await asyncio.to_thread(hub.unpack_artifact, work / "image.tar", remote.sha256, staging)
            # The same function that made the digest at build time, over the files as unpacked.
            digest, size = await asyncio.to_thread(_image_digest, staging / "kernel", staging / "initrd")
        if digest != manifest.digest or (remote.digest and remote.digest != digest):
            raise BadGateway(f"the pulled image's digest {digest} does not match the hub's {manifest.digest}")
        await asyncio.to_thread(_share_kernel, staging / "kernel", provider)
        hub.require_provider(name, manifest.provider, provider.name)
        image = manifest.image.model_copy(
            update={
                "Id": image_id,
                "Name": name,
                "SizeMb": max(1, math.ceil(size / (1 << 20))),
                "Infrastructure": provider.infrastructure,
            }
        )
        staging.rename(final)
        internal = {
            "provider": provider.name,
            "compiler": manifest.compiler,
            "kernel_version": manifest.kernel_version,
            "digest": digest,
            "args": manifest.args,
            "dir": str(final),
            "pulled_from": remote_hub.where(name),
        }
        self._record_image(image, internal, force=force)
        log.info("pulled image %s (%s) from %s", name, image_id, remote_hub.where(name))
        return image

    async def remote_delete_image(self, name: str, credentials: HubConfig) -> None:
        remote_hub = hub.Hub(self.config.hub, credentials)
        await asyncio.to_thread(remote_hub.delete, name)
        log.info("deleted image %s from %s", name, remote_hub.where(name))

    async def search_hub(self, credentials: HubConfig) -> list[HubImage]:
        return await asyncio.to_thread(hub.Hub(self.config.hub, credentials).search)


_background: set[asyncio.Task[None]] = set()


def _configured_toolchains(config: DaemonConfig) -> tuple[Path, ...]:
    """The install folders of the interpreters and JDK the compilers use (the settings they are
    given), for the sandbox to show: a Python or Node.js in a home is its prefix, two levels
    above the program."""
    settings = build_settings(config, None)
    found = [which(program) for program in (settings.python, settings.node)]
    folders = [program.parent.parent for program in found if program is not None]
    if settings.java_home is not None:
        folders.append(settings.java_home)
    return tuple(folders)


def _use_sandbox(config: DaemonConfig) -> bool:
    if config.build_sandbox == "off":
        return False
    available = sandbox_available()
    if config.build_sandbox == "bwrap" and not available:
        raise ValueError("build_sandbox: bwrap is set but bubblewrap is missing or cannot create namespaces here")
    if not available:
        log.warning("bubblewrap is not usable here: builds run without a sandbox")
    return available


def provider_default_memory(config: DaemonConfig) -> int:
    return config.qemu.default_memory_mb if config.qemu else 128


def provider_max_memory(config: DaemonConfig) -> int:
    return config.qemu.max_memory_mb if config.qemu else 8192


def _require_name(name: str, kind: str) -> None:
    if not is_valid_name(name):
        raise BadRequest(f"invalid {kind} name {name!r}: use 1-64 characters of [A-Za-z0-9_.-], starting alphanumeric")


def _raise_if_disk_full(exc: BaseException, data_dir: Path) -> None:
    """A full host disk is a 507 that says so, not a 500 with a traceback or a 400 blaming the upload.

    Here rather than only in the API's catch-all handler: Starlette re-raises what that handler
    answered, and the server then drops the client's connection."""
    full = disk_full(exc, data_dir)
    if full is not None:
        raise full from exc


def _mount_points(mounts: list[str]) -> list[str]:
    points: list[str] = []
    for raw in mounts:
        point = raw.strip()
        if not point:
            continue
        if not point.startswith("/") or point == "/" or ".." in point.split("/") or _has_space_or_nul(point):
            raise BadRequest(f"mount point {point!r} must be an absolute path below /, without spaces")
        point = "/" + "/".join(part for part in point.split("/") if part not in ("", "."))
        if point not in points:
            points.append(point)
    return points


def _attachment(volume: Record[Volume]) -> VolumeAttachment:
    # virtio-blk serials hold 20 characters; 20 hex digits of a random id are unique enough.
    return VolumeAttachment(
        serial=volume.id[:20],
        path=volume.internal["path"],
        mount=volume.internal["mount"],
        fs_type=volume.internal.get("fs_type", "raw"),
    )


def _has_space_or_nul(text: str) -> bool:
    return any(c.isspace() or c == "\x00" for c in text)


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in str(value):
            raise BadRequest(f"invalid environment variable name {key!r}")
    return {str(k): str(v) for k, v in env.items()}


def _hardlink_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _share_kernel(kernel_file: Path, provider: Provider) -> None:
    """A pulled kernel byte-identical to the provider's own becomes a link to it, as a built
    image's is: no second copy on disk, nor in the page cache of the VMs that boot it."""
    try:
        own = provider.kernel().vmlinux
        if own.stat().st_size != kernel_file.stat().st_size or _file_sha256(own) != _file_sha256(kernel_file):
            return
        link = kernel_file.with_name(".kernel-link")
        os.link(own, link)
    except (UnikError, OSError):
        return  # another kernel, or another file system: the pulled copy stays
    os.replace(link, kernel_file)


def _image_digest(kernel: Path, initrd: Path) -> tuple[str, int]:
    """sha256 over the parts' digests; the kernel's is cached, every image shares it."""
    parts = [_file_sha256(kernel), _file_sha256(initrd)]
    combined = hashlib.sha256(f"kernel {parts[0]}\ninitrd {parts[1]}\n".encode()).hexdigest()
    return "sha256:" + combined, kernel.stat().st_size + initrd.stat().st_size


# Keyed by file identity, not path: every image's kernel is a hard link to the same inode.
_sha256_cache: dict[tuple[int, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_cache:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
        _sha256_cache[key] = sha.hexdigest()
    return _sha256_cache[key]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _read_from(path: Path, position: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(position)
            return f.read(1 << 16)
    except FileNotFoundError:
        return b""
