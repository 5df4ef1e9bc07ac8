"""linux-cpp-<provider>: a C++ program, linked statically with glibc and libstdc++ when it can be."""

from __future__ import annotations

from pathlib import Path

from unik.compilers.base import AppBundle, Compiler, run_tool
from unik.compilers.linux_c import make_program, project_root
from unik.compilers.toolchain import (
    BUILD_COMMAND_GUIDE,
    image_root,
    install_program,
    which,
)
from unik.errors import BadRequest

GUEST_APP = "/unik/app"
CXX_SUFFIXES = (".cpp", ".cc", ".cxx", ".c++")
CXXFLAGS = ["-O2", "-std=gnu++17", "-pthread"]
MAKE_VARIABLES = ["CXX=g++", "CC=gcc", "LDFLAGS=-static"]
# For ./configure and Makefiles that leave these alone (a Makefile's own assignments win).
BUILD_COMMAND_ENV = {"CXX": "g++", "CC": "gcc", "LDFLAGS": "-static"}

DESCRIPTION = f"""\
linux-cpp: a C++ program on a Linux micro-VM, built by the daemon host's g++ (GNU libstdc++
and glibc, linked statically).

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you):
  * Without a Makefile: every *.cpp, *.cc, *.cxx and *.c++ file in the folder (and its
    sub-folders) is compiled and linked into one program:
        g++ -static -O2 -std=gnu++17 -pthread -I. SOURCES
    Put exactly one main() among them.
  * With a Makefile at the top: `make CXX=g++ CC=gcc LDFLAGS=-static` runs there. The program
    is the file manifest.yaml names (`binary_name: server`, a path in the folder), else an
    executable named `app` at the top of the folder, else the one new executable. A program
    it links dynamically still works: its loader and every shared library it names (read
    from its ELF headers) are packed into the image.
{BUILD_COMMAND_GUIDE}
    It replaces `make` (CXX=g++ CC=gcc LDFLAGS=-static are in its environment); the program
    is then found as with a Makefile.
  * Only the host's C and C++ standard libraries are available to link against.
The program is the guest's only process; stdout/stderr are the instance's logs, `--args`
its default arguments, `unik run --env K=V` its environment. It gets SIGTERM on a graceful
`unik stop`.
"""


class LinuxCppCompiler(Compiler):
    language = "cpp"
    guide = DESCRIPTION

    def missing_toolchain(self) -> str | None:
        if which("g++") is None:
            return "g++ is not installed (Debian package g++; `make setup` installs it)"
        return None

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        binary = await make_program(project, work, timeout, variables=MAKE_VARIABLES, env=BUILD_COMMAND_ENV)
        if binary is None:
            sources = cxx_sources(project)
            if not sources:
                raise BadRequest(f"no C++ sources found: no {', '.join(CXX_SUFFIXES)} file and no Makefile")
            binary = work / "app"
            await run_tool(
                ["g++", "-static", *CXXFLAGS, "-I.", "-o", str(binary), *sources], cwd=project, timeout=timeout
            )
        root = image_root(work, project)
        env = install_program(binary, root, GUEST_APP)
        return AppBundle(root=root, entrypoint=[GUEST_APP], env=env)


def cxx_sources(project: Path) -> list[str]:
    return sorted(
        str(p.relative_to(project))
        for p in project.rglob("*")
        if p.suffix in CXX_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(project).parts)
    )
