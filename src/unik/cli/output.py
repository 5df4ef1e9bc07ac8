"""How the CLI shows things: tables, JSON, byte progress bars, and failures as one `unik: ...` line."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from unik.client import UnikClientError
from unik.models import Image, Instance, Volume

P = ParamSpec("P")
R = TypeVar("R")

IMAGE_COLUMNS = ("NAME", "ID", "INFRASTRUCTURE", "CREATED", "SIZE(MB)", "MOUNTPOINTS")
INSTANCE_COLUMNS = ("NAME", "ID", "INFRASTRUCTURE", "CREATED", "IMAGE", "IPADDRESS", "STATE")
VOLUME_COLUMNS = ("NAME", "ID", "INFRASTRUCTURE", "CREATED", "SIZE(MB)", "ATTACHED-INSTANCE")


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output gets a wide console so ids are not wrapped mid-word.
    width = None if stream.isatty() else 250
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def _table(columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    _console().print(table)


def print_images(images: Iterable[Image]) -> None:
    _table(
        IMAGE_COLUMNS,
        (
            (
                i.Name,
                i.Id,
                i.Infrastructure,
                i.Created,
                i.SizeMb,
                ", ".join(m.MountPoint for m in i.RunSpec.DeviceMappings if m.MountPoint != "/"),
            )
            for i in images
        ),
    )


def _state(instance: Instance) -> str:
    """A warm start (a clone of a VM template) shows after the state: "running (warm)"."""
    return f"{instance.State} (warm)" if instance.StartedWarm else instance.State


def print_instances(instances: Iterable[Instance]) -> None:
    _table(
        INSTANCE_COLUMNS,
        ((i.Name, i.Id, i.Infrastructure, i.Created, i.ImageId, i.IpAddress, _state(i)) for i in instances),
    )


def print_volumes(volumes: Iterable[Volume]) -> None:
    _table(
        VOLUME_COLUMNS,
        ((v.Name, v.Id, v.Infrastructure, v.Created, v.SizeMb, v.Attachment) for v in volumes),
    )


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _byte_progress() -> Progress:
    """A transient bar on stderr with bytes, rate and elapsed time (uploads and hub transfers)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=True,
    )


def _fail(message: str) -> typer.Exit:
    typer.echo(f"unik: {message}", err=True)
    return typer.Exit(1)


def cli_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Report failures as one `unik: ...` line and exit 1; tracebacks help no user here."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except UnikClientError as exc:
            raise _fail(exc.message) from None
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper
