"""linux-go-<provider>: a Go program built as one static binary (CGO_ENABLED=0)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from unik.compilers.base import AppBundle, Compiler, run_tool
from unik.compilers.linux_c import project_root, require_static_elf
from unik.compilers.toolchain import (
    BUILD_COMMAND,
    BUILD_COMMAND_GUIDE,
    build_command,
    image_root,
    install_program,
    manifest_str,
    read_manifest,
    run_build_command,
    which,
)
from unik.errors import BadRequest

GUEST_APP = "/unik/app"
# A project without go.mod, Godeps/Godeps.json or manifest.yaml `import_path` is placed here.
DEFAULT_IMPORT_PATH = "app"
MANIFEST_KEYS = {"import_path", BUILD_COMMAND}
# Slash-separated elements of letters, digits and ._~- (what `go get` accepts), none starting
# with a dot: the path becomes folders under GOPATH/src, so it must never climb out of them.
_IMPORT_PATH = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*")

DESCRIPTION = f"""\
linux-go: a Go program on a Linux micro-VM, built by the daemon host's `go` as one static
binary (CGO_ENABLED=0, GOOS=linux, GOARCH=amd64, -trimpath, -ldflags "-s -w").

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you),
with the `main` package at the top, in one of two shapes:
  * Modules: go.mod at the top (`go build .` must produce the program).
    Dependencies: run `go mod vendor` and include the vendor/ folder; the build then uses it
    (-mod=vendor) and never downloads. Without vendor/ modules are downloaded only when the
    daemon's config says `build_network: true`; otherwise (GOPROXY=off) a missing module is a
    build error naming it.
  * GOPATH (no go.mod, as the original UniK built Go): built with GO111MODULE=off in a GOPATH
    of the build's own, the project placed at src/<import path>. The import path is
    Godeps/Godeps.json's "ImportPath", else `import_path:` in manifest.yaml at the top
    (e.g. `import_path: github.com/org/repo`), else `app`. The project's own packages are
    imported by that path (github.com/org/repo/handlers). Dependencies come from the
    project's vendor/ folder (govendor, glide, dep, godep -v) and, for the old godep layout,
    Godeps/_workspace/src (added to GOPATH). A missing package is a build error naming it;
    only with `build_network: true` does `go get -d` fetch it first (over git, so the
    daemon host needs git).
  * cgo is off: packages needing C code must have a pure-Go fallback (net and os/user do).
{BUILD_COMMAND_GUIDE}
The program is the guest's only process; stdout/stderr are the instance's logs, `--args`
its default arguments, `unik run --env K=V` its environment. It gets SIGTERM on a graceful
`unik stop`. Listening on 0.0.0.0 makes it reachable through published ports.
"""


class LinuxGoCompiler(Compiler):
    language = "go"
    guide = DESCRIPTION

    def missing_toolchain(self) -> str | None:
        if which("go") is None:
            return "the Go toolchain is not installed (Debian package golang-go; `make setup` installs it)"
        return None

    def _common_env(self) -> dict[str, str]:
        return {
            "CGO_ENABLED": "0",
            "GOOS": "linux",
            "GOARCH": "amd64",
            # Go's build cache is content-addressed and safe to share: unchanged sources rebuild fast.
            "GOCACHE": str(self.settings.cache_dir / "go-build"),
            "GOTOOLCHAIN": "local",
        }

    def build_env(self, project: Path) -> dict[str, str]:
        """The environment of a module-mode build (the project has go.mod)."""
        cache = self.settings.cache_dir
        env = {
            **self._common_env(),
            "GOPATH": str(cache / "go"),
            "GOMODCACHE": str(cache / "go" / "pkg" / "mod"),
            "GOWORK": "off",
        }
        if (project / "vendor" / "modules.txt").is_file():
            env["GOFLAGS"] = "-mod=vendor"
        else:
            env["GOFLAGS"] = "-mod=mod"
            if not self.settings.network:
                # Only modules already in the daemon's module cache; never the network.
                env["GOPROXY"] = "off"
                env["GOSUMDB"] = "off"
        return env

    def gopath_env(self, project: Path, gopath: Path) -> dict[str, str]:
        """The environment of a GOPATH-mode build (no go.mod): `gopath` first, where `go get` writes."""
        paths = [str(gopath)]
        workspace = project / "Godeps" / "_workspace"
        if (workspace / "src").is_dir():
            paths.append(str(workspace))
        return {
            **self._common_env(),
            "GO111MODULE": "off",
            "GOPATH": os.pathsep.join(paths),
            # The daemon's own GOFLAGS (-mod=...) would be an error outside module mode.
            "GOFLAGS": "",
        }

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        binary = work / "app"
        flags = ["-trimpath", "-ldflags=-s -w", "-o", str(binary)]
        command = build_command(read_manifest(project, MANIFEST_KEYS))
        if command:
            # `go generate` and friends: their output is part of what `go build` then compiles.
            await run_build_command(command, project, work, timeout=timeout)
        if (project / "go.mod").is_file():
            await run_tool(["go", "build", *flags, "."], cwd=project, timeout=timeout, env=self.build_env(project))
        else:
            await self._build_gopath(project, work, flags, timeout)
        # Checked before the program is read: the build could have swapped its folder for a link.
        root = image_root(work, project)
        require_static_elf(binary)
        install_program(binary, root, GUEST_APP)
        return AppBundle(root=root, entrypoint=[GUEST_APP])

    async def _build_gopath(self, project: Path, work: Path, flags: list[str], timeout: float) -> None:
        import_path = find_import_path(project)
        gopath = work / "gopath"
        placed = gopath / "src" / import_path
        placed.parent.mkdir(parents=True, exist_ok=True)
        # A link rather than a copy: vendor/ trees can be big, and Go resolves vendor/ and the
        # project's own packages by the path it is found at, not where the files really are.
        placed.symlink_to(os.path.relpath(project, placed.parent), target_is_directory=True)
        env = self.gopath_env(project, gopath)
        if self.settings.network:
            await run_tool(["go", "get", "-d", import_path], cwd=project, timeout=timeout, env=env)
        await run_tool(["go", "build", *flags, import_path], cwd=project, timeout=timeout, env=env)


def find_import_path(project: Path) -> str:
    """Where a GOPATH-mode project goes under GOPATH/src: Godeps/Godeps.json's ImportPath, else
    manifest.yaml's import_path, else DEFAULT_IMPORT_PATH."""
    manifest = read_manifest(project, MANIFEST_KEYS)
    godeps = project / "Godeps" / "Godeps.json"
    path, what = manifest_str(manifest, "import_path"), "manifest.yaml import_path"
    if godeps.is_file():
        try:
            data = json.loads(godeps.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"Godeps/Godeps.json is not valid JSON: {exc}") from exc
        named = data.get("ImportPath") if isinstance(data, dict) else None
        if named is not None:
            if not isinstance(named, str):
                raise BadRequest("Godeps/Godeps.json: ImportPath must be a string")
            path, what = named.strip(), "Godeps/Godeps.json ImportPath"
    if path is None:
        return DEFAULT_IMPORT_PATH
    if not _IMPORT_PATH.fullmatch(path):
        raise BadRequest(f"{what} {path!r} is not a Go import path (like github.com/org/repo)")
    return path
