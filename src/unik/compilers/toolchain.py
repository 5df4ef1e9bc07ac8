"""What the language compilers share: daemon settings, manifest.yaml, placing programs in the image."""

from __future__ import annotations

import os
import shutil
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


def inside(project: Path, relative: str, what: str) -> Path:
    """A path the user named, which must stay inside the project and exist."""
    path = (project / relative).resolve()
    if not path.is_relative_to(project.resolve()) or not path.is_file():
        raise BadRequest(f"{what} {relative!r} is not a file in the project")
    return path


def install_program(binary: Path, root: Path, guest_path: str) -> dict[str, str]:
    """Put an ELF program in the image; a dynamic one brings its loader and libraries along."""
    target = root / guest_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, target)
    target.chmod(0o755)
    try:
        info = elf.read_elf(target)
    except ValueError as exc:
        raise BadRequest(f"{binary.name} is not an ELF program") from exc
    if info.is_static:
        return {}
    return elf.bundle_shared_libraries(root, [guest_path])


def copy_tree(src: Path, dst: Path, *, skip: set[str] | None = None) -> None:
    """The user's files as uploaded (symlinks kept as symlinks), minus the top-level names in `skip`."""
    skip = skip or set()
    dst.mkdir(parents=True, exist_ok=True)
    for child in sorted(src.iterdir()):
        if child.name in skip:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.copytree(child, dst / child.name, symlinks=True)
        else:
            shutil.copy2(child, dst / child.name, follow_symlinks=False)


def tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def boot_memory_mb(root: Path, runtime_mb: int) -> int:
    """Memory to boot an image carrying `root`: the initrd and its unpacked copy coexist while
    the kernel unpacks it, beside the kernel itself and its modules (~96 MB measured: a 92 MB
    node tree failed to unpack in 288 MB and booted in 320), then the runtime needs its heap.
    Rounded up to 32 MB."""
    need = 2 * tree_bytes(root) / (1 << 20) + 96 + runtime_mb
    return int(-(-need // 32) * 32)
