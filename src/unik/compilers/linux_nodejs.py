"""linux-nodejs-<provider>: the host's node binary (and its shared libraries) running the app."""

from __future__ import annotations

import json
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
    install_program,
    manifest_str,
    read_manifest,
    run_build_command,
    which,
)
from unik.errors import BadRequest

APP_DIR = "/unik/app"
MAIN_CANDIDATES = ("server.js", "index.js", "app.js", "main.js")
LOCKFILES = ("package-lock.json", "npm-shrinkwrap.json")

DESCRIPTION = f"""\
linux-nodejs: a Node.js program on a Linux micro-VM, run by the daemon host's `node` (with
the shared libraries its ELF headers name; `node_binary` in the daemon config picks another).

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you):
  * The program: `main_file` in manifest.yaml, else package.json's "main", else server.js,
    index.js, app.js or main.js at the top:
        main_file: src/server.js
    The folder is copied to {APP_DIR} in the guest, which is the program's working directory
    only through paths relative to __dirname.
  * Dependencies: include node_modules/ as `npm install --omit=dev` left it; it is packed as
    uploaded (native addons bring their shared libraries along). Without node_modules/, when
    package.json has dependencies, `npm ci --omit=dev` runs from package-lock.json, but only
    if the daemon's config says `build_network: true`; otherwise the build fails.
  * Native addons must be built for the host's node version and for Linux x86-64.
{BUILD_COMMAND_GUIDE}
    It runs after `npm ci` (when that runs), before the program is looked for: e.g.
    `build_command: npm run build` with `main_file: dist/server.js` for TypeScript.
stdout/stderr are the instance's logs; `--args` become process.argv.slice(2), `unik run
--env K=V` sets process.env. A graceful `unik stop` sends SIGTERM (node exits at once unless
the program handles it with process.on('SIGTERM', ...)). The image needs about twice its
size in memory to boot (the node binary alone is ~90 MB); its default memory says so.
"""


class LinuxNodejsCompiler(Compiler):
    language = "nodejs"
    guide = DESCRIPTION

    def missing_toolchain(self) -> str | None:
        if which(self.settings.node) is None:
            return f"{self.settings.node} is not installed (Debian packages nodejs and npm)"
        return None

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        node = which(self.settings.node)
        if node is None:
            raise BadRequest(self.missing_toolchain() or "no node")
        manifest = read_manifest(project, {"main_file", BUILD_COMMAND})
        command = build_command(manifest)
        package = read_package(project)
        main_file = manifest_str(manifest, "main_file")
        # With a build_command, looked for after it: the program may be its output (dist/server.js).
        found = find_main(project, main_file, package) if command is None else None
        if needs_install(project, package):
            await self._npm_ci(project, timeout)
        if command is not None:
            await run_build_command(command, project, work, timeout=timeout)
            package = read_package(project)
        main = found or find_main(project, main_file, package)
        guest_node = str(node)
        program = node
        strip = which("strip")
        if strip is not None:
            # Debian's node keeps its symbol table: ~12 MB of the image nobody reads in the guest.
            # Stripped beside the image tree, not in it: the tree is made after the last build step.
            program = work / "node"
            await run_tool([str(strip), "-o", str(program), str(node)], cwd=work, timeout=timeout)
        root = image_root(work, project)
        app_dir = root / APP_DIR.lstrip("/")
        copy_tree(project, root, APP_DIR, skip={".git"})
        env = install_program(program, root, guest_node)
        addons = elf.elf_files(root, app_dir)
        env.update(elf.bundle_shared_libraries(root, addons))
        guest_main = f"{APP_DIR}/{main.relative_to(project.resolve()).as_posix()}"
        return AppBundle(
            root=root,
            entrypoint=[guest_node, guest_main],
            env=env,
            memory_mb=boot_memory_mb(root, 64),
            runtime_min_mb=80,
        )

    async def _npm_ci(self, project: Path, timeout: float) -> None:
        lock = next((name for name in LOCKFILES if (project / name).is_file()), None)
        if not self.settings.network:
            raise BadRequest(
                "package.json has dependencies but the upload has no node_modules/: run `npm install --omit=dev` "
                "and include node_modules/ (the daemon's config does not allow network access during builds)"
            )
        if lock is None:
            raise BadRequest("package.json has dependencies but there is neither node_modules/ nor package-lock.json")
        npm = which("npm")
        if npm is None:
            raise BadRequest("npm is not installed on the daemon's host (Debian package npm)")
        await run_tool([str(npm), "ci", "--omit=dev", "--no-audit", "--no-fund"], cwd=project, timeout=timeout)


def read_package(project: Path) -> dict[str, Any]:
    path = project / "package.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise BadRequest(f"package.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("package.json must be a JSON object")
    return data


def find_main(project: Path, named: str | None, package: dict[str, Any]) -> Path:
    if named is not None:
        return inside(project, named, "manifest.yaml main_file")
    declared = package.get("main")
    if isinstance(declared, str) and declared:
        candidates = [declared, f"{declared}.js", f"{declared}/index.js"]
        for candidate in candidates:
            path = (project / candidate).resolve()
            if path.is_file() and path.is_relative_to(project.resolve()):
                return path
        raise BadRequest(f"package.json main {declared!r} is not a file in the project")
    for name in MAIN_CANDIDATES:
        if (project / name).is_file():
            return (project / name).resolve()
    raise BadRequest(
        "cannot tell which file is the program: set package.json \"main\", name it in manifest.yaml "
        f"(`main_file: server.js`) or call it one of {', '.join(MAIN_CANDIDATES)}"
    )


def needs_install(project: Path, package: dict[str, Any]) -> bool:
    return bool(package.get("dependencies")) and not (project / "node_modules").is_dir()
