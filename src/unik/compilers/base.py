"""The Compiler interface: sources in a folder → an app tree for the guest's root filesystem."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from unik.errors import BadRequest

if TYPE_CHECKING:
    from unik.compilers.toolchain import BuildSettings


@dataclass
class AppBundle:
    """What a compiler produces: a folder laid out like the guest's `/`, and how to start the app."""

    root: Path
    entrypoint: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Kernel modules (beyond the base set) the app needs in the guest.
    modules: list[str] = field(default_factory=list)
    # The least memory (MB) the image boots in (big runtimes: the initrd is unpacked into RAM);
    # the image's default instance memory is raised to it.
    memory_mb: int = 0
    # What the runtime itself needs once the initrd is unpacked (measured by bench/min_memory.py):
    # with the initrd's own footprint it makes the image's minimum memory.
    runtime_min_mb: int = 0


class Compiler(ABC):
    base = "linux"
    language: str
    # How a user lays out a project for this compiler (served by /describe_compiler).
    guide: ClassVar[str]

    def __init__(self, provider: str, settings: BuildSettings | None = None) -> None:
        from unik.compilers.toolchain import BuildSettings  # toolchain imports this module

        self.provider = provider
        self.settings = settings or BuildSettings()

    @property
    def name(self) -> str:
        return f"{self.base}-{self.language}-{self.provider}"

    def description(self) -> str:
        return self.guide

    @abstractmethod
    def missing_toolchain(self) -> str | None:
        """None when the host can build; otherwise what to install."""

    @abstractmethod
    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        """Build the app found in `source`; scratch space and output go under `work`."""


@dataclass(frozen=True)
class Sandbox:
    """Where a build's tools run: of the host only the system and the toolchains, read-only
    (host_view), its secrets there reading as empty; of the data dir only the build's own
    folder and the toolchain caches; no network unless allowed."""

    hidden: Path
    writable: tuple[Path, ...]
    network: bool = False
    # The daemon's own secrets (its config file, its TLS key), wherever they are.
    private: tuple[Path, ...] = ()
    # Toolchains the config names outside the system folders (a JDK or a Python in a home).
    toolchains: tuple[Path, ...] = ()

    def wrap(self, argv: list[str], cwd: Path) -> list[str]:
        visible = host_view(self.toolchains)
        wrapped = [BWRAP, "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp"]
        for path in visible:
            if str(path) in SYSTEM_FOLDERS and path.is_symlink():
                wrapped += ["--symlink", os.readlink(path), str(path)]  # merged /usr: /bin -> usr/bin
            else:
                wrapped += ["--ro-bind", str(path), str(path)]
        wrapped += ["--tmpfs", str(self.hidden)]  # in case the data dir is inside a visible folder
        hidden = self.hidden.resolve()
        exposed = [p for p in (*_host_secrets(), *_existing(self.private)) if not p.is_relative_to(hidden)]
        exposed = [p for p in exposed if any(p.is_relative_to(v) for v in visible if not v.is_symlink())]
        if exposed:
            # Files are covered by an empty one (a bound /dev/null would be nodev: EACCES).
            empty = self.hidden / ".empty"
            if not empty.is_file():
                empty.touch(mode=0o444)
            for secret in exposed:
                wrapped += ["--tmpfs", str(secret)] if secret.is_dir() else ["--ro-bind", str(empty), str(secret)]
        wrapped += self._name_service(visible)
        for folder in self.writable:
            folder.mkdir(parents=True, exist_ok=True)
            wrapped += ["--bind", str(folder), str(folder)]
        # The sandbox's own root (where the mount points above were made) is read-only too.
        wrapped += ["--remount-ro", "/", "--unshare-all", "--die-with-parent", "--new-session", "--chdir", str(cwd)]
        if self.network:
            wrapped.append("--share-net")
        return [*wrapped, "--", *argv]

    def _name_service(self, visible: list[Path]) -> list[str]:
        """With the network on: /etc/resolv.conf where it links out of what is visible (to
        /run/systemd/resolve/ with systemd-resolved, say), its target bound read-only."""
        target = RESOLV_CONF.resolve()
        if not self.network or not target.is_file() or any(target.is_relative_to(v) for v in visible):
            return []
        return ["--ro-bind", str(target), str(target)]


