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

The "micro" kernel (``build_micro``) is built by the project from Debian's ``linux-source``
package with ``guest/unik-micro.config`` on top of ``make tinyconfig``: everything built in, no
modules. It sits beside the cloud kernel in the same root::

    micro -> VERSION                   symlink, like current
    VERSION/{vmlinuz,vmlinux,config}   as above; VERSION is <release>-<build key>
    VERSION/build-key                  hash of the source package version and the fragment
    VERSION/lib/modules/VERSION/       modules.builtin (every driver) and an empty modules.dep
    .micro-build/                      the unpacked source and the object tree, kept so that a
                                       changed fragment rebuilds only what it changes
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
from functools import cache, cached_property
from pathlib import Path

META_PACKAGE = "linux-image-cloud-amd64"
CURRENT = "current"

MICRO = "micro"
MICRO_SOURCE_PACKAGE = "linux-source-6.1"
MICRO_CONFIG = Path(__file__).resolve().parent / "guest" / "unik-micro.config"
MICRO_LOCALVERSION = "-unik-micro"
# Part of the build key: bump it when build_micro changes what it produces from the same inputs.
_MICRO_RECIPE = "1"
# The name in a provider config (QemuProviderConfig.kernel) -> the symlink in the kernel root.
FLAVOURS: dict[str, str] = {"cloud": CURRENT, "micro": MICRO}
_SETUP_HINT = {
    CURRENT: "run `make setup` (or `python -m unik.kernel fetch {root}`)",
    MICRO: "run `make kernel-micro` (or `python -m unik.kernel build-micro {root}`)",
}
# Host tools the kernel build runs (bc, bison, flex, libelf-dev's headers, xz for the tarball).
_MICRO_TOOLS = ("make", "gcc", "bc", "bison", "flex", "xz", "perl", "apt-get", "dpkg-deb")

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
    # ttyS0 is the console, ttyS1 the control channel to the guest init.
    "8250.nr_uarts=2",
    # Legacy PCI interrupt routing through ACPI interprets AML for each interrupt link:
    # ~85 ms per virtio device under TCG. The devices use MSI-X, and the PIR table covers
    # the rest.
    "acpi=noirq",
    # No PS/2 mouse probe; the keyboard port stays, it carries ctrl-alt-del (graceful stop).
    "i8042.noaux",
    # The boot-time check that the timer interrupt arrives through the IO-APIC within a busy
    # wait: a vCPU starved by a loaded host fails it and panics ("IO-APIC + timer doesn't
    # work!", seen with 40 VMs booting on 2 cores); KVM guests skip it the same way. ~15 ms.
    "no_timer_check",
    # The CRNG is seeded from RDRAND (the VM's CPU has it, see providers/qemu.py) at boot.
    # Without it the first read of /dev/urandom or getrandom() runs the kernel's jitter
    # entropy collection, ~1 s under TCG: CPython's hash seed and Node.js's start-up both wait
    # on it. Debian's kernel trusts the CPU by default; the micro kernel (tinyconfig) does not.
    "random.trust_cpu=on",
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

    def builds_in(self, option: str) -> bool:
        """Whether this kernel's .config has `option` built in (`=y`; a module is not)."""
        return _config_options(self.root / "config").get(option) == "y"

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


def load(kernel_root: Path, flavour: str = "cloud") -> Kernel:
    """The kernel of ``flavour`` ("cloud": ``kernel_root/current``, "micro": ``kernel_root/micro``)."""
    link_name = FLAVOURS[flavour]
    hint = _SETUP_HINT[link_name].format(root=kernel_root)
    link = kernel_root / link_name
    if not link.is_symlink() and not link.exists():
        raise FileNotFoundError(f"no {flavour} guest kernel in {kernel_root}: {hint}")
    target = link.resolve()
    kernel = Kernel(version=target.name, root=target)
    if not kernel.is_complete():
        raise FileNotFoundError(f"{flavour} guest kernel in {target} is incomplete: {hint}")
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
    return _apt_cache(
        ["depends", META_PACKAGE],
        r"Depends:\s*(linux-image-\d[^\s<>|]*)",
        f"cannot resolve the kernel package behind {META_PACKAGE}",
    )


def _apt_cache(query: list[str], pattern: str, missing: str) -> str:
    """Group 1 of the first match of `pattern` in what `apt-cache QUERY` prints; asked once more
    after `apt-get update` when absent (fresh machines often have empty package lists)."""

    def lookup() -> str | None:
        try:
            out = _run(["apt-cache", *query])
        except RuntimeError:
            return None
        m = re.search(pattern, out, re.MULTILINE)
        return m.group(1) if m else None

    found = lookup()
    if found is None:
        _run(["apt-get", "update"])
        found = lookup()
    if found is None:
        raise RuntimeError(missing)
    return found


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


