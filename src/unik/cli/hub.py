"""Image hub commands: login, push, pull, remote-delete, search, with transfer progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import typer

from unik.cli.output import _byte_progress, _table
from unik.cli.settings import HostOpt, _client, _read_yaml, _write_yaml, hub_config_path
from unik.client import HubProgressCallback
from unik.models import HubConfig, HubTransfer


def _hub_config() -> HubConfig:
    """Hub credentials from `unik login` (~/.unik/hub-config.yaml), either spelling."""
    return HubConfig.from_wire(_read_yaml(hub_config_path()))


def login(
    url: Annotated[str, typer.Option("--url", help="URL of the image hub (an S3-compatible endpoint).")],
    user: Annotated[str, typer.Option("--user", help="Hub user name (the S3 access key id).")],
    password: Annotated[
        str, typer.Option("--pass", prompt=True, hide_input=True, help="Hub password (the S3 secret key).")
    ],
) -> None:
    """Save image hub credentials (~/.unik/hub-config.yaml)."""
    path = hub_config_path()
    _write_yaml(path, {"url": url, "user": user, "pass": password})
    typer.echo(f"hub credentials saved in {path}")


@contextlib.contextmanager
def _transfer_progress(image: str) -> Iterator[tuple[HubProgressCallback, list[HubTransfer]]]:
    """A bar with bytes and rate fed by the daemon's view of the transfer; yields the last one seen."""
    seen: list[HubTransfer] = []
    with _byte_progress() as bar:
        task = bar.add_task(f"{image}: starting", total=None)

        def show(transfer: HubTransfer) -> None:
            seen[:] = [transfer]
            bar.update(
                task, description=f"{image}: {transfer.Phase}", completed=transfer.Bytes, total=transfer.Total or None
            )

        yield show, seen


def _transfer_summary(seen: list[HubTransfer]) -> str:
    if not seen or not seen[-1].Total:
        return ""
    transfer = seen[-1]
    megabytes = transfer.Total / 1e6
    return f" ({megabytes:.1f} MB in {transfer.Seconds:.1f} s, {megabytes / max(transfer.Seconds, 1e-3):.1f} MB/s)"


def push(image: Annotated[str, typer.Option("--image")], host: HostOpt = None) -> None:
    """Push an image to the hub."""
    with _transfer_progress(image) as (show, seen):
        _client(host).images.push(image, _hub_config(), progress=show)
    typer.echo(f"pushed image {image}{_transfer_summary(seen)}")


def pull(
    image: Annotated[str, typer.Option("--image")],
    provider: Annotated[str, typer.Option("--provider")],
    force: Annotated[bool, typer.Option("--force", help="Replace a local image of the same name.")] = False,
    host: HostOpt = None,
) -> None:
    """Pull an image from the hub."""
    with _transfer_progress(image) as (show, seen):
        _client(host).images.pull(image, _hub_config(), provider, force=force, progress=show)
    typer.echo(f"pulled image {image}{_transfer_summary(seen)}")


def remote_delete(image: Annotated[str, typer.Option("--image")], host: HostOpt = None) -> None:
    """Delete an image from the hub."""
    _client(host).images.remote_delete(image, _hub_config())
    typer.echo(f"deleted image {image} from the hub")


def search(host: HostOpt = None) -> None:
    """List the images on the hub (the daemon asks the hub with your credentials)."""
    found = _client(host).hub.search(_hub_config())
    _table(("NAME", "USER", "SIZE(MB)", "UPDATED"), ((i.Name, i.User, i.SizeMb, i.Updated) for i in found))
