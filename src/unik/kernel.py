"""The guest kernel: Debian's cloud kernel, fetched once into a cache folder.

Layout under a kernel root (``default_kernel_root()``)::

    current -> VERSION                 symlink, switched atomically once VERSION is complete
    VERSION/vmlinuz                    the bzImage as shipped
    VERSION/vmlinux                    the uncompressed ELF, booted through PVH (no in-guest
                                       decompression: much faster under TCG)
    VERSION/config                     the kernel's build configuration
    VERSION/lib/modules/VERSION/...    modules, with modules.dep built by depmod

Nothing is installed on the host: the package is downloaded with ``apt-get download`` and
unpacked with ``dpkg-deb -x``; /boot is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

META_PACKAGE = "linux-image-cloud-amd64"
CURRENT = "current"

# Kernel command line for a unik guest on -M pc under TCG (measured, launch -> first app line:
# 1.72 s with only the first line, 1.48 s with all of it; vmlinuz instead of vmlinux adds ~0.3 s).
BOOT_ARGS: tuple[str, ...] = (
    "console=ttyS0",
    # Only errors reach the console: the app's output stays clean.
    "quiet",
    "loglevel=3",
    # A panic ends the VM at once (qemu runs with -no-reboot) instead of hanging on a deadline.
    "panic=-1",
    # One app is the only tenant of the guest kernel; the host is protected by the hypervisor,
    # and the mitigations' boot-time patching is slow under TCG.
    "mitigations=off",
    # AppArmor, Yama, landlock, ... have no policy to enforce here: ~0.2 s saved.
    "lsm=capability",
    "cryptomgr.notests",
    "8250.nr_uarts=1",
    # No PS/2 mouse probe; the keyboard port stays, it carries ctrl-alt-del (graceful stop).
    "i8042.noaux",
)

_ELF_MAGIC = b"\x7fELF"
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def default_kernel_root() -> Path:
    env = os.environ.get("UNIK_KERNEL_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "unik" / "kernel"


def _module_name(path_or_name: str) -> str:
    """Canonical module name: basename without suffix, '-' folded to '_' (as the kernel does)."""
    base = path_or_name.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True)
class Kernel:
    version: str
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    def is_complete(self) -> bool:
        return self.vmlinux.is_file() and self.bzimage.is_file() and (self.modules_dir / "modules.dep").is_file()

    # cached_property needs a __dict__, which a frozen dataclass still has.
    @cached_property
    def _deps(self) -> dict[str, tuple[str, list[str]]]:
        """name -> (relative .ko path, dependency paths as listed in modules.dep)."""
        table: dict[str, tuple[str, list[str]]] = {}
        with open(self.modules_dir / "modules.dep", encoding="utf-8") as f:
            for line in f:
                if ":" not in line:
                    continue
                module, _, rest = line.partition(":")
                module = module.strip()
                table[_module_name(module)] = (module, rest.split())
        return table

    @cached_property
    def _builtin(self) -> frozenset[str]:
        path = self.modules_dir / "modules.builtin"
        if not path.is_file():
            return frozenset()
        with open(path, encoding="utf-8") as f:
            return frozenset(_module_name(line.strip()) for line in f if line.strip())

    def module_closure(self, names: list[str]) -> list[Path]:
        """The .ko files to load for ``names``, dependencies first, each once.

        modules.dep already lists the whole transitive closure of each module, ordered so that
        loading it back to front is valid (that is what modprobe does), so no graph walk is
        needed; concatenating such orders and keeping first occurrences stays valid.
        """
        ordered: list[str] = []
        seen: set[str] = set()
        for raw in names:
            name = _module_name(raw)
            if name in self._deps:
                module, deps = self._deps[name]
                for rel in [*reversed(deps), module]:
                    if rel not in seen:
                        seen.add(rel)
                        ordered.append(rel)
            elif name in self._builtin:
                continue
            else:
                raise ValueError(f"unknown kernel module {raw!r} (kernel {self.version})")
        return [self.modules_dir / rel for rel in ordered]


def load(kernel_root: Path) -> Kernel:
    """The kernel ``kernel_root/current`` points at."""
    current = kernel_root / CURRENT
    if not current.is_symlink() and not current.exists():
        raise FileNotFoundError(
            f"no guest kernel in {kernel_root}: run `make setup` (or `python -m unik.kernel fetch {kernel_root}`)"
        )
    target = current.resolve()
    kernel = Kernel(version=target.name, root=target)
    if not kernel.is_complete():
        raise FileNotFoundError(
            f"guest kernel in {target} is incomplete: run `make setup` (or `python -m unik.kernel fetch {kernel_root}`)"
        )
    return kernel


@contextlib.contextmanager
def _locked(kernel_root: Path) -> Iterator[None]:
    # Two daemons (or a test and `make setup`) fetching at once must not interleave.
    kernel_root.mkdir(parents=True, exist_ok=True)
    with open(kernel_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch(kernel_root: Path) -> Kernel:
    """Make sure a complete kernel is under ``kernel_root`` and return it (idempotent)."""
    kernel_root = Path(kernel_root)
    with contextlib.suppress(FileNotFoundError):
        return load(kernel_root)
    with _locked(kernel_root):
        with contextlib.suppress(FileNotFoundError):
            return load(kernel_root)
        return _fetch_locked(kernel_root)


def _run(cmd: list[str], *, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{proc.stderr.strip()}")
    return proc.stdout


def _resolve_package() -> str:
    """The versioned image package the metapackage depends on, e.g. linux-image-6.1.0-56-cloud-amd64."""
    pattern = re.compile(r"Depends:\s*(linux-image-\d[^\s<>|]*)")

    def lookup() -> str | None:
        try:
            out = _run(["apt-cache", "depends", META_PACKAGE])
        except RuntimeError:
            return None
        for line in out.splitlines():
            m = pattern.search(line)
            if m:
                return m.group(1)
        return None

    package = lookup()
    if package is None:
        # Fresh containers often have empty package lists; refresh only when needed.
        _run(["apt-get", "update"])
        package = lookup()
    if package is None:
        raise RuntimeError(f"cannot resolve the kernel package behind {META_PACKAGE}")
    return package


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

        final = kernel_root / version
        if final.exists():
            # A leftover from an interrupted fetch that never became current.
            shutil.rmtree(final)
        os.rename(stage, final)

    link_tmp = kernel_root / f".{CURRENT}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        link_tmp.unlink()
    os.symlink(version, link_tmp)
    os.replace(link_tmp, kernel_root / CURRENT)
    return load(kernel_root)


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the uncompressed ELF kernel embedded in a bzImage to ``out`` (atomically)."""
    data = bzimage.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise ValueError(f"{bzimage} is not a bzImage (no HdrS setup header)")
    setup_sects = data[0x1F1] or 4  # 0 means 4, for ancient boot protocol compatibility
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = pm_start + payload_offset
    payload = data[start : start + payload_length]
    if len(payload) != payload_length:
        raise ValueError(f"{bzimage}: payload runs past the end of the file")

    elf = _decompress(payload)
    if not elf.startswith(_ELF_MAGIC):
        raise ValueError(f"{bzimage}: decompressed payload is not an ELF file")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)


def _decompress(payload: bytes) -> bytes:
    # The kernel build appends the uncompressed size (4 bytes, little endian) after the stream
    # (size_append in scripts/Makefile.lib); the stdlib decompressors stop at the stream's end,
    # the command-line tools would choke on it, so it is cut off for them.
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return _tool(["zstd", "-d", "-c", "-q"], payload[:-4])
    if payload.startswith(b"\x02\x21\x4c\x18"):
        return _tool(["lz4", "-d", "-c", "-q"], payload[:-4])
    raise ValueError(f"unknown kernel compression (magic {payload[:6].hex()})")


def _tool(cmd: list[str], payload: bytes) -> bytes:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"the kernel is compressed with {cmd[0]}; install the {cmd[0]} tool")
    proc = subprocess.run(cmd, input=payload, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "fetch" or len(args) > 2:
        print("usage: python -m unik.kernel fetch [DIR]", file=sys.stderr)
        return 2
    root = Path(args[1]) if len(args) == 2 else default_kernel_root()
    try:
        kernel = fetch(root)
    except (RuntimeError, ValueError) as e:
        print(f"unik.kernel: {e}", file=sys.stderr)
        return 1
    print(f"{kernel.version} {kernel.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
