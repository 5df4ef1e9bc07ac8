"""The `unik` command: the Typer app, its global --host and the table of commands (run by `main`).

Flags keep the original UniK CLI's camelCase spellings (`--instanceName`, `--imageName`, ...) so
existing scripts keep working. The daemon to talk to comes from, in order: the
command's `--host`, the global `unik --host`, `UNIK_HOST`, `host:` in
~/.unik/client-config.yaml (written by `unik target`), else localhost:3000.

The commands live by group in `system`, `images`, `instances`, `volumes` and `hub`; `settings`
resolves the daemon and builds the client, `output` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from unik.cli import hub, images, instances, system, volumes
from unik.cli.output import cli_errors, print_images, print_instances, print_volumes
from unik.cli.settings import (
    HostOpt,
    _global_options,
    client_config_path,
    hub_config_path,
    make_client,
    resolve_host,
    resolve_token,
    unik_home,
)

__all__ = [
    "HostOpt",
    "app",
    "cli_errors",
    "client_config_path",
    "command",
    "hub_config_path",
    "main",
    "make_client",
    "print_images",
    "print_instances",
    "print_volumes",
    "resolve_host",
    "resolve_token",
    "unik_home",
]

app = typer.Typer(
    name="unik",
    help="Compile applications into unikernel images and run them (client of the UniK daemon).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

P = ParamSpec("P")
R = TypeVar("R")


@app.callback()
def _root(
    host: Annotated[
        str | None,
        typer.Option("--host", help="Daemon as host[:port] or URL (overrides the client config).", show_default=False),
    ] = None,
) -> None:
    # Set on every invocation (the callback always runs), so no stale value leaks
    # between commands run in one process, e.g. by tests.
    _global_options["host"] = host


def command(*names: str, **kwargs: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Register a command under its name and its aliases (the first name is shown)."""

    def register(func: Callable[P, R]) -> Callable[P, R]:
        wrapped = cli_errors(func)
        app.command(names[0], **kwargs)(wrapped)
        for alias in names[1:]:
            app.command(alias, hidden=True)(wrapped)
        return wrapped

    return register


# Registered here, in one table, because Typer lists commands in registration order and
# `unik --help` keeps the original CLI's order, which interleaves the groups.
_COMMANDS: tuple[tuple[tuple[str, ...], Callable[..., None]], ...] = (
    (("daemon",), system.daemon),
    (("target",), system.target),
    (("build",), images.build),
    (("run",), instances.run),
    (("images",), images.images),
    (("instances", "ps"), instances.instances),
    (("volumes",), volumes.volumes),
    (("providers",), system.providers),
    (("compilers",), system.compilers),
    (("describe-compiler",), system.describe_compiler),
    (("describe-image",), images.describe_image),
    (("describe-instance",), instances.describe_instance),
    (("describe-volume",), volumes.describe_volume),
    (("delete-image", "rmi"), images.delete_image),
    (("export",), images.export),
    (("delete-instance", "rm"), instances.delete_instance),
    (("start",), instances.start),
    (("stop",), instances.stop),
    (("logs",), instances.logs),
    (("create-volume",), volumes.create_volume),
    (("delete-volume", "rmv"), volumes.delete_volume),
    (("attach-volume", "attach"), volumes.attach_volume),
    (("detach-volume", "detach"), volumes.detach_volume),
    (("login",), hub.login),
    (("push",), hub.push),
    (("pull",), hub.pull),
    (("remote-delete",), hub.remote_delete),
    (("search",), hub.search),
)
for _names, _func in _COMMANDS:
    command(*_names)(_func)


def main() -> None:
    app()
