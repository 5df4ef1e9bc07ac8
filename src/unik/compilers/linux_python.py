"""linux-python-<provider>: the host's CPython 3 with only the standard library the app imports."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from unik.compilers import elf
from unik.compilers.base import AppBundle, Compiler, run_tool
from unik.compilers.linux_c import project_root
from unik.compilers.toolchain import (
    BUILD_COMMAND,
    BUILD_COMMAND_GUIDE,
    boot_memory_mb,
    build_command,
    copy_tree,
    image_root,
    inside,
    install_file,
    install_program,
    manifest_list,
    manifest_str,
    read_manifest,
    real_folder,
    run_build_command,
    which,
)
from unik.errors import BadRequest

APP_DIR = "/unik/app"
SITE_DIR = "/unik/site-packages"
MAIN_CANDIDATES = ("main.py", "app.py", "server.py", "__main__.py")
# What `pip install --prefix=<project root>` fills (the original UniK's documented layout): the
# packages, for whatever Python 3 made them, and the scripts and single-file modules.
PREFIX_SITES = "lib/python3*/site-packages"
PREFIX_BIN = "bin"
# Reached only through lazy imports inside rarely used functions (help(), doctest hooks,
# `python -m` tools), but together as large as the rest of the stdlib an app uses: left out
# unless manifest.yaml's `stdlib` asks for them.
DEV_ONLY = [
    "test", "unittest", "doctest", "pydoc", "pydoc_data", "lib2to3", "distutils", "idlelib", "tkinter",
    "turtle", "turtledemo", "ensurepip", "venv", "pdb", "_testcapi", "_testinternalcapi", "_testbuffer",
    "_testmultiphase", "_xxtestfuzz", "_ctypes_test",
]  # fmt: skip

# Run by the target interpreter (not the daemon's): the modules it loads at start-up, plus what
# modulefinder sees the app import (statically, through every function body), are written into
# the image as bytecode. Hash-checked-never .pyc files: the initramfs has no usable mtimes, and
# the guest must not spend its boot recompiling. The search path is the guest's sys.path (the
# program's folder, PYTHONPATH, the stdlib) read in the staging tree: the stdlib imports of the
# app's own modules and of its packages are followed too.
ANALYSE = r"""
import sys
startup = sorted(sys.modules)
import compileall, json, modulefinder, os, py_compile, re, sysconfig

root, app_dir, site_dir, main, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
path, prefix_sites = json.loads(sys.argv[7]), [root + p for p in json.loads(sys.argv[8])]
stdlib = sysconfig.get_paths()["stdlib"]
dynload = os.path.join(stdlib, "lib-dynload")
search = [os.path.dirname(main)] + [root + p for p in path if os.path.isdir(root + p)]
search += [p for p in sys.path if p.startswith(stdlib) and os.path.isdir(p)]
excludes = [name for name in json.loads(sys.argv[6]) if name not in extra]
class Finder(modulefinder.ModuleFinder):
    def load_module(self, fqname, fp, pathname, file_info):
        try:
            return super().load_module(fqname, fp, pathname, file_info)
        except SyntaxError:
            # Another Python's package module (a py2 fallback, say) is skipped like a missing one.
            if not pathname.startswith(tuple(site + "/" for site in prefix_sites)):
                raise
            raise ImportError(fqname) from None
finder = Finder(path=search, excludes=excludes)
for name in startup + extra:
    try:
        finder.import_hook(name)
    except ImportError:
        if name in extra:
            sys.exit(f"manifest.yaml stdlib: no module named {name!r}")
# Codecs are looked up by name at run time: the whole encodings package goes in.
finder.import_hook("encodings", None, ["*"])
finder.run_script(main)
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
copied, shared = [], []
for module in finder.modules.values():
    source = module.__file__
    if not source or not source.startswith(stdlib + "/"):
        continue
    target = root + source
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if source.endswith(".py"):
        py_compile.compile(source, cfile=target + "c", dfile=source, doraise=True, invalidation_mode=mode)
        copied.append(source)
    elif source.startswith(dynload + "/"):
        shared.append(source)
# Another Python's packages may hold files this one cannot compile (pip's own compile step skips
# them too): they stay source, and fail only if imported, as they would on the host.
prefixed = re.compile("|".join("^" + re.escape(site + "/") for site in prefix_sites)) if prefix_sites else None
for tree in (root + app_dir, root + site_dir):
    if os.path.isdir(tree):
        if not compileall.compile_dir(tree, quiet=1, rx=prefixed, invalidation_mode=mode):
            sys.exit(f"compiling {tree[len(root):]} failed")
