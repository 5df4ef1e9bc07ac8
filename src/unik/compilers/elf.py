"""Shared libraries a dynamically linked program needs, found by reading its ELF headers.

The guest has no package manager and no ld.so.cache: whatever the dynamic loader will open
must be copied into the image. We read PT_INTERP and every DT_NEEDED (recursively) and resolve
each name the way glibc's loader does: DT_RPATH (only without DT_RUNPATH), DT_RUNPATH, the
host's ld.so.conf directories (which stand in for its cache), then the built-in default
directories. Files are copied into the image at the path where they were found, so the
guest loader finds them at the same place; directories it would not search on its own (those
that only ld.so.conf names) are returned for LD_LIBRARY_PATH.

Paths here are guest paths ("/usr/lib/x.so"); an object is looked up in the image being
built first (so $ORIGIN-relative libraries shipped with a runtime resolve inside it), then
on the host.
"""

from __future__ import annotations

import glob
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from unik.errors import BadRequest

# The loader's built-in search list for x86_64 Debian (multiarch first), used when neither
# the object's run paths nor ld.so.conf name the library's directory.
MULTIARCH = "x86_64-linux-gnu"
DEFAULT_DIRS = (f"/lib/{MULTIARCH}", f"/usr/lib/{MULTIARCH}", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
# What Debian's loader searches by itself (its "system directories"); /lib64 is not among them.
LOADER_DIRS = (f"/lib/{MULTIARCH}", f"/usr/lib/{MULTIARCH}", "/lib", "/usr/lib")


@dataclass(frozen=True)
class ElfInfo:
    """The parts of an ELF file that decide which other files the loader opens."""

    elf_class: int
    machine: str
    interpreter: str | None
    soname: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]

    @property
    def is_static(self) -> bool:
        return self.interpreter is None and not self.needed


