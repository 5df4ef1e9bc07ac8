"""Image commands: build, images, describe-image, delete-image (rmi), export."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import TaskID

from unik.cli.instances import _parse_env
from unik.cli.output import _byte_progress, _print_json, print_images
from unik.cli.settings import HostOpt, _client
from unik.client.images import DISK_FORMATS, disk_filename


def _split_list(values: Iterable[str] | None) -> list[str]:
    """Accept both `--x a,b` and `--x a --x b`, as cobra's StringSlice did."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def build(
    name: Annotated[str, typer.Option("--name", help="Name of the image.")],
    path: Annotated[Path, typer.Option("--path", help="Folder (or .tar.gz) of the application sources.")],
    base: Annotated[str, typer.Option("--base", help="Unikernel base, e.g. linux.")],
    language: Annotated[str, typer.Option("--language", help="Language of the application, e.g. c.")],
    provider: Annotated[str, typer.Option("--provider", help="Provider, e.g. qemu.")],
    args: Annotated[str, typer.Option("--args", help="Arguments the program is started with.")] = "",
    mountpoints: Annotated[
        list[str] | None,
        typer.Option("--mountpoints", help="Mount points for volumes (comma-separated or repeated)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an image of the same name.")] = False,
    no_cleanup: Annotated[bool, typer.Option("--no-cleanup", help="Keep the daemon's build files.")] = False,
    host: HostOpt = None,
) -> None:
    """Compile an application into an image."""
    if not path.expanduser().exists():
        raise ValueError(f"--path {path}: no such file or folder")
    client = _client(host)
    with _byte_progress() as bar:
        task: TaskID = bar.add_task("uploading", total=None)

        def progress(sent: int, total: int) -> None:
            # After the last byte the daemon compiles, which is most of the wait.
            bar.update(task, completed=sent, total=total, description="building" if sent >= total else "uploading")

        image = client.images.build(
            name,
            path,
            base=base,
            lang=language,
            provider=provider,
            args=args,
            mounts=_split_list(mountpoints),
            force=force,
            no_cleanup=no_cleanup,
            progress=progress,
        )
    print_images([image])


def images(host: HostOpt = None) -> None:
    """List images."""
    print_images(_client(host).images.list())


def describe_image(image: Annotated[str, typer.Option("--image")], host: HostOpt = None) -> None:
    """Show an image as JSON."""
    _print_json(_client(host).images.get(image).model_dump())


def delete_image(
    image: Annotated[str, typer.Option("--image")],
    force: Annotated[bool, typer.Option("--force", help="Also delete the image's instances.")] = False,
    host: HostOpt = None,
) -> None:
    """Delete an image (alias: rmi)."""
    _client(host).images.delete(image, force=force)
    typer.echo(f"deleted image {image}")


def export(
    image: Annotated[str, typer.Option("--image", help="Image to export.")],
    fmt: Annotated[str, typer.Option("--format", help=f"Disk format: {', '.join(DISK_FORMATS)}.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help="File to write, or a folder. Default: IMAGE.EXT in the current folder, .img for raw."
        ),
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE baked into the disk's environment (repeatable).")
    ] = None,
    args: Annotated[
        str | None, typer.Option("--args", help="Default arguments of the program on this disk (shell-split).")
    ] = None,
    host: HostOpt = None,
) -> None:
    """Download a bootable disk of an image, to run without the daemon."""
    # Checked before the request, so a typo costs no daemon work.
    variables = _parse_env(env)
    client = _client(host)
    with _byte_progress() as bar:
        task: TaskID = bar.add_task(f"{image}: exporting", total=None)

        def progress(done: int, total: int) -> None:
            # Without a Content-Length (total 0) the bar counts bytes and shows no end.
            bar.update(task, completed=done, total=total or None)

        path = client.images.export(
            image, fmt, output or Path(disk_filename(image, fmt)), env=variables, args=args, progress=progress
        )
    size = path.stat().st_size
    typer.echo(f"exported image {image} to {path} ({size / 1e6:.1f} MB)")
