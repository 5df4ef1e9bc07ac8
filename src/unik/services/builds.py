"""Builds: an uploaded tar.gz of sources compiled in the sandbox into an image's artifact, cached."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from unik import guest
from unik.archive import safe_extract
from unik.artifacts import DIGESTS, artifact_digest, hardlink_or_copy, initrd_min_memory_mb
from unik.build_cache import BuildCache, CachedBuild, archive_sha256, cache_key, code_fingerprint, host_packages
from unik.compilers import Compiler, CompilerRegistry, build_settings
from unik.compilers.base import AppBundle, Sandbox, build_sandbox, sandbox_available
from unik.compilers.toolchain import which
from unik.config import DaemonConfig
from unik.errors import BadRequest, NotImplementedByProvider, UnikError
from unik.models import (
    DISK_FORMATS,
    KERNEL_INITRD,
    Artifact,
    BuildImageRequest,
    DeviceMapping,
    Image,
    ImageMeta,
    ImageRunSpec,
    ImageStageSpec,
    now_rfc3339,
)
from unik.providers.base import Provider
from unik.services.checks import mount_points, require_name
from unik.services.context import Context
from unik.services.images import ImageService

log = logging.getLogger(__name__)


class BuildService:
    def __init__(
        self, ctx: Context, images: ImageService, compilers: CompilerRegistry, private_files: tuple[Path, ...] = ()
    ) -> None:
        """`private_files`: host files of the daemon's own that builds must not read (its
        config file, which may hold the API token, and its TLS key)."""
        self.ctx = ctx
        self.images = images
        self.compilers = compilers
        # Toolchain caches (Go, Cargo, jlink) are the only place outside its own folder a
        # sandboxed build may write; the guest init cached in cache_dir stays out of reach.
        self.toolchain_cache = ctx.cache_dir / "toolchains"
        self.cache = BuildCache(ctx.cache_dir / "images")
        self.sandboxed = _use_sandbox(ctx.config)
        self.private_files = tuple(path.resolve() for path in private_files)
        self.configured_toolchains = _configured_toolchains(ctx.config)

    def available_compilers(self) -> list[str]:
        return self.compilers.available()

    def describe_compiler(self, provider: str, base: str, lang: str) -> str:
        """The compiler's own description; an unknown one is a 400 naming those available."""
        compiler = self.compilers.lookup(base, lang, provider)
        if compiler is None:
            self.compilers.require(base, lang, provider)  # raises, naming what is available
            raise AssertionError("unreachable")
        missing = compiler.missing_toolchain()
        text = compiler.description()
        return text if missing is None else f"{text}\nNOT AVAILABLE on this host: {missing}\n"

    async def build(self, request: BuildImageRequest) -> Image:
        ctx = self.ctx
        require_name(request.name, "image")
        compiler = self.compilers.require(request.base, request.lang, request.provider)
        provider = ctx.provider(request.provider)
        if KERNEL_INITRD not in provider.artifact_formats:
            raise NotImplementedByProvider(
                f"provider {provider.name} boots {', '.join(sorted(provider.artifact_formats))} images; "
                f"builds make {KERNEL_INITRD}"
            )
        try:
            default_args = shlex.split(request.args)
        except ValueError as exc:
            raise BadRequest(f"args: {exc}") from exc
        points = mount_points(request.mounts)

        async def produce(image_id: str, work: Path) -> tuple[Image, ImageMeta]:
            return await self._build(request, image_id, work, compiler, provider, default_args, points)

        image = await self.images.make(
            request.name, force=request.force, kind="build", produce=produce, keep_work=request.no_cleanup
        )
        log.info("built image %s (%s)", request.name, image.Id)
        return image

    async def _build(
        self,
        request: BuildImageRequest,
        image_id: str,
        work: Path,
        compiler: Compiler,
        provider: Provider,
        default_args: list[str],
        points: list[str],
    ) -> tuple[Image, ImageMeta]:
        staging = work / "image"
        # One worker-thread hop for the lookup and, on a miss, the unpacking: every hop is a
        # thread wake-up on the build's critical path.
        build_key, cached = await asyncio.to_thread(
            self._restore_or_unpack, request.sources, work, staging, compiler.name, default_args, points, provider
        )
        if cached is not None:
            assert build_key is not None
            log.info("build cache hit for image %s (key %s): not unpacked, not compiled", request.name, build_key[:16])
            built = cached
        else:
            with self._sandbox(work):
                bundle = await compiler.compile(work / "src", work / "build", timeout=self.ctx.config.build_timeout)
            # All of the assembly in one worker-thread hop (see above).
            built = await asyncio.to_thread(self._assemble, bundle, staging, provider, default_args, build_key)
        image = Image(
            Id=image_id,
            Name=request.name,
            SizeMb=max(1, math.ceil(built.size / (1 << 20))),
            Infrastructure=provider.infrastructure,
            Created=now_rfc3339(),
            StageSpec=ImageStageSpec(ImageFormat="folder", DiskFormats=list(DISK_FORMATS)),
            RunSpec=ImageRunSpec(
                DeviceMappings=[
                    DeviceMapping(MountPoint=m, DeviceName=provider.volume_device(i)) for i, m in enumerate(points)
                ],
                DefaultInstanceMemory=max(provider.default_memory_mb, built.memory_mb, built.min_memory_mb),
                MinInstanceMemoryMB=built.min_memory_mb,
                Compiler=compiler.name,
            ),
        )
        self.ctx.artifacts.adopt(image_id, staging)
        meta = ImageMeta(
            provider=provider.name,
            compiler=compiler.name,
            kernel_version=built.kernel_version,
            digest=built.digest,
            args=default_args,
            artifact=built.artifact,
            build_cache="off" if build_key is None else "hit" if cached is not None else "miss",
        )
        return image, meta

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
        build_key = self._cache_key(upload, compiler, args, mounts, provider)
        if build_key is not None:
            cached = self.cache.restore(build_key, staging)
            if cached is not None:
                return build_key, cached
        safe_extract(upload, work / "src", max_bytes=self.ctx.config.max_unpacked_mb << 20)
        return build_key, None

    def _assemble(
        self, bundle: AppBundle, staging: Path, provider: Provider, default_args: list[str], build_key: str | None
    ) -> CachedBuild:
        """The kernel+initrd artifact: the provider's kernel and an initrd of init, app and modules."""
        artifact = Artifact()
        kernel = provider.kernel()
        init_binary = guest.ensure_init_binary(self.ctx.cache_dir)
        try:
            modules = kernel.module_closure(provider.image_modules() + bundle.modules)
        except ValueError as exc:
            raise UnikError(f"kernel {kernel.version}: {exc}") from exc
        try:
            # The build could write in `work`: whatever it left where the image goes fails this.
            staging.mkdir()
        except FileExistsError:
            raise BadRequest(f"the build must not write outside its sources (it made {staging.name})") from None
        guest.assemble_initrd(
            staging / artifact.name_of("initrd"),
            init_binary=init_binary,
            app_root=bundle.root,
            entrypoint=bundle.entrypoint,
            args=default_args,
            env=bundle.env,
            modules=modules,
        )
        hardlink_or_copy(kernel.vmlinux, staging / artifact.name_of("kernel"))
        digest, size = artifact_digest(staging, artifact)
        initrd_bytes = (staging / artifact.name_of("initrd")).stat().st_size
        built = CachedBuild(artifact=artifact, digest=digest, size=size, memory_mb=bundle.memory_mb,
                            min_memory_mb=initrd_min_memory_mb(initrd_bytes, bundle.runtime_min_mb),
                            kernel_version=kernel.version)  # fmt: skip
        if build_key is not None:
            self.cache.store(build_key, staging, built)
        return built

    def _cache_key(
        self, upload: BinaryIO, compiler: str, args: list[str], mounts: list[str], provider: Provider
    ) -> str | None:
        """The build cache key for these inputs, or None when this build must not be cached."""
        config = self.ctx.config
        if config.build_network:
            return None  # what a build downloads may change between two builds of the same sources
        try:
            kernel = provider.kernel()
            init_binary = guest.ensure_init_binary(self.ctx.cache_dir)
            kernel_parts = {
                "version": kernel.version,
                "vmlinux": DIGESTS.sha256(kernel.vmlinux),
                "modules.dep": DIGESTS.sha256(kernel.modules_dir / "modules.dep"),
            }
        except (UnikError, RuntimeError, OSError):
            return None  # the build reports these itself, after the upload's own errors
        archive = archive_sha256(upload)
        if archive is None:
            return None
        return cache_key(
            archive=archive,
            compiler=compiler,
            toolchain={
                "python": config.python_interpreter,
                "node": config.node_binary,
                "java_home": str(config.java_home) if config.java_home else None,
                "host_packages": host_packages(),
            },
            args=args,
            mounts=mounts,
            kernel=kernel_parts,
            init=DIGESTS.sha256(init_binary),
            base_modules=provider.image_modules(),
            code=code_fingerprint(),
        )

    @contextlib.contextmanager
    def _sandbox(self, work: Path) -> Iterator[None]:
        if not self.sandboxed:
            yield
            return
        sandbox = Sandbox(
            self.ctx.data_dir, (work, self.toolchain_cache), network=self.ctx.config.build_network,
            private=self.private_files, toolchains=self.configured_toolchains,
        )  # fmt: skip
        token = build_sandbox.set(sandbox)
        try:
            yield
        finally:
            build_sandbox.reset(token)


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