def build_micro(kernel_root: Path, *, log: Path | None = None) -> Kernel:
    """Build (once) the micro kernel under ``kernel_root`` and return it (idempotent).

    The result is cached by a key over the source package version, the config fragment and the
    recipe: the same inputs return the kernel already there, in milliseconds.
    """
    kernel_root = Path(kernel_root)
    version = _source_version()
    key = _micro_key(version)
    with contextlib.suppress(FileNotFoundError):
        kernel = load(kernel_root, "micro")
        if _read(kernel.root / "build-key") == key:
            return kernel
    with _locked(kernel_root):
        with contextlib.suppress(FileNotFoundError):
            kernel = load(kernel_root, "micro")
            if _read(kernel.root / "build-key") == key:
                return kernel
        return _build_micro_locked(kernel_root, version, key, log)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _micro_key(source_version: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"recipe {_MICRO_RECIPE}\n{MICRO_SOURCE_PACKAGE} {source_version}\n".encode())
    digest.update(MICRO_CONFIG.read_bytes())
    return digest.hexdigest()[:12]


def _source_version() -> str:
    """The version of linux-source apt would download (the cache key depends on it)."""
    return _apt_cache(
        ["show", "--no-all-versions", MICRO_SOURCE_PACKAGE],
        r"^Version:\s*(\S+)",
        f"apt knows no package {MICRO_SOURCE_PACKAGE}",
    )


def fragment_options(text: str) -> dict[str, str | None]:
    """CONFIG_X -> its value in a config file (None for `# CONFIG_X is not set`)."""
    options: dict[str, str | None] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            options[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            options[m.group(1)] = None
    return options


@cache
def _config_options(config: Path) -> dict[str, str | None]:
    """A kernel's .config, read once: a kernel's folder is named by its version and never changes."""
    try:
        return fragment_options(config.read_text())
    except FileNotFoundError:
        return {}


def _check_config(fragment: str, final: str) -> None:
    """Fail loudly when Kconfig dropped or changed any option the fragment asks for."""
    built = fragment_options(final)
    wrong = [
        f"{name}: wanted {'n' if want is None else want}, got {built.get(name) or 'n'}"
        for name, want in fragment_options(fragment).items()
        if built.get(name) != want
    ]
    if wrong:
        raise RuntimeError(
            f"the micro kernel config lost options of {MICRO_CONFIG.name} (a missing dependency?):\n  "
            + "\n  ".join(wrong)
        )


def _build_micro_locked(kernel_root: Path, source_version: str, key: str, log: Path | None) -> Kernel:
    missing = [tool for tool in _MICRO_TOOLS if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"building the micro kernel needs {', '.join(missing)}: run `make packages`")
    work = kernel_root / ".micro-build"
    work.mkdir(parents=True, exist_ok=True)
    src = _unpack_source(work, source_version)
    out = work / "out"
    out.mkdir(exist_ok=True)
    log = log or work / "build.log"
    log.write_text("")  # the log of this build only
    make = ["make", "-C", str(src), f"O={out}"]

    # tinyconfig first, then the fragment on top; olddefconfig settles what depends on both.
    _logged([*make, "tinyconfig"], log)
    _logged([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(out), str(out / ".config"),
             str(MICRO_CONFIG)], log, cwd=src)  # fmt: skip
    _logged([str(src / "scripts/config"), "--file", str(out / ".config"),
             "--set-str", "LOCALVERSION", MICRO_LOCALVERSION, "--disable", "LOCALVERSION_AUTO"], log)  # fmt: skip
    _logged([*make, "olddefconfig"], log)
    fragment = MICRO_CONFIG.read_text()
    _check_config(fragment, (out / ".config").read_text())

    _logged([*make, f"-j{os.cpu_count() or 1}", "vmlinux", "bzImage"], log)
    release = _run([*make, "-s", "kernelrelease"]).strip()
    version = f"{release}-{key[:8]}"

    with tempfile.TemporaryDirectory(prefix=".micro-", dir=kernel_root) as tmp_s:
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
    _point(kernel_root, MICRO, version)
    return load(kernel_root, "micro")


def _install(stage: Path, final: Path) -> None:
    if final.exists():
        # A leftover from an interrupted fetch or build that never became current.
        shutil.rmtree(final)
    os.rename(stage, final)


def _point(kernel_root: Path, link: str, version: str) -> None:
    """Switch the symlink atomically: a daemon reading it sees the old kernel or the new one."""
    link_tmp = kernel_root / f".{link}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        link_tmp.unlink()
    os.symlink(version, link_tmp)
    os.replace(link_tmp, kernel_root / link)


def _unpack_source(work: Path, source_version: str) -> Path:
    """The kernel source tree of ``source_version`` under ``work``, unpacked once."""
    src = work / MICRO_SOURCE_PACKAGE
    stamp = work / "source-version"
    if src.is_dir() and _read(stamp) == source_version:
        return src
    for stale in (src, work / "out"):
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
    if not args or args[0] not in ("fetch", "build-micro") or len(args) > 2:
        print("usage: python -m unik.kernel {fetch|build-micro} [DIR]", file=sys.stderr)
        return 2
    root = Path(args[1]) if len(args) == 2 else default_kernel_root()
    try:
        kernel = fetch(root) if args[0] == "fetch" else build_micro(root)
    except (RuntimeError, ValueError) as e:
        print(f"unik.kernel: {e}", file=sys.stderr)
        return 1
    print(f"{kernel.version} {kernel.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
