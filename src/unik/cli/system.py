"""Daemon-level commands: run the daemon, point the CLI at one (target), list its providers and compilers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unik.cli.settings import HostOpt, _client, _read_yaml, _write_yaml, client_config_path


def daemon(
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 3000,
    data_dir: Annotated[Path, typer.Option("--d", help="Data directory (images, instances, volumes).")] = Path(
        "~/.unik"
    ),
    config_file: Annotated[
        Path | None, typer.Option("--f", help="Daemon config file (providers).", show_default=False)
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Verbose logging.")] = False,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run the UniK daemon."""
    # Imported here: the daemon's dependencies (fastapi, uvicorn, qemu) are not
    # needed by the client commands and should not slow them down.
    from unik.daemon import serve

    serve(
        host=host,
        port=port,
        data_dir=data_dir.expanduser(),
        config_file=config_file.expanduser() if config_file else None,
        debug=debug,
    )


def target(
    host: Annotated[str, typer.Option("--host", help="Host or IP of the daemon.")],
    port: Annotated[int, typer.Option("--port", help="Port of the daemon.")] = 3000,
) -> None:
    """Point the CLI at a daemon (writes ~/.unik/client-config.yaml)."""
    path = client_config_path()
    config = _read_yaml(path)
    config["host"] = f"{host}:{port}"
    _write_yaml(path, config)
    typer.echo(f"target set to {config['host']} in {path}")


def providers(host: HostOpt = None) -> None:
    """List the daemon's configured providers."""
    for name in _client(host).available_providers():
        typer.echo(name)


def compilers(host: HostOpt = None) -> None:
    """List the daemon's compilers (base-language-provider)."""
    for name in _client(host).available_compilers():
        typer.echo(name)


def describe_compiler(
    base: Annotated[str, typer.Option("--base")],
    language: Annotated[str, typer.Option("--language")],
    provider: Annotated[str, typer.Option("--provider")],
    host: HostOpt = None,
) -> None:
    """How to prepare an application for a compiler."""
    typer.echo(_client(host).describe_compiler(provider, base, language))
