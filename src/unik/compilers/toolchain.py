"""What the language compilers share: daemon settings, manifest.yaml, placing programs in the image."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unik.compilers import elf
from unik.errors import BadRequest


def _default_python() -> str:
    # The daemon may itself run from a venv or pyenv python; the guest wants the distribution's.
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"


@dataclass(frozen=True)
class BuildSettings:
    """The daemon configuration the language compilers read."""

    # Whether builds may reach the network (go module downloads, pip's index, npm ci).
    network: bool = False
    # Toolchain caches kept between builds (Go's build cache, Cargo target dirs).
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "unik")
    python: str = field(default_factory=_default_python)
    node: str = "node"
    # None: the JDK that the `jlink` on PATH belongs to.
    java_home: Path | None = None


def which(program: str) -> Path | None:
    """`program` (a name on PATH or a path) resolved to the real file, or None."""
    found = shutil.which(program)
    return Path(os.path.realpath(found)) if found else None


def read_manifest(project: Path, allowed: set[str]) -> dict[str, Any]:
    """manifest.yaml at the top of the project (the original UniK's convention), or {}."""
    path = project / "manifest.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadRequest(f"manifest.yaml is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("manifest.yaml must be a mapping (e.g. `main_file: app.jar`)")
    unknown = set(data) - allowed
    if unknown:
        raise BadRequest(f"manifest.yaml: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return data


def manifest_str(manifest: dict[str, Any], key: str) -> str | None:
    value = manifest.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"manifest.yaml: {key} must be a non-empty string")
    return value.strip()


def manifest_list(manifest: dict[str, Any], key: str) -> list[str]:
    value = manifest.get(key) or []
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"manifest.yaml: {key} must be a list of strings")
    return list(value)


BUILD_COMMAND = "build_command"
BUILD_COMMAND_GUIDE = """\
  * Optional in manifest.yaml: `build_command: sh build.sh` (or `mvn package`, `make dist`,
    ...) runs first, with `sh -c` in the project folder, in the build sandbox: no network
    unless the daemon's config says `build_network: true`, nothing of the host's homes but
    the toolchains (HOME is an empty folder of the build), stopped at the build timeout.
    Whatever it leaves in the project is what the rest of the build sees. When it fails the
    build is a 400 carrying its output's last lines."""


def build_command(manifest: dict[str, Any]) -> str | None:
    """manifest.yaml's `build_command`: one shell command line, or None."""
    return manifest_str(manifest, BUILD_COMMAND)


async def run_build_command(
    command: str, project: Path, work: Path, *, timeout: float, env: dict[str, str] | None = None
) -> str:
    """Run the user's `build_command` in the project (sandboxed during builds); its output.

    HOME is a fresh folder of the build: the sandbox shows no real home, and tools that keep
    caches there (maven, gradle, npm, pip) must find it writable."""
    from unik.compilers.base import build_sandbox, run_tool  # base imports this module lazily too

    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    # Java tools take their home from the password database, not $HOME.
    java_home_opts = f"-Duser.home={home}"
    extra = {
        "HOME": str(home),
        "MAVEN_OPTS": java_home_opts,
        "GRADLE_USER_HOME": str(home / ".gradle"),
        **(env or {}),
    }
    try:
        return await run_tool(["sh", "-c", command], cwd=project, timeout=timeout, env=extra)
    except BadRequest as exc:
        sandbox = build_sandbox.get()
        offline = sandbox is not None and not sandbox.network
        note = (
            "\n(the build sandbox has no network: `build_network: true` in the daemon's config allows it)"
            if offline
            else ""
        )
        raise BadRequest(f"manifest.yaml build_command {command!r}: {exc.message}{note}") from None


def inside(project: Path, relative: str, what: str) -> Path:
    """A path the user named, which must stay inside the project and exist."""
    path = (project / relative).resolve()
    if not path.is_relative_to(project.resolve()) or not path.is_file():
        raise BadRequest(f"{what} {relative!r} is not a file in the project")
    return path


def install_program(binary: Path, root: Path, guest_path: str) -> dict[str, str]:
    """Put an ELF program in the image; a dynamic one brings its loader and libraries along."""
    # The program is the build's own output or a host interpreter already resolved to its real
    # file: a link there is the build pointing the daemon at some other file of the host.
    target = install_file(root, guest_path, binary, mode=0o755, follow_links=False)
    try:
        info = elf.read_elf(target)
    except ValueError as exc:
        raise BadRequest(f"{binary.name} is not an ELF program") from exc
    if info.elf_class != 64 or info.machine != "EM_X86_64":
        raise BadRequest(f"{binary.name} is not a 64-bit x86-64 ELF program")
    if info.is_static:
        return {}
    if info.interpreter is not None and "ld-musl" in info.interpreter:
        # musl's loader is its C library too: it alone serves a program needing only libc.so.
        # Its other libraries are not installed for builds, so nothing else could be packed.
        others = sorted(set(info.needed) - {"libc.so"})
        if others:
            raise BadRequest(
                f"{binary.name} is linked dynamically against {', '.join(others)} with musl; "
                "link it statically (-static)"
            )
        loader = Path(os.path.realpath(info.interpreter))
        install_file(root, info.interpreter, loader, mode=0o755, follow_links=True)
        return {}
    return elf.bundle_shared_libraries(root, [guest_path])


