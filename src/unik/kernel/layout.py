"""The kernel root's layout, the Kernel found in it (load) and the atomic installs that fill it.

Layout under a kernel root (``default_kernel_root()``)::

    current -> VERSION                 symlink, switched atomically once VERSION is complete
    VERSION/vmlinuz                    the bzImage as shipped
    VERSION/vmlinux                    the uncompressed ELF, booted through PVH (no in-guest
                                       decompression: much faster under TCG)
    VERSION/config                     the kernel's build configuration
    VERSION/lib/modules/VERSION/...    modules, with modules.dep built by depmod

The micro kernel sits beside the cloud kernel in the same root::

    micro -> VERSION                   symlink, like current
    VERSION/{vmlinuz,vmlinux,config}   as above; VERSION is <release>-<build key>
    VERSION/build-key                  hash of the source package version and the fragment
    VERSION/lib/modules/VERSION/       modules.builtin (every driver) and an empty modules.dep
    disk -> VERSION                    the same for the disk kernel (micro + unik-disk.config)
    .micro-build/                      the unpacked source and one object tree per build (out/,
                                       out-disk/), kept so that a changed fragment rebuilds only
                                       what it changes
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

CURRENT = "current"
MICRO = "micro"
DISK = "disk"
# The name in a provider config (QemuProviderConfig.kernel) -> the symlink in the kernel root.
FLAVOURS: dict[str, str] = {"cloud": CURRENT, "micro": MICRO, "disk": DISK}
_SETUP_HINT = {
    CURRENT: "run `make setup` (or `python -m unik.kernel fetch {root}`)",
    MICRO: "run `make kernel-micro` (or `python -m unik.kernel build-micro {root}`)",
    DISK: "run `make kernel-disk` (or `python -m unik.kernel build-disk {root}`)",
}

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
