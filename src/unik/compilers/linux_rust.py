"""linux-rust-<provider>: a Cargo project built in release mode, statically linked (crt-static)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from unik.compilers.base import AppBundle, Compiler, run_tool
from unik.compilers.linux_c import project_root
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
TARGET = "x86_64-unknown-linux-gnu"

VENDOR_CONFIG = """\
# Written by unik: crates come from the uploaded vendor/ folder (`cargo vendor`), never a registry.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
"""

DESCRIPTION = f"""\
linux-rust: a Rust program on a Linux micro-VM, built by the daemon host's cargo:
    cargo build --release --offline --target {TARGET}   with RUSTFLAGS="-C target-feature=+crt-static"
(a static glibc binary; symbols stripped).

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you):
  * Cargo.toml (and preferably Cargo.lock) at the top, sources as cargo expects (src/main.rs).
  * Dependencies must be vendored: no crate registry is reachable from the daemon. Run
    `cargo vendor` in the project and include the vendor/ folder; the build uses it (unik
    writes .cargo/config.toml pointing crates-io at vendor/ when the project has none).
    Without `build_network: true` in the daemon's config the build runs with --offline.
  * The program is the package's binary target. With several, name one in manifest.yaml:
        bin: my-server
{BUILD_COMMAND_GUIDE}
    It runs before cargo (to generate sources, say); cargo still builds the program.
The program is the guest's only process; stdout/stderr are the instance's logs, `--args`
its default arguments, `unik run --env K=V` its environment. It gets SIGTERM on a graceful
`unik stop`. Build scripts and proc-macros run on the host; a crate that links a C library
needs that library's static archive on the host.
"""


class LinuxRustCompiler(Compiler):
    language = "rust"
    guide = DESCRIPTION

    def missing_toolchain(self) -> str | None:
        if which("cargo") is None or which("rustc") is None:
            return "cargo and rustc are not installed (rustup, or Debian packages cargo and rustc)"
        return None

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        if not (project / "Cargo.toml").is_file():
            raise BadRequest("no Cargo.toml at the top of the project")
        manifest = read_manifest(project, {"bin", BUILD_COMMAND})
        command = build_command(manifest)
        if command is not None:
            await run_build_command(command, project, work, timeout=timeout)
        use_vendor(project)
        offline = [] if self.settings.network else ["--offline"]
        metadata = await run_tool(
            ["cargo", "metadata", "--no-deps", "--format-version", "1", *offline],
            cwd=project,
            timeout=timeout,
        )
        bin_name = pick_binary(metadata, manifest_str(manifest, "bin"))
        target_dir = self.settings.cache_dir / "cargo-target" / _safe(bin_name)
        await run_tool(
            ["cargo", "build", "--release", *offline, "--target", TARGET, "--bin", bin_name],
            cwd=project,
            timeout=timeout,
            env={
                # With an explicit --target these flags reach only the program, not build scripts.
                "RUSTFLAGS": "-C target-feature=+crt-static",
                # Kept between builds: an unchanged project is not compiled again.
                "CARGO_TARGET_DIR": str(target_dir),
                "CARGO_PROFILE_RELEASE_STRIP": "symbols",
                "CARGO_TERM_COLOR": "never",
            },
        )
        root = image_root(work, project)
        env = install_program(target_dir / TARGET / "release" / bin_name, root, GUEST_APP)
        return AppBundle(root=root, entrypoint=[GUEST_APP], env=env)


def use_vendor(project: Path) -> None:
    """Point crates-io at vendor/ unless the project already configures its sources."""
    if not (project / "vendor").is_dir():
        return
    config_dir = project / ".cargo"
    if (config_dir / "config.toml").exists() or (config_dir / "config").exists():
        return
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.toml").write_text(VENDOR_CONFIG)


def pick_binary(metadata_json: str, wanted: str | None) -> str:
    """The binary target to build, from `cargo metadata --no-deps` output."""
    try:
        # Cargo's warnings share the stream; the metadata is the one JSON line.
        metadata = json.loads([line for line in metadata_json.splitlines() if line.startswith("{")][-1])
        bins = [
            target["name"]
            for package in metadata["packages"]
            for target in package["targets"]
            if "bin" in target["kind"]
        ]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadRequest(f"cannot read `cargo metadata` output: {exc}") from exc
    if wanted is not None:
        if wanted not in bins:
            raise BadRequest(f"manifest.yaml names bin {wanted!r}, but the project's binaries are {bins}")
        return wanted
    if len(bins) != 1:
        raise BadRequest(
            f"the project has {len(bins)} binary targets {bins}; name one in manifest.yaml (`bin: NAME`)"
            if bins
            else "the project has no binary target (src/main.rs or [[bin]])"
        )
    return bins[0]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "app"