# -- the image tree ---------------------------------------------------------------------------
#
# Build steps run in the sandbox, which may write anywhere in the build's own folder; the daemon
# then assembles the image tree there as root and outside the sandbox. A link the build leaves
# where the tree goes, or in place of a folder on the way, would have the daemon write (or read)
# wherever it points on the host. So the tree is made only once no build step runs any more,
# and is written only through the functions below, which open every folder on the way relative
# to the one before without following links (O_NOFOLLOW) and create files exclusively.

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a FIFO the build left must fail the type check, not hang the daemon in open().
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def image_root(work: Path, project: Path) -> Path:
    """A new, empty `work`/root for the image, made after the build's last sandboxed step.

    `work` and `project` are checked to be real folders down from their common parent: the
    build service binds that one folder into the sandbox, so the build cannot swap it, but it can
    swap anything below it for a link."""
    work, project = work.absolute(), project.absolute()
    anchor = Path(os.path.commonpath([work, project]))
    for folder in (work, project):
        _require_real_folders(anchor, folder)
    root = work / "root"
    try:
        # mkdir() never follows a link in the last place: whatever the build left there fails it.
        root.mkdir()
    except FileExistsError:
        raise BadRequest(f"the build must not write outside its sources (it made {work.name}/{root.name})") from None
    return root


def _require_real_folders(anchor: Path, folder: Path, what: str = "") -> None:
    current = anchor
    for part in folder.relative_to(anchor).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            mode = 0
        if not stat.S_ISDIR(mode):
            made = "a link" if stat.S_ISLNK(mode) else "something else" if mode else "nothing"
            where = what or f"its folder {folder.relative_to(anchor)}"
            raise BadRequest(f"the build replaced {where}: {current.relative_to(anchor)} is {made}, not a folder")


def real_folder(root: Path, guest_dir: str) -> bool:
    """Whether the image has folder `guest_dir` (False: it has nothing there); a 400 when a link
    or a file stands on the way, so that walking it cannot lead out of the image."""
    folder = root / guest_dir.lstrip("/")
    if not os.path.lexists(folder):
        return False
    _require_real_folders(root, folder, what=f"{guest_dir} in the image")
    return True


def install_file(root: Path, guest_path: str, source: Path, *, mode: int, follow_links: bool) -> Path:
    """Copy `source` to `guest_path` in the image (which must not have it yet); the host path.

    follow_links: whether `source` may be a link (host libraries are, and the guest gets the
    file); a build's own output must not be one."""
    folder, name = posixpath.split(guest_path)
    try:
        src = os.open(source, _READ | (0 if follow_links else os.O_NOFOLLOW))
    except OSError as exc:
        raise BadRequest(f"cannot read {source}: {_reason(exc, source)}") from None
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise BadRequest(f"{source} is not a regular file")
        with _image_folder(root, folder) as dst_dir:
            _copy_file(src, name, dst_dir, mode, guest_path)
    finally:
        os.close(src)
    return root / guest_path.lstrip("/")


def copy_tree(
    src: Path, root: Path, guest_dir: str, *, skip: set[str] | None = None, follow_links: bool = False
) -> None:
    """The files under `src` into folder `guest_dir` of the image, minus the top-level names in
    `skip`. Links are kept as links (the user's own, as uploaded: the guest resolves them), or
    with follow_links copied as what they point to, but only if that is in `src` too or any
    user of the host may read it (the guest gets real files; the tree may be a shared cache)."""
    try:
        # Never a link itself, even with follow_links: everything it points to would be "in the tree".
        src_fd = os.open(src, _DIR | os.O_NOFOLLOW)
    except OSError as exc:
        raise BadRequest(f"cannot copy {src}: {_reason(exc, src)}") from None
    try:
        tree = os.readlink(f"/proc/self/fd/{src_fd}")
        with _image_folder(root, guest_dir) as dst_fd:
            _copy_folder(src_fd, dst_fd, guest_dir.rstrip("/"), skip or set(), follow_links, tree, set())
    finally:
        os.close(src_fd)


