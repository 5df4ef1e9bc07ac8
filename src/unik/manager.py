"""The daemon's business logic: images, instances and volumes over the store, compilers and providers.

The API layer only translates HTTP to these calls; everything a CLI user or a script can do
goes through here, so the rules (names, conflicts, cleanup on failure) live in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import shlex
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from unik import guest
from unik.archive import safe_extract
from unik.compilers import CompilerRegistry
from unik.config import DaemonConfig
from unik.errors import BadRequest, Conflict, NotFound, NotImplementedByProvider, UnikError
from unik.models import (
    DeviceMapping,
    Image,
    ImageRunSpec,
    ImageStageSpec,
    Instance,
    InstanceState,
    RunInstanceRequest,
    is_valid_name,
    now_rfc3339,
)
from unik.providers.base import LaunchSpec, Provider
from unik.store import Record, Store

log = logging.getLogger(__name__)

MONITOR_INTERVAL = 0.5
LOG_POLL_INTERVAL = 0.05
# Kernel modules every image carries; the cloud kernel has the serial console, ext4 and
# the i8042 keyboard controller (graceful stop) built in, so a plain app needs none yet.
BASE_MODULES: list[str] = []

LIVE_STATES = {InstanceState.running.value, InstanceState.pending.value}


class Manager:
    def __init__(
        self,
        config: DaemonConfig,
        data_dir: Path,
        store: Store,
        providers: dict[str, Provider],
        compilers: CompilerRegistry,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.store = store
        self.providers = providers
        self.compilers = compilers
        self.images_dir = data_dir / "images"
        self.tmp_dir = data_dir / "tmp"
        self.cache_dir = data_dir / "cache"
        for folder in (self.images_dir, self.tmp_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._building: set[str] = set()
        self._instance_locks: dict[str, asyncio.Lock] = {}

    # -- start-up and monitoring ---------------------------------------------------------

    def recover(self) -> None:
        """After a (possibly unclean) restart: drop leftovers, re-adopt VMs that still run."""
        for leftover in self.tmp_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        known = {r.id for r in self.store.images.all()}
        for folder in self.images_dir.iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
        for record in self.store.instances.all():
            self._refresh_state(record)

    def _refresh_state(self, record: Record[Instance]) -> Record[Instance]:
        provider = self.providers.get(record.internal.get("provider", ""))
        if record.obj.State not in LIVE_STATES:
            return record
        alive = provider is not None and provider.alive(record.id)
        if alive and record.obj.State == InstanceState.running.value:
            return record
        if not alive:
            with contextlib.suppress(NotFound):
                self._set_state(record, InstanceState.stopped)
        return record

    async def monitor(self) -> None:
        """Notice VMs that ended on their own (app exit, crash, kill) within a second."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                for record in self.store.instances.all():
                    if record.obj.State == InstanceState.running.value and not self._lock(record.id).locked():
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

    def list_images(self) -> list[Image]:
        return [r.obj for r in self.store.images.all()]

    def get_image(self, ref: str) -> Image:
        return self.store.images.find(ref).obj

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
        if name in self._building:
            raise Conflict(f"image {name!r} is being built right now")
        if not force and self.store.images.has_name(name):
            raise Conflict(f"image {name!r} already exists (use force to replace it)")
        self._building.add(name)
        image_id = uuid.uuid4().hex
        work = self.tmp_dir / f"build-{image_id}"
        final = self.images_dir / image_id
        try:
            source = work / "src"
            await asyncio.to_thread(
                safe_extract, upload, source, max_bytes=self.config.max_unpacked_mb << 20
            )
            bundle = await compiler.compile(source, work / "build", timeout=self.config.build_timeout)
            kernel = provider.kernel()
            init_binary = await asyncio.to_thread(guest.ensure_init_binary, self.cache_dir)
            try:
                modules = kernel.module_closure(BASE_MODULES + bundle.modules)
            except ValueError as exc:
                raise UnikError(f"kernel {kernel.version}: {exc}") from exc
            staging = work / "image"
            staging.mkdir()
            await asyncio.to_thread(
                guest.assemble_initrd,
                staging / "initrd",
                init_binary=init_binary,
                app_root=bundle.root,
                entrypoint=bundle.entrypoint,
                args=default_args,
                env=bundle.env,
                modules=modules,
            )
            await asyncio.to_thread(_hardlink_or_copy, kernel.vmlinux, staging / "kernel")
            digest, size = await asyncio.to_thread(_image_digest, staging / "kernel", staging / "initrd")
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
                    DefaultInstanceMemory=provider_default_memory(self.config),
                    Compiler=compiler.name,
                ),
            )
            staging.rename(final)
            internal = {
                "provider": provider_name,
                "compiler": compiler.name,
                "kernel_version": kernel.version,
                "digest": digest,
                "args": default_args,
                "dir": str(final),
            }
            replaced = self.store.images.insert(Record(image, internal), replace_name=force)
            if replaced is not None:
                # Instances keep their own links to the files, so the old folder can go now.
                shutil.rmtree(self.images_dir / replaced.id, ignore_errors=True)
            log.info("built image %s (%s) in %s", name, image_id, final)
            return image
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        finally:
            self._building.discard(name)
            if no_cleanup:
                log.warning("no_cleanup: build files of image %s kept in %s", name, work)
            else:
                shutil.rmtree(work, ignore_errors=True)

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

    def list_instances(self) -> list[Instance]:
        return [r.obj for r in self.store.instances.all()]

    def get_instance(self, ref: str) -> Instance:
        return self.store.instances.find(ref).obj

    async def run_instance(self, request: RunInstanceRequest) -> Instance:
        _require_name(request.InstanceName, "instance")
        if not request.ImageName:
            raise BadRequest("ImageName is required")
        image = self.store.images.find(request.ImageName)
        if request.Mounts:
            raise NotImplementedByProvider("volumes are not implemented yet: Mounts cannot be honoured")
        provider = self.provider(image.internal["provider"])
        memory = request.MemoryMb or image.obj.RunSpec.DefaultInstanceMemory
        max_memory = provider_max_memory(self.config)
        if memory <= 0 or memory > max_memory:
            raise BadRequest(f"MemoryMb must be between 1 and {max_memory}")
        env = _check_env(request.Env or {})
        instance = Instance(
            Id=uuid.uuid4().hex,
            Name=request.InstanceName,
            State=InstanceState.pending.value,
            IpAddress="",
            ImageId=image.id,
            Infrastructure=image.obj.Infrastructure,
            Created=now_rfc3339(),
        )
        spec = LaunchSpec(
            kernel=str(self.images_dir / image.id / "kernel"),
            initrd=str(self.images_dir / image.id / "initrd"),
            memory_mb=memory,
            env=env,
            hostname=request.InstanceName,
            debug_mode=request.DebugMode,
        )
        record = Record(
            instance,
            {"provider": provider.name, "spec": spec.to_dict(), "no_cleanup": request.NoCleanup},
        )
        self.store.instances.insert(record)
        async with self._lock(instance.Id):
            try:
                await self._boot(record, provider, spec)
            except BaseException:
                if request.NoCleanup:
                    log.warning("no_cleanup: failed instance %s and its files are kept", instance.Name)
                else:
                    await provider.remove(instance.Id)
                    self.store.instances.delete(instance.Id)
                raise
        return record.obj

    async def start_instance(self, ref: str) -> Instance:
        record = self.store.instances.find(ref)
        provider = self.provider(record.internal["provider"])
        async with self._lock(record.id):
            record = self._refresh_state(self._reload(record))
            if record.obj.State != InstanceState.running.value:
                await self._boot(record, provider, LaunchSpec.from_dict(record.internal["spec"]))
        return record.obj

    async def _boot(self, record: Record[Instance], provider: Provider, spec: LaunchSpec) -> None:
        """pending → running, or error if the VM does not start; the caller holds the instance lock."""
        self._set_state(record, InstanceState.pending)
        try:
            await provider.launch(record.id, spec)
        except BaseException:
            self._set_state(record, InstanceState.error)
            raise
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
            self.store.instances.delete(record.id)
        self._instance_locks.pop(record.id, None)

    def _reload(self, record: Record[Instance]) -> Record[Instance]:
        fresh = self.store.instances.get(record.id)
        if fresh is None:
            raise NotFound(f"instance {record.name!r} not found")
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
                await asyncio.sleep(LOG_POLL_INTERVAL)
        finally:
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


_background: set[asyncio.Task[None]] = set()


def provider_default_memory(config: DaemonConfig) -> int:
    return config.qemu.default_memory_mb if config.qemu else 128


def provider_max_memory(config: DaemonConfig) -> int:
    return config.qemu.max_memory_mb if config.qemu else 8192


def _require_name(name: str, kind: str) -> None:
    if not is_valid_name(name):
        raise BadRequest(f"invalid {kind} name {name!r}: use 1-64 characters of [A-Za-z0-9_.-], starting alphanumeric")


def _mount_points(mounts: list[str]) -> list[str]:
    points: list[str] = []
    for raw in mounts:
        point = raw.strip()
        if not point:
            continue
        if not point.startswith("/") or point == "/" or ".." in point.split("/") or "\x00" in point:
            raise BadRequest(f"mount point {point!r} must be an absolute path below /")
        if point not in points:
            points.append(point)
    return points


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
