"""An instance's boot files in its folder: its own links to the image's kernel and initrd (so
deleting or replacing the image never breaks it) and the run config (env, args, mounts,
network) that the guest init reads, either appended to a per-boot copy of the initrd or, for a
big image on a kernel that reads fw_cfg, handed over alone as a fw_cfg file."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unik.artifacts import ArtifactStore, hardlink_or_copy
from unik.errors import UnikError
from unik.kernel import Kernel
from unik.models import LaunchSpec

# From this size on, an image's initrd is not copied for each boot (see shares_image_initrd).
SHARED_INITRD_MIN_BYTES = 8 << 20


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    # The run config as a fw_cfg file, when the initrd is the image's own.
    run_archive: Path | None


def stage_boot_files(
    folder: Path, artifacts: ArtifactStore, spec: LaunchSpec, run_config: bytes, provider_kernel: Callable[[], Kernel]
) -> BootFiles:
    folder.mkdir(parents=True, exist_ok=True)
    kernel = folder / "kernel"
    image_initrd = folder / "image.initrd"
    _link_or_copy(artifacts.path(spec.image_id, spec.artifact, "kernel"), kernel)
    _link_or_copy(artifacts.path(spec.image_id, spec.artifact, "initrd"), image_initrd)
    boot_initrd, run_archive = folder / "boot.initrd", folder / "run.cpio"
    if shares_image_initrd(spec, image_initrd, provider_kernel):
        _write_new(run_archive, run_config)
        boot_initrd.unlink(missing_ok=True)
        return BootFiles(kernel, image_initrd, run_archive)
    _concat(image_initrd, run_config, boot_initrd)
    run_archive.unlink(missing_ok=True)
    return BootFiles(kernel, boot_initrd, None)


def shares_image_initrd(spec: LaunchSpec, image_initrd: Path, provider_kernel: Callable[[], Kernel]) -> bool:
    """Whether a boot can use the image's initrd file itself, its run archive going through
    fw_cfg. Worth it for big initrds: a copy per instance costs disk, page cache, time and a
    writeback while other VMs boot, where init's unpacking costs ~2 ms. The image's kernel
    must be a build of the provider's own, whose config says fw_cfg is in sysfs (the micro
    kernel; Debian's has it as a module): the same release, whose name carries the build key
    of its config, so a pulled image qualifies as a built one does. For any other kernel, the copy."""
    if image_initrd.stat().st_size < SHARED_INITRD_MIN_BYTES:
        return False
    try:
        kernel = provider_kernel()
        if spec.kernel_version:
            same_build = spec.kernel_version == kernel.version
        else:  # an instance recorded before the kernel's release was
            same_build = (image_initrd.parent / "kernel").samefile(kernel.vmlinux)
        return same_build and kernel.builds_in("CONFIG_FW_CFG_SYSFS")
    except (UnikError, OSError):
        return False


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    hardlink_or_copy(source, tmp)
    tmp.rename(target)


def _write_new(target: Path, data: bytes) -> None:
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(target)


def _concat(first: Path, tail: bytes, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    # copyfile copies in the kernel (sendfile), faster than a read/write loop for big initrds.
    shutil.copyfile(first, tmp)
    with open(tmp, "ab") as out:
        out.write(tail)
    tmp.rename(target)
