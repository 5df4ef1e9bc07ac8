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
    """Where a build's tools run: the host read-only, the daemon's data dir hidden except
    the build's own folder (and the toolchain caches), no network unless allowed."""

    hidden: Path
    writable: tuple[Path, ...]
    network: bool = False
    # The daemon's own secrets outside `hidden` (its config file, its TLS key).
    private: tuple[Path, ...] = ()

    def wrap(self, argv: list[str], cwd: Path) -> list[str]:
        wrapped = [BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        wrapped += ["--tmpfs", str(self.hidden)]
        secrets = [*_host_secrets(), *_existing(p for p in self.private if not p.is_relative_to(self.hidden.resolve()))]
        if secrets:
            # Files are covered by an empty one (a bound /dev/null would be nodev: EACCES).
            empty = self.hidden / ".empty"
            if not empty.is_file():
                empty.touch(mode=0o444)
            for secret in secrets:
                wrapped += ["--tmpfs", str(secret)] if secret.is_dir() else ["--ro-bind", str(empty), str(secret)]
        for folder in self.writable:
            folder.mkdir(parents=True, exist_ok=True)
            wrapped += ["--bind", str(folder), str(folder)]
        wrapped += ["--unshare-all", "--die-with-parent", "--new-session", "--chdir", str(cwd)]
        if self.network:
            wrapped.append("--share-net")
        return [*wrapped, "--", *argv]


BWRAP = "bwrap"

# The host stays visible to a build (read-only), since toolchains live under /usr, /opt and home
# folders (pyenv, rustup); these secrets do not: a C file can `#include "/etc/shadow"` and the
# compiler quotes it back in its error, and `.incbin` would put a whole file into the image.
SECRET_PATHS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/ssh")
HOME_SECRETS = (
    ".ssh", ".gnupg", ".aws", ".unik", ".docker", ".kube", ".netrc", ".git-credentials", ".npmrc", ".pypirc",
    ".config/gcloud", ".cargo/credentials", ".cargo/credentials.toml",
)  # fmt: skip
# Environment variables of the daemon a build does not get (the API token, cloud keys, ...).
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY|^UNIK_", re.IGNORECASE)


def _host_secrets() -> list[Path]:
    homes = [Path("/root"), *sorted(Path("/home").glob("*"))]
    return _existing([Path(p) for p in SECRET_PATHS] + [home / name for home in homes for name in HOME_SECRETS])


def _existing(paths: Iterable[Path]) -> list[Path]:
    return [path for path in paths if path.exists() and not path.is_symlink()]


def build_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment without its secrets, plus a tool's own variables."""
    inherited = {key: value for key, value in os.environ.items() if not SECRET_ENV.search(key)}
    return {**inherited, **(extra or {})}


# Set by the manager around a build; run_tool reads it, so compilers need not know.
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
