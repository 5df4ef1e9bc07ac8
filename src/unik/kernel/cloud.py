"""Debian's cloud kernel, fetched once into the kernel root (``fetch``).

Nothing is installed on the host: the package is downloaded with ``apt-get download`` and
unpacked with ``dpkg-deb -x``; /boot is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from unik.kernel.apt import _apt_cache, _run
from unik.kernel.boot import extract_vmlinux
from unik.kernel.layout import CURRENT, Kernel, _install, _locked, _point, load

META_PACKAGE = "linux-image-cloud-amd64"


def fetch(kernel_root: Path) -> Kernel:
    """Make sure a complete kernel is under ``kernel_root`` and return it (idempotent)."""
    kernel_root = Path(kernel_root)
    with contextlib.suppress(FileNotFoundError):
        return load(kernel_root)
    with _locked(kernel_root):
        with contextlib.suppress(FileNotFoundError):
            return load(kernel_root)
        return _fetch_locked(kernel_root)


def _resolve_package() -> str:
    """The versioned image package the metapackage depends on, e.g. linux-image-6.1.0-56-cloud-amd64."""
    return _apt_cache(
        ["depends", META_PACKAGE],
        r"Depends:\s*(linux-image-\d[^\s<>|]*)",
        f"cannot resolve the kernel package behind {META_PACKAGE}",
    )


def _fetch_locked(kernel_root: Path) -> Kernel:
    package = _resolve_package()
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=kernel_root) as tmp_s:
        tmp = Path(tmp_s)
        download = tmp / "download"
        download.mkdir()
        # apt-get download writes into the working directory.
        _run(["apt-get", "download", package], cwd=download)
        debs = sorted(download.glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} produced {debs}")
        tree = tmp / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])

        vmlinuzes = sorted((tree / "boot").glob("vmlinuz-*"))
        if len(vmlinuzes) != 1:
            raise RuntimeError(f"expected one boot/vmlinuz-* in {debs[0].name}, found {vmlinuzes}")
        version = vmlinuzes[0].name.removeprefix("vmlinuz-")
        if not (tree / "lib" / "modules" / version).is_dir():
            raise RuntimeError(f"{debs[0].name} has no lib/modules/{version}")
        _run(["depmod", "-b", str(tree), version])

        stage = tmp / version
        stage.mkdir()
        shutil.move(tree / "lib", stage / "lib")
        shutil.move(vmlinuzes[0], stage / "vmlinuz")
        config = tree / "boot" / f"config-{version}"
        if config.is_file():
            shutil.move(config, stage / "config")
        extract_vmlinux(stage / "vmlinuz", stage / "vmlinux")

        _install(stage, kernel_root / version)
    _point(kernel_root, CURRENT, version)
    return load(kernel_root)
