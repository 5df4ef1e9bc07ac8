"""Volume commands: volumes, describe-volume, create-volume, delete-volume (rmv), attach, detach."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unik.cli.output import _print_json, print_volumes
from unik.cli.settings import HostOpt, _client


def volumes(host: HostOpt = None) -> None:
    """List volumes."""
    print_volumes(_client(host).volumes.list())


def describe_volume(volume: Annotated[str, typer.Option("--volume")], host: HostOpt = None) -> None:
    """Show a volume as JSON."""
    _print_json(_client(host).volumes.get(volume).model_dump())


def create_volume(
    name: Annotated[str, typer.Option("--name", help="Name of the volume.")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Folder (or tar.gz) to fill it with; with --raw a disk image.", show_default=False),
    ] = None,
    size: Annotated[int, typer.Option("--size", help="Size in MB (0 with --data: fit the data).")] = 0,
    fs_type: Annotated[
        str | None, typer.Option("--type", help="Filesystem: ext2 (default), ext4, fat.", show_default=False)
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="--data is a raw disk image, used as it is.")] = False,
    provider: Annotated[str, typer.Option("--provider")] = "qemu",
    no_cleanup: Annotated[bool, typer.Option("--no-cleanup", help="Keep the daemon's build files.")] = False,
    host: HostOpt = None,
) -> None:
    """Create a volume, empty or from data."""
    if data is None and size <= 0:
        raise ValueError("--size is required without --data")
    volume = _client(host).volumes.create(
        name, size_mb=size, provider=provider, data=data, raw=raw, fs_type=fs_type, no_cleanup=no_cleanup
    )
    print_volumes([volume])


def delete_volume(
    volume: Annotated[str, typer.Option("--volume")],
    force: Annotated[bool, typer.Option("--force", help="Delete even when attached.")] = False,
    host: HostOpt = None,
) -> None:
    """Delete a volume (alias: rmv)."""
    _client(host).volumes.delete(volume, force=force)
    typer.echo(f"deleted volume {volume}")


def attach_volume(
    volume: Annotated[str, typer.Option("--volume")],
    instance_id: Annotated[str, typer.Option("--instanceId")],
    mount_point: Annotated[str, typer.Option("--mountPoint")],
    host: HostOpt = None,
) -> None:
    """Attach a volume to an instance (alias: attach)."""
    name = _client(host).volumes.attach(volume, instance_id, mount_point)
    typer.echo(f"attached volume {name or volume} to {instance_id} at {mount_point}")


def detach_volume(volume: Annotated[str, typer.Option("--volume")], host: HostOpt = None) -> None:
    """Detach a volume from its instance (alias: detach)."""
    name = _client(host).volumes.detach(volume)
    typer.echo(f"detached volume {name or volume}")
