"""linux-c-<provider>: a C program built statically with musl, run as the guest's only program."""

from __future__ import annotations

import shutil
import stat
import struct
from pathlib import Path

from unik.compilers.base import AppBundle, Compiler, run_tool
from unik.compilers.toolchain import (
    BUILD_COMMAND,
    BUILD_COMMAND_GUIDE,
    build_command,
    image_root,
    inside,
    install_program,
    manifest_str,
    read_manifest,
    run_build_command,
)
from unik.errors import BadRequest

GUEST_APP = "unik/app"
MANIFEST_KEYS = {"binary_name", BUILD_COMMAND}
# -static in CC too: many Makefiles link with $(CC) alone and never pass $(LDFLAGS).
MAKE_VARIABLES = ["CC=musl-gcc -static", "LDFLAGS=-static"]
# Weaker than make's command-line variables (a Makefile's own assignments win), but what
# ./configure and a Makefile that leaves CC alone pick up.
BUILD_COMMAND_ENV = {"CC": "musl-gcc -static", "LDFLAGS": "-static"}

DESCRIPTION = f"""\
linux-c: a C program on a Linux micro-VM (built statically with musl-gcc on the daemon's host).

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you):
  * Without a Makefile: every *.c file in the folder (and its sub-folders) is compiled and
    linked into one static program:  musl-gcc -static -O2 -I. *.c -lm
    Put exactly one main() among them.
  * With a Makefile at the top: `make "CC=musl-gcc -static" LDFLAGS=-static` runs there. The
    program is the file manifest.yaml names (`binary_name: hello`, a path in the folder),
    else an executable named `app` at the top of the folder, else the one new executable.
    Use $(CC) and the program is static. One the Makefile still links dynamically (it calls
    gcc or cc itself) works too: its loader and every shared library its ELF headers name
    are packed into the image.
{BUILD_COMMAND_GUIDE}
    It replaces `make` (CC="musl-gcc -static" and LDFLAGS=-static are in its environment);
    the program is then found as with a Makefile.
  * Only musl's C library is available to musl-gcc: no other libraries are installed for
    the build.
The program is the guest's only process. Its stdout and stderr are the instance's logs
(`unik logs`). The build's `--args` are its default arguments; `unik run --env K=V` sets
its environment. When it exits the VM powers off and the instance reads `stopped`; the
log ends with `unik: exit status N`. A graceful `unik stop` sends it SIGTERM first.
Volumes given at build with --mountpoints are mounted at those paths before it starts.
"""


class LinuxCCompiler(Compiler):
    language = "c"
    guide = DESCRIPTION

    def missing_toolchain(self) -> str | None:
        if shutil.which("musl-gcc") is None:
            return "musl-gcc is not installed (Debian package musl-tools; `make setup` installs it)"
        return None

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        binary = await make_program(project, work, timeout, variables=MAKE_VARIABLES, env=BUILD_COMMAND_ENV)
        if binary is not None:
            # The Makefile could write anywhere in the build folder: the image tree is made
            # afresh once nothing of the build runs, and written without following links.
            root = image_root(work, project)
            env = install_program(binary, root, "/" + GUEST_APP)
            return AppBundle(root=root, entrypoint=["/" + GUEST_APP], env=env)
        sources = sorted(
            str(p.relative_to(project))
            for p in project.rglob("*.c")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(project).parts)
        )
        if not sources:
            raise BadRequest("no C sources found: the archive has no *.c file and no Makefile")
        # Linked straight into the image tree: a file created (and later removed) the less,
        # on the critical path of every build. musl-gcc runs none of the user's code.
        root = work / "root"
        app = root / GUEST_APP
        app.parent.mkdir(parents=True, exist_ok=True)
        await run_tool(
            ["musl-gcc", "-static", "-O2", "-I.", "-o", str(app), *sources, "-lm"],
            cwd=project,
            timeout=timeout,
        )
        require_static_elf(app)
        app.chmod(0o755)
        return AppBundle(root=root, entrypoint=["/" + GUEST_APP])


def has_makefile(project: Path) -> bool:
    return (project / "Makefile").exists() or (project / "makefile").exists()


async def make_program(
    project: Path, work: Path, timeout: float, *, variables: list[str], env: dict[str, str]
) -> Path | None:
    """The program the project's Makefile, or manifest.yaml's build_command, makes; None when
    the project has neither (the compiler then builds its sources itself)."""
    manifest = read_manifest(project, MANIFEST_KEYS)
    command = build_command(manifest)
    if command is None and not has_makefile(project):
        return None
    binary_name = manifest_str(manifest, "binary_name")
    return await make_app(project, variables, timeout, binary_name=binary_name, command=command, work=work, env=env)


async def make_app(
    project: Path,
    variables: list[str],
    timeout: float,
    *,
    binary_name: str | None = None,
    command: str | None = None,
    work: Path | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """Run the project's Makefile (or its manifest's build_command instead); the program is
    `binary_name`, else `app`, else the one new executable."""
    before = set(_executables(project))
    if command is None:
        await run_tool(["make", *variables], cwd=project, timeout=timeout)
    else:
        await run_build_command(command, project, work or project.parent, timeout=timeout, env=env)
    if binary_name is not None:
        return inside(project, binary_name, "manifest.yaml binary_name")
    app = project / "app"
    if app.is_file():
        return app
    new = sorted(set(_executables(project)) - before)
    if len(new) != 1:
        found = ", ".join(str(p.relative_to(project)) for p in new) or "none"
        raise BadRequest(
            f"the {'build_command' if command else 'Makefile'} must produce an executable named `app` "
            f"(or exactly one new executable, or name it in manifest.yaml: `binary_name: NAME`); found: {found}"
        )
    return new[0]


def project_root(source: Path) -> Path:
    """An archive of one top-level folder (tar czf x.tgz myapp/) is that folder's project."""
    entries = [p for p in source.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return source


def _executables(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & stat.S_IXUSR and _is_elf(p)
    ]


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def require_static_elf(path: Path) -> None:
    """The guest has no dynamic loader: refuse a program that asks for one (PT_INTERP)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF":
            raise BadRequest(f"{path.name} is not an ELF executable")
        if header[4] != 2 or header[5] != 1:
            raise BadRequest(f"{path.name} is not a 64-bit little-endian ELF program")
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == pt_interp:
            raise BadRequest(
                f"{path.name} is dynamically linked; link it statically (-static), the guest has no shared libraries"
            )