for site in prefix_sites:
    compileall.compile_dir(site, quiet=2, invalidation_mode=mode)
print(json.dumps({
    "prefix": sys.prefix,
    "stdlib": stdlib,
    "executable": os.path.realpath(sys.executable),
    "modules": len(copied),
    "shared": sorted(shared),
    "missing": sorted(finder.badmodules),
}))
"""

DESCRIPTION = f"""\
linux-python: a Python 3 program on a Linux micro-VM, run by the daemon host's CPython
(default /usr/bin/python3; `python_interpreter` in the daemon config) with only the part of
the standard library the program imports.

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you):
  * The program: `main_file` in manifest.yaml, else main.py, app.py, server.py or __main__.py
    at the top, else the only *.py file at the top:
        main_file: src/server.py
    The folder is copied to {APP_DIR} in the guest (the program's directory is on sys.path).
  * requirements.txt (optional) is installed at build time with the host interpreter's pip
    (`pip install --target {SITE_DIR} -r requirements.txt`). Put the wheels in a wheels/
    folder: they are used with --no-index. pip's index is used only when the daemon's config
    says `build_network: true`. Binary wheels must be built for the host's Python version.
  * Or packages installed the original UniK's way, `pip install --prefix=.` run in the
    project folder: every lib/python3.X/site-packages/ (whatever X: the packages run on
    the host's Python, so binary ones must be built for it) and bin/ (scripts, single-file
    modules) are on PYTHONPATH in the guest, in that order, after {SITE_DIR}:
        main.py
        bin/greet.py
        lib/python3.7/site-packages/mypkg/__init__.py
        lib/python3.7/site-packages/mypkg-1.0.dist-info/METADATA
  * The standard library modules are found by reading the imports of the program, its own
    modules and its packages, wherever they are (modulefinder). A module imported only by
    name at run time (importlib, __import__) must be listed in manifest.yaml:
        stdlib: [json.tool, xml.etree.ElementTree]
  * Files the program opens are relative to / (its working directory); use paths relative
    to __file__. No CA certificates or time zone data are packed.
{BUILD_COMMAND_GUIDE}
Output is unbuffered (python -u): print() reaches `unik logs` at once. `--args` become
sys.argv[1:], `unik run --env K=V` sets os.environ. A graceful `unik stop` sends SIGTERM
(Python's default for it is to exit at once; handle it with the signal module to clean up).
"""


class LinuxPythonCompiler(Compiler):
    language = "python"
    guide = DESCRIPTION

    def missing_toolchain(self) -> str | None:
        if which(self.settings.python) is None:
            return f"the Python interpreter {self.settings.python} is not installed (Debian package python3)"
        return None

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(project, {"main_file", "stdlib", BUILD_COMMAND})
        command = build_command(manifest)
        if command:
            # Before the program is looked for: the command may generate it.
            await run_build_command(command, project, work, timeout=timeout)
        main = find_main(project, manifest_str(manifest, "main_file"))
        interpreter = which(self.settings.python)
        if interpreter is None:
            raise BadRequest(self.missing_toolchain() or "no python")
        main_in_app = main.relative_to(project.resolve())
        # pip may run the user's own code (a package's build backend), so what the sandboxed
        # steps make goes to a staging tree; the image tree is made only after the last of them.
        stage = (work / "stage").absolute()  # absolute: the analysis runs elsewhere (below)
        stage.mkdir()
        copy_tree(project, stage, APP_DIR, skip={"wheels", ".git", "__pycache__", ".venv"})
        prefix = [f"{APP_DIR}/{folder}" for folder in prefix_folders(project)]
        if has_requirements(project):
            await run_tool(self.pip_command(project, stage / SITE_DIR.lstrip("/")), cwd=project, timeout=timeout)
        out = await run_tool(
            [
                str(interpreter),
                "-I",
                "-c",
                ANALYSE,
                str(stage),
                APP_DIR,
                SITE_DIR,
                str(stage / APP_DIR.lstrip("/") / main_in_app),
                json.dumps(manifest_list(manifest, "stdlib")),
                json.dumps(DEV_ONLY),
                json.dumps([SITE_DIR, *prefix]),
                json.dumps([p for p in prefix if p.endswith("/site-packages")]),
            ],
            # Not the build folder: before 3.11, -I still puts the working directory on sys.path,
            # and the build may have written modules there.
            cwd=Path("/"),
            timeout=timeout,
        )
        found = json.loads(out.strip().splitlines()[-1])
        shared = dynload_modules(found)
        root = image_root(work, project)
        # The staging tree as it is (links kept as links): from here on only the daemon writes.
        copy_tree(stage, root, "/")
        app_dir = root / APP_DIR.lstrip("/")
        site_dir = root / SITE_DIR.lstrip("/")
        executable = found["executable"]
        env = install_program(Path(executable), root, executable)
        # Extension modules (ours and the app's packages') load their libraries through ld.so too.
        objects = list(shared)
        for path in shared:
            install_file(root, path, Path(path), mode=0o644, follow_links=True)
        # Walked for extension modules: they must be folders, not links out of the image.
        has_site = real_folder(root, SITE_DIR)
        objects += elf.elf_files(root, site_dir) if has_site else []
        objects += elf.elf_files(root, app_dir) if real_folder(root, APP_DIR) else []
        env.update(elf.bundle_shared_libraries(root, objects))
        env.update(
            {
                "PYTHONHOME": found["prefix"],
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        # PYTHONPATH, as the original UniK did, rather than copies into a folder already on
        # sys.path: the files stay where the project has them (their __file__), in one copy.
        python_path = ([SITE_DIR] if has_site else []) + prefix
        if python_path:
            env["PYTHONPATH"] = ":".join(python_path)
        guest_main = f"{APP_DIR}/{main_in_app.as_posix()}"
        return AppBundle(
            root=root,
            entrypoint=[executable, "-u", guest_main],
            env=env,
            memory_mb=boot_memory_mb(root, 32),
            runtime_min_mb=16,
        )

    def pip_command(self, project: Path, site_dir: Path) -> list[str]:
        command = [
            str(which(self.settings.python)),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--no-cache-dir",
            # Compiled afterwards with hash-based .pyc files the guest never rewrites.
            "--no-compile",
            "--target",
            str(site_dir),
            "-r",
            "requirements.txt",
        ]
        if (project / "wheels").is_dir():
            command += ["--find-links", str(project / "wheels")]
        if not self.settings.network:
            command.append("--no-index")
        return command


def find_main(project: Path, named: str | None) -> Path:
    if named is not None:
        return inside(project, named, "manifest.yaml main_file")
    for name in MAIN_CANDIDATES:
        if (project / name).is_file():
            return (project / name).resolve()
    top = sorted(p for p in project.glob("*.py") if p.is_file())
    if len(top) == 1:
        return top[0].resolve()
    raise BadRequest(
        "cannot tell which file is the program: name it in manifest.yaml (`main_file: app.py`) "
        f"or call it one of {', '.join(MAIN_CANDIDATES)}"
        + (f" (found {', '.join(p.name for p in top)})" if top else " (no *.py at the top)")
    )


def prefix_folders(project: Path) -> list[str]:
    """The project's folders `pip install --prefix` filled, relative to it: the site-packages
    folders (sorted), then bin/. Real folders only: a link could lead out of the project."""
    found = sorted(p for p in project.glob(PREFIX_SITES) if _real_folders(project, p))
    if _real_folders(project, project / PREFIX_BIN):
        found.append(project / PREFIX_BIN)
    return [p.relative_to(project).as_posix() for p in found]


def _real_folders(project: Path, folder: Path) -> bool:
    """Whether `folder` and each folder between it and `project` is a folder, not a link."""
    parts = folder.relative_to(project).parts
    steps = [project.joinpath(*parts[:n]) for n in range(1, len(parts) + 1)]
    return all(not step.is_symlink() and step.is_dir() for step in steps)


def dynload_modules(found: dict[str, Any]) -> list[str]:
    """The standard library's extension modules the analysis names, which the daemon copies
    from the host: only from the interpreter's lib-dynload folder, whatever the output says."""
    dynload = posixpath.join(found["stdlib"], "lib-dynload") + "/"
    shared = found["shared"]
    for path in shared:
        if not isinstance(path, str) or not path.startswith(dynload) or posixpath.normpath(path) != path:
            raise BadRequest(f"the standard library analysis named {path!r}, not an extension module of {dynload}")
    return list(shared)


def has_requirements(project: Path) -> bool:
    path = project / "requirements.txt"
    if not path.is_file():
        return False
    return any(line.split("#", 1)[0].strip() for line in path.read_text(errors="replace").splitlines())
