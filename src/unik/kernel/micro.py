"""The project's own kernels, built once from Debian's linux-source (``build_micro``).

Each is ``make tinyconfig`` with config fragments on top: everything built in, no modules.
"micro" (``guest/unik-micro.config``) is what the QEMU provider boots; "disk" adds
``guest/unik-disk.config`` (the EFI stub, SATA/NVMe/SCSI disks, e1000/vmxnet3/ENA NICs, Hyper-V)
for bootable disks. A result is cached by a build key (see ``layout`` for where it lands).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unik.kernel.apt import _apt_cache, _run
from unik.kernel.boot import extract_vmlinux
from unik.kernel.layout import DISK, MICRO, Kernel, _install, _locked, _point, fragment_options, load

MICRO_SOURCE_PACKAGE = "linux-source-6.1"
MICRO_CONFIG = Path(__file__).resolve().parent.parent / "guest" / "unik-micro.config"
DISK_CONFIG = MICRO_CONFIG.with_name("unik-disk.config")
MICRO_LOCALVERSION = "-unik-micro"
# Part of the build key: bump it when build_micro changes what it produces from the same inputs.
_MICRO_RECIPE = "1"
# Host tools the kernel build runs (bc, bison, flex, libelf-dev's headers, xz for the tarball).
_MICRO_TOOLS = ("make", "gcc", "bc", "bison", "flex", "xz", "perl", "apt-get", "dpkg-deb")


@dataclass(frozen=True)
class Build:
    """One kernel built from the source: its flavour (the symlink), fragments and object tree."""

    flavour: str
    fragments: tuple[Path, ...]
    localversion: str
    out: str


MICRO_BUILD = Build(MICRO, (MICRO_CONFIG,), MICRO_LOCALVERSION, "out")
DISK_BUILD = Build(DISK, (MICRO_CONFIG, DISK_CONFIG), "-unik-disk", "out-disk")
BUILDS = {b.flavour: b for b in (MICRO_BUILD, DISK_BUILD)}


def build_micro(kernel_root: Path, *, log: Path | None = None, build: Build = MICRO_BUILD) -> Kernel:
    """Build (once) the kernel ``build`` under ``kernel_root`` and return it (idempotent).

    The result is cached by a key over the source package version, the config fragments and the
    recipe: the same inputs return the kernel already there, in milliseconds.
    """
    kernel_root = Path(kernel_root)
    version = _source_version()
    key = _build_key(version, build)
    with contextlib.suppress(FileNotFoundError):
        kernel = load(kernel_root, build.flavour)
        if _read(kernel.root / "build-key") == key:
            return kernel
    with _locked(kernel_root):
        with contextlib.suppress(FileNotFoundError):
            kernel = load(kernel_root, build.flavour)
            if _read(kernel.root / "build-key") == key:
                return kernel
        return _build_locked(kernel_root, version, key, log, build)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _build_key(source_version: str, build: Build) -> str:
    digest = hashlib.sha256()
    digest.update(f"recipe {_MICRO_RECIPE}\n{MICRO_SOURCE_PACKAGE} {source_version}\n".encode())
    for fragment in build.fragments:
        digest.update(fragment.read_bytes())
    return digest.hexdigest()[:12]


def _source_version() -> str:
    """The version of linux-source apt would download (the cache key depends on it)."""
    return _apt_cache(
        ["show", "--no-all-versions", MICRO_SOURCE_PACKAGE],
        r"^Version:\s*(\S+)",
        f"apt knows no package {MICRO_SOURCE_PACKAGE}",
    )


def _check_config(fragment: str, final: str, names: str = MICRO_CONFIG.name) -> None:
    """Fail loudly when Kconfig dropped or changed any option the fragment asks for."""
    built = fragment_options(final)
    wrong = [
        f"{name}: wanted {'n' if want is None else want}, got {built.get(name) or 'n'}"
        for name, want in fragment_options(fragment).items()
        if built.get(name) != want
    ]
    if wrong:
        raise RuntimeError(
            f"the kernel config lost options of {names} (a missing dependency?):\n  "
            + "\n  ".join(wrong)
        )


def _build_locked(kernel_root: Path, source_version: str, key: str, log: Path | None, build: Build) -> Kernel:
    missing = [tool for tool in _MICRO_TOOLS if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"building the micro kernel needs {', '.join(missing)}: run `make packages`")
    work = kernel_root / ".micro-build"
    work.mkdir(parents=True, exist_ok=True)
    src = _unpack_source(work, source_version)
    out = work / build.out
    out.mkdir(exist_ok=True)
    log = log or work / f"build-{build.flavour}.log"
    log.write_text("")  # the log of this build only
    make = ["make", "-C", str(src), f"O={out}"]

    # tinyconfig first, then the fragments on top; olddefconfig settles what depends on them.
    _logged([*make, "tinyconfig"], log)
    _logged([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(out), str(out / ".config"),
             *map(str, build.fragments)], log, cwd=src)  # fmt: skip
    _logged([str(src / "scripts/config"), "--file", str(out / ".config"),
             "--set-str", "LOCALVERSION", build.localversion, "--disable", "LOCALVERSION_AUTO"], log)  # fmt: skip
    _logged([*make, "olddefconfig"], log)
    fragments = "\n".join(f.read_text() for f in build.fragments)
    _check_config(fragments, (out / ".config").read_text(), " + ".join(f.name for f in build.fragments))

    _logged([*make, f"-j{os.cpu_count() or 1}", "vmlinux", "bzImage"], log)
    release = _run([*make, "-s", "kernelrelease"]).strip()
    version = f"{release}-{key[:8]}"

    with tempfile.TemporaryDirectory(prefix=f".{build.flavour}-", dir=kernel_root) as tmp_s:
        stage = Path(tmp_s) / version
        modules = stage / "lib" / "modules" / version
        modules.mkdir(parents=True)
        shutil.copyfile(out / "arch/x86/boot/bzImage", stage / "vmlinuz")
        # The same stripped ELF the cloud kernel's vmlinux is (symbols and debug info cut):
        # what the bzImage carries is what qemu loads through PVH.
        extract_vmlinux(stage / "vmlinuz", stage / "vmlinux")
        shutil.copyfile(out / ".config", stage / "config")
        # Kbuild lists the built-in drivers even without CONFIG_MODULES.
        shutil.copyfile(out / "modules.builtin", modules / "modules.builtin")
        # Nothing is loadable: module_closure finds every base module in modules.builtin.
        (modules / "modules.dep").write_text("")
        (stage / "build-key").write_text(key + "\n")
        _install(stage, kernel_root / version)
    _point(kernel_root, build.flavour, version)
    return load(kernel_root, build.flavour)


def _unpack_source(work: Path, source_version: str) -> Path:
    """The kernel source tree of ``source_version`` under ``work``, unpacked once."""
    src = work / MICRO_SOURCE_PACKAGE
    stamp = work / "source-version"
    if src.is_dir() and _read(stamp) == source_version:
        return src
    for stale in (src, *(work / b.out for b in BUILDS.values())):
        shutil.rmtree(stale, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".source-", dir=work) as tmp_s:
        tmp = Path(tmp_s)
        # apt-get download writes into the working directory; nothing lands in /usr/src.
        _run(["apt-get", "download", f"{MICRO_SOURCE_PACKAGE}={source_version}"], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {MICRO_SOURCE_PACKAGE} produced {debs}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "pkg")])
        tarballs = sorted((tmp / "pkg" / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise RuntimeError(f"expected one usr/src/linux-source-*.tar.* in {debs[0].name}, found {tarballs}")
        unpacked = tmp / "unpacked"
        unpacked.mkdir()
        _run(["tar", "-xf", str(tarballs[0]), "-C", str(unpacked)])
        trees = [p for p in unpacked.iterdir() if p.is_dir()]
        if len(trees) != 1:
            raise RuntimeError(f"{tarballs[0].name} does not hold one source tree: {trees}")
        os.rename(trees[0], src)
    stamp.write_text(source_version + "\n")
    return src


def _logged(cmd: list[str], log: Path, *, cwd: Path | None = None) -> None:
    """Run a build step with its output appended to ``log``; on failure show the log's tail."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        status = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status} (full log: {log}):\n{tail}")