@dataclass
class Dependencies:
    """What to add to an image: guest path → host file, and extra loader directories."""

    files: dict[str, Path] = field(default_factory=dict)
    # Directories holding copied libraries that the guest loader searches only if told to.
    library_dirs: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"LD_LIBRARY_PATH": ":".join(self.library_dirs)} if self.library_dirs else {}


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def read_elf(path: Path) -> ElfInfo:
    """Parse `path`'s program interpreter and dynamic section; ValueError if it is not ELF."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            interpreter = None
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_INTERP":
                    interpreter = segment.get_interp_name()
            needed: list[str] = []
            rpath: list[str] = []
            runpath: list[str] = []
            soname = None
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    kind = tag.entry.d_tag
                    if kind == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif kind == "DT_RPATH":
                        rpath.extend(p for p in tag.rpath.split(":") if p)
                    elif kind == "DT_RUNPATH":
                        runpath.extend(p for p in tag.runpath.split(":") if p)
                    elif kind == "DT_SONAME":
                        soname = tag.soname
            return ElfInfo(
                elf_class=elf.elfclass,
                machine=elf["e_machine"],
                interpreter=interpreter,
                soname=soname,
                needed=tuple(needed),
                rpath=tuple(rpath),
                runpath=tuple(runpath),
            )
    except (ELFError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable ELF file ({exc})") from exc


def ld_so_conf_dirs(conf: Path = Path("/etc/ld.so.conf")) -> list[str]:
    """The directories named by ld.so.conf and its `include`s, in order, without duplicates."""
    seen: list[str] = []

    def parse(path: Path, depth: int) -> None:
        if depth > 8:  # an include cycle would otherwise never end
            return
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for raw in lines:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("include "):
                pattern = line[len("include ") :].strip()
                if not pattern.startswith("/"):
                    pattern = str(path.parent / pattern)
                for included in sorted(glob.glob(pattern)):
                    parse(Path(included), depth + 1)
            elif line.startswith("/"):
                directory = line.rstrip("/") or "/"
                if directory not in seen:
                    seen.append(directory)

    parse(conf, 0)
    return seen


class Resolver:
    """Resolves the closure of a set of objects against an image root and the host."""

    def __init__(self, root: Path, *, host_root: Path = Path("/"), conf_dirs: list[str] | None = None) -> None:
        self.root = root
        self.host_root = host_root
        self.conf_dirs = ld_so_conf_dirs(host_root / "etc/ld.so.conf") if conf_dirs is None else conf_dirs

    def _locate(self, guest: str) -> tuple[Path, bool] | None:
        """The file for a guest path: in the image (True) or on the host (False)."""
        rel = guest.lstrip("/")
        inside = self.root / rel
        if inside.is_file():
            return inside, True
        outside = self.host_root / rel
        if outside.is_file():
            return outside, False
        return None

    def _expand(self, entry: str, origin: str) -> str:
        for token in ("${ORIGIN}", "$ORIGIN"):
            entry = entry.replace(token, origin)
        for token in ("${LIB}", "$LIB"):
            entry = entry.replace(token, f"lib/{MULTIARCH}")
        for token in ("${PLATFORM}", "$PLATFORM"):
            entry = entry.replace(token, "x86_64")
        # Anchored at / (the guest's working directory, where a relative name starts): a
        # `../../etc/x` in a user's ELF must not name a place above the image's root.
        return posixpath.normpath("/" + entry.lstrip("/"))

    def _find(self, name: str, needer: str, info: ElfInfo) -> tuple[str, str] | None:
        """(guest path, how it was found: 'path', 'conf' or 'default')."""
        origin = str(PurePosixPath(needer).parent)
        if "/" in name:
            path = self._expand(name, origin)
            return (path, "path") if self._locate(path) else None
        run_dirs = [self._expand(d, origin) for d in (info.runpath or info.rpath)]
        for how, dirs in (("path", run_dirs), ("conf", self.conf_dirs), ("default", list(DEFAULT_DIRS))):
            for directory in dirs:
                candidate = str(PurePosixPath(directory) / name)
                found = self._locate(candidate)
                if found and self._compatible(found[0], info):
                    return candidate, how
        return None

    @staticmethod
    def _compatible(path: Path, wanted: ElfInfo) -> bool:
        # Skips 32-bit or foreign-architecture copies that share a directory list (lib32, i386).
        try:
            got = read_elf(path)
        except ValueError:
            return False
        return got.elf_class == wanted.elf_class and got.machine == wanted.machine

    def resolve(self, objects: Iterable[str]) -> Dependencies:
        """Everything `objects` (guest paths, already in the image) load, recursively."""
        deps = Dependencies()
        queue = list(objects)
        done: set[str] = set()
        # Names the loader will not open twice (their DT_SONAME or an earlier DT_NEEDED).
        loaded_names: set[str] = set()
        interpreter_paths: set[str] = set()
        interpreter_hosts: set[str] = set()
        # The objects given are all loaded (programs, or plugins dlopen()ed by path, like libjvm.so
        # by the java launcher), so a DT_NEEDED naming one of them is already satisfied.
        for guest in queue:
            located = self._locate(guest)
            if located is not None:
                soname = read_elf(located[0]).soname
                if soname:
                    loaded_names.add(soname)
        while queue:
            guest = queue.pop(0)
            if guest in done:
                continue
            done.add(guest)
            located = self._locate(guest)
            if located is None:
                raise BadRequest(f"{guest}: file not found")
            host_file, in_image = located
            if not in_image:
                deps.files[guest] = host_file
            try:
                info = read_elf(host_file)
            except ValueError as exc:
                raise BadRequest(f"{guest}: {exc}") from None
            if info.soname:
                loaded_names.add(info.soname)
            if info.interpreter and info.interpreter not in done:
                interp = self._locate(info.interpreter)
                if interp is None:
                    raise BadRequest(f"{guest} needs the program interpreter {info.interpreter}, not found on the host")
                interpreter_paths.add(info.interpreter)
                interpreter_hosts.add(os.path.realpath(interp[0]))
                queue.append(info.interpreter)
            for name in info.needed:
                if name in loaded_names and "/" not in name:
                    continue
                found = self._find(name, guest, info)
                if found is None:
                    raise BadRequest(
                        f"{guest} needs the shared library {name}, which is neither in the image nor on the host's "
                        f"library path (ld.so.conf, {', '.join(DEFAULT_DIRS)})"
                    )
                path, how = found
                loaded_names.add(name)
                directory = str(PurePosixPath(path).parent)
                if how != "path" and directory not in LOADER_DIRS and directory not in deps.library_dirs:
                    deps.library_dirs.append(directory)
                queue.append(path)
        # A library naming the loader in DT_NEEDED (libc, libjvm) resolves it to a second path;
        # the guest loader is already running under its PT_INTERP path, so one copy is enough.
        for guest_path, host in list(deps.files.items()):
            if guest_path not in interpreter_paths and os.path.realpath(host) in interpreter_hosts:
                del deps.files[guest_path]
        return deps


def install(root: Path, deps: Dependencies) -> None:
    """Copy the resolved host files into the image (symlinks followed: the guest gets files)."""
    from unik.compilers.toolchain import install_file  # toolchain imports this module

    for guest, host in sorted(deps.files.items()):
        # Never through a link in the image: the user's app may hold some of its own.
        install_file(root, guest, host, mode=0o755, follow_links=True)


def bundle_shared_libraries(root: Path, objects: Iterable[str]) -> dict[str, str]:
    """Resolve and copy what `objects` need; the environment the guest loader then needs."""
    deps = Resolver(root).resolve(objects)
    install(root, deps)
    return deps.env()


def elf_files(root: Path, under: Path | None = None) -> list[str]:
    """Guest paths of every ELF file in the image (or below `under`), symlinks skipped."""
    base = under or root
    found = []
    for path in sorted(base.rglob("*")):
        if path.is_file() and not path.is_symlink() and is_elf(path):
            found.append("/" + path.relative_to(root).as_posix())
    return found
