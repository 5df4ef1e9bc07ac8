"""linux-go-<provider>: a Go program built as one static binary (CGO_ENABLED=0)."""

from __future__ import annotations

from pathlib import Path

from unik.compilers.base import AppBundle, Compiler, run_tool
from unik.compilers.linux_c import project_root, require_static_elf
from unik.compilers.toolchain import image_root, install_program, which

GUEST_APP = "/unik/app"

DESCRIPTION = """\
linux-go: a Go program on a Linux micro-VM, built by the daemon host's `go` as one static
binary (CGO_ENABLED=0, GOOS=linux, GOARCH=amd64, -trimpath, -ldflags "-s -w").

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you):
  * go.mod at the top, and the `main` package at the top (`go build .` must produce the
    program). Without go.mod a minimal one (`module app`) is written: enough for programs
    that use only the standard library.
  * Dependencies: run `go mod vendor` and include the vendor/ folder; the build then uses it
    (-mod=vendor) and never downloads. Without vendor/ modules are downloaded only when the
    daemon's config says `build_network: true`; otherwise (GOPROXY=off) a missing module is a
    build error naming it.
  * cgo is off: packages needing C code must have a pure-Go fallback (net and os/user do).
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

    def build_env(self, project: Path) -> dict[str, str]:
        cache = self.settings.cache_dir
        env = {
            "CGO_ENABLED": "0",
            "GOOS": "linux",
            "GOARCH": "amd64",
            # Go's build cache is content-addressed and safe to share: unchanged sources rebuild fast.
            "GOCACHE": str(cache / "go-build"),
            "GOPATH": str(cache / "go"),
            "GOMODCACHE": str(cache / "go" / "pkg" / "mod"),
            "GOTOOLCHAIN": "local",
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

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        if not (project / "go.mod").is_file():
            (project / "go.mod").write_text("module app\n\ngo 1.19\n")
        binary = work / "app"
        await run_tool(
            ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(binary), "."],
            cwd=project,
            timeout=timeout,
            env=self.build_env(project),
        )
        # Checked before the program is read: the build could have swapped its folder for a link.
        root = image_root(work, project)
        require_static_elf(binary)
        install_program(binary, root, GUEST_APP)
        return AppBundle(root=root, entrypoint=[GUEST_APP])