BWRAP = "bwrap"
RESOLV_CONF = Path("/etc/resolv.conf")

# What a build sees of the host: the system folders, where compilers and their libraries live,
# and the toolchain managers' folders in the homes (rustup, pyenv, ...). The rest (other files
# in the homes, /var, /srv, /run with the host's service sockets, /mnt, ...) is not there.
SYSTEM_FOLDERS = (
    "/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/nix", "/gnu", "/snap",  # package stores (Nix, Guix, snapd): read-only programs, no secrets
)  # fmt: skip
TOOLCHAIN_HOMES = (
    ".cargo", ".rustup", ".pyenv", ".nvm", ".volta", ".sdkman", ".jdks", ".deno", ".bun", "go", "sdk",
    ".rbenv", ".nodenv", ".goenv", ".jenv", ".asdf", ".ghcup", ".juliaup",
)  # fmt: skip
# Where toolchain managers say their folder is, when not in the default place.
TOOLCHAIN_ENV = ("CARGO_HOME", "RUSTUP_HOME", "PYENV_ROOT", "NVM_DIR", "VOLTA_HOME", "SDKMAN_DIR", "GOROOT")
# Secrets inside what a build sees, read as empty: a C file can `#include "/etc/shadow"` and the
# compiler quotes it back in its error, and `.incbin` would put a whole file into the image.
SECRET_PATHS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/ssh", "/etc/ssl/private")
HOME_SECRETS = (
    ".ssh", ".gnupg", ".aws", ".unik", ".docker", ".kube", ".netrc", ".git-credentials", ".npmrc", ".pypirc",
    ".config/gcloud", ".cargo/credentials", ".cargo/credentials.toml",
)  # fmt: skip
# Environment variables of the daemon a build does not get (the API token, cloud keys, ...).
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY|^UNIK_", re.IGNORECASE)


def _homes() -> list[Path]:
    return [Path("/root"), *sorted(Path("/home").glob("*"))]


def host_view(toolchains: Iterable[Path] = ()) -> list[Path]:
    """The host paths a build sees, read-only: the system folders, the toolchain managers'
    folders in each home and those the environment names, and `toolchains`."""
    candidates = [Path(p) for p in SYSTEM_FOLDERS]
    candidates += [home / name for home in _homes() for name in TOOLCHAIN_HOMES]
    candidates += [Path(os.environ[name]) for name in TOOLCHAIN_ENV if os.environ.get(name, "").startswith("/")]
    candidates += [path.resolve() for path in toolchains]
    visible: list[Path] = []
    for path in candidates:
        if not (path.exists() or path.is_symlink()) or path in visible:
            continue
        if any(path.is_relative_to(v) for v in visible if not v.is_symlink()):
            continue  # already inside a visible folder
        if str(path) not in SYSTEM_FOLDERS and any(home.is_relative_to(path) for home in _homes()):
            continue  # never a whole home (CARGO_HOME=$HOME) nor above one: its secrets would show
        visible.append(path)
    return visible


def _host_secrets() -> list[Path]:
    return _existing([Path(p) for p in SECRET_PATHS] + [home / name for home in _homes() for name in HOME_SECRETS])


def _existing(paths: Iterable[Path]) -> list[Path]:
    return [path for path in paths if path.exists() and not path.is_symlink()]


def build_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment without its secrets, plus a tool's own variables."""
    inherited = {key: value for key, value in os.environ.items() if not SECRET_ENV.search(key)}
    return {**inherited, **(extra or {})}


# Set by the build service around a build; run_tool reads it, so compilers need not know.
build_sandbox: ContextVar[Sandbox | None] = ContextVar("build_sandbox", default=None)


def sandbox_available() -> bool:
    """bubblewrap is installed and can make namespaces here (not inside every container)."""
    if shutil.which(BWRAP) is None:
        return False
    probe = subprocess.run(
        [BWRAP, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


async def run_tool(argv: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a toolchain command (sandboxed during builds); its own error output becomes a 400."""
    sandbox = build_sandbox.get()
    command = sandbox.wrap(argv, cwd) if sandbox is not None else argv
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=build_environment(env) if sandbox is not None else {**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise BadRequest(f"build timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BadRequest(f"build failed ({' '.join(argv)} exited with {proc.returncode}):\n{text[-8000:]}")
    return text


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, 9)