@contextlib.contextmanager
def _image_folder(root: Path, guest_dir: str) -> Iterator[int]:
    """A descriptor of folder `guest_dir` of the image, made where missing, never through a link."""
    parts = [part for part in guest_dir.split("/") if part]
    if not guest_dir.startswith("/") or any(part in (".", "..") for part in parts):
        raise BadRequest(f"{guest_dir!r} is not an absolute path without . or .. in the image")
    try:
        fd = os.open(root, _DIR | os.O_NOFOLLOW)
    except OSError as exc:
        raise BadRequest(f"the image folder {root.name}: {_reason(exc, root)}") from None
    try:
        for depth, part in enumerate(parts):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                where = "/" + "/".join(parts[: depth + 1])
                raise BadRequest(f"{where} in the image is a link or a file: nothing is written through it") from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _copy_file(
    src: int, name: str, dst_dir: int, mode: int, guest_path: str, times_ns: tuple[int, int] | None = None
) -> None:
    """The open file `src` as a new file `name` in the open image folder `dst_dir`."""
    try:
        dst = os.open(name, _CREATE, 0o600, dir_fd=dst_dir)
    except FileExistsError:
        raise BadRequest(f"{guest_path} is already in the image (as a file, folder or link)") from None
    with open(src, "rb", closefd=False) as reader, open(dst, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)
        writer.flush()
        # Exact, whatever the daemon's umask: the initrd records these modes.
        os.fchmod(dst, stat.S_IMODE(mode))
        if times_ns is not None:
            os.utime(dst, ns=times_ns)


def _copy_folder(
    src_dir: int, dst_dir: int, where: str, skip: set[str], follow: bool, tree: str, seen: set[tuple[int, int]]
) -> None:
    """Copy the entries of one open folder into another; `seen`: the folders being copied (a
    followed link to one of them would never end)."""
    here = os.fstat(src_dir)
    if (here.st_dev, here.st_ino) in seen:
        raise BadRequest(f"{where} is a link to a folder that contains it")
    seen = seen | {(here.st_dev, here.st_ino)}
    with os.scandir(src_dir) as entries:
        names = sorted(entry.name for entry in entries if entry.name not in skip)
    for name in names:
        guest = f"{where}/{name}"
        st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
        is_link = stat.S_ISLNK(st.st_mode)
        if is_link and not follow:
            try:
                os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)
            except FileExistsError:
                raise BadRequest(f"{guest} is already in the image") from None
            continue
        if not (is_link or stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise BadRequest(f"{guest}: only files, folders and links can go in an image")
        # Opened first and judged by what was opened: a swap after the stat() changes nothing.
        try:
            fd = os.open(name, _READ | (0 if is_link else os.O_NOFOLLOW), dir_fd=src_dir)
        except OSError as exc:
            raise BadRequest(f"cannot copy {guest} into the image: {os.strerror(exc.errno or 0)}") from None
        try:
            opened = os.fstat(fd)
            if is_link and not _may_follow(fd, opened, tree):
                target = os.readlink(name, dir_fd=src_dir)
                raise BadRequest(f"{guest} links to {target!r}, which is not for the image")
            if stat.S_ISDIR(opened.st_mode):
                try:
                    os.mkdir(name, 0o700, dir_fd=dst_dir)
                except FileExistsError:
                    raise BadRequest(f"{guest} is already in the image") from None
                child = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=dst_dir)
                try:
                    _copy_folder(fd, child, guest, set(), follow, tree, seen)
                    os.fchmod(child, stat.S_IMODE(opened.st_mode))
                finally:
                    os.close(child)
            elif stat.S_ISREG(opened.st_mode):
                # Mode and times kept, as shutil.copy2 did.
                _copy_file(fd, name, dst_dir, opened.st_mode, guest, (opened.st_atime_ns, opened.st_mtime_ns))
            else:
                raise BadRequest(f"{guest}: only files, folders and links can go in an image")
        finally:
            os.close(fd)


def _may_follow(fd: int, opened: os.stat_result, tree: str) -> bool:
    """Whether a followed link may bring what it opened into an image: anything of the tree
    being copied, or a file any user of the host can read anyway (the JDK's cacerts). Not a
    folder outside the tree: it may hold files that are not for everyone's eyes."""
    real = os.readlink(f"/proc/self/fd/{fd}")
    if real == tree or real.startswith(tree.rstrip("/") + "/"):
        return True
    if not stat.S_ISREG(opened.st_mode) or not opened.st_mode & stat.S_IROTH:
        return False
    folder = os.path.dirname(real)
    while True:
        try:
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        if folder == "/":
            return True
        folder = os.path.dirname(folder)


def _reason(exc: OSError, path: Path) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
        return "the build made it a link"
    return os.strerror(exc.errno or 0)


def tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def boot_memory_mb(root: Path, runtime_mb: int) -> int:
    """Memory to boot an image carrying `root`: the initrd and its unpacked copy coexist while
    the kernel unpacks it, beside the kernel itself and its modules (~96 MB measured: a 92 MB
    node tree failed to unpack in 288 MB and booted in 320), then the runtime needs its heap.
    Rounded up to 32 MB."""
    need = 2 * tree_bytes(root) / (1 << 20) + 96 + runtime_mb
    return int(-(-need // 32) * 32)
