"""The `unik` command: the original UniK CLI's commands and flags over unik.client.

Flags keep the original camelCase spellings (`--instanceName`, `--imageName`, ...) so
existing scripts keep working. The daemon to talk to comes from, in order: the
command's `--host`, the global `unik --host`, `UNIK_HOST`, `host:` in
~/.unik/client-config.yaml (written by `unik target`), else localhost:3000.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from unik.client import DEFAULT_HOST, HubProgressCallback, UnikClient, UnikClientError
from unik.models import HubConfig, HubTransfer, Image, Instance, Volume

app = typer.Typer(
    name="unik",
    help="Compile applications into unikernel images and run them (client of the UniK daemon).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

P = ParamSpec("P")
R = TypeVar("R")

# ------------------------------------------------------------------------ config


def unik_home() -> Path:
    return Path.home() / ".unik"


def client_config_path() -> Path:
    return unik_home() / "client-config.yaml"


def hub_config_path() -> Path:
    return unik_home() / "hub-config.yaml"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, default_flow_style=False))
    # The files may hold a token or hub password.
    path.chmod(0o600)


# Options of the `unik` callback itself (`unik --host H images`).
_global_options: dict[str, str | None] = {"host": None}


def resolve_host(host: str | None = None) -> str:
    if host:
        return host
    if _global_options.get("host"):
        return str(_global_options["host"])
    if os.environ.get("UNIK_HOST"):
        return os.environ["UNIK_HOST"]
    return str(_read_yaml(client_config_path()).get("host") or DEFAULT_HOST)


def resolve_token() -> str | None:
    token = os.environ.get("UNIK_TOKEN") or _read_yaml(client_config_path()).get("token")
    return str(token) if token else None


def make_client(host: str, token: str | None) -> UnikClient:
    """The one place the CLI builds its client (tests replace it)."""
    return UnikClient(host, token=token)


def _client(host: str | None) -> UnikClient:
    return make_client(resolve_host(host), resolve_token())


# ------------------------------------------------------------------------ output


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


IMAGE_COLUMNS = ("NAME", "ID", "INFRASTRUCTURE", "CREATED", "SIZE(MB)", "MOUNTPOINTS")
INSTANCE_COLUMNS = ("NAME", "ID", "INFRASTRUCTURE", "CREATED", "IMAGE", "IPADDRESS", "STATE")
VOLUME_COLUMNS = ("NAME", "ID", "INFRASTRUCTURE", "CREATED", "SIZE(MB)", "ATTACHED-INSTANCE")


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


def print_instances(instances: Iterable[Instance]) -> None:
    _table(
        INSTANCE_COLUMNS,
        ((i.Name, i.Id, i.Infrastructure, i.Created, i.ImageId, i.IpAddress, i.State) for i in instances),
    )


def print_volumes(volumes: Iterable[Volume]) -> None:
    _table(
        VOLUME_COLUMNS,
        ((v.Name, v.Id, v.Infrastructure, v.Created, v.SizeMb, v.Attachment) for v in volumes),
    )


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


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


def command(*names: str, **kwargs: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Register a command under its name and its aliases (the first name is shown)."""

    def register(func: Callable[P, R]) -> Callable[P, R]:
        wrapped = cli_errors(func)
        app.command(names[0], **kwargs)(wrapped)
        for alias in names[1:]:
            app.command(alias, hidden=True)(wrapped)
        return wrapped

    return register


# ----------------------------------------------------------------------- options

HostOpt = Annotated[
    str | None,
    typer.Option("--host", help="Daemon as host[:port] or URL (overrides the client config).", show_default=False),
]


def _split_list(values: Iterable[str] | None) -> list[str]:
    """Accept both `--x a,b` and `--x a --x b`, as cobra's StringSlice did."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def _parse_env(values: Iterable[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in values or ():
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {value!r}")
        env[key] = val
    return env


def _parse_vols(values: Iterable[str] | None) -> dict[str, str]:
    mounts: dict[str, str] = {}
    for value in values or ():
        volume, sep, mount = value.partition(":")
        if not sep or not volume or not mount.startswith("/"):
            raise ValueError(f"--vol expects VOLUME:/mountpoint, got {value!r}")
        mounts[mount] = volume
    return mounts


def _parse_publish(values: Iterable[str] | None) -> list[dict[str, Any]]:
    """`--publish 18080:8080` or `18080:8080/udp`, as `docker run -p` spells it."""
    ports: list[dict[str, Any]] = []
    for value in values or ():
        mapping, _, protocol = value.partition("/")
        host_port, sep, guest_port = mapping.partition(":")
        if not sep or not host_port.isdigit() or not guest_port.isdigit():
            raise ValueError(f"--publish expects HOST:GUEST[/tcp|/udp], got {value!r}")
        ports.append({"HostPort": int(host_port), "GuestPort": int(guest_port), "Protocol": protocol or "tcp"})
    return ports


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


# ---------------------------------------------------------------------- commands


@command("daemon")
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


@command("target")
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


@command("build")
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


@command("run")
def run(
    instance_name: Annotated[str, typer.Option("--instanceName", help="Name of the new instance.")],
    image_name: Annotated[str, typer.Option("--imageName", help="Image to boot.")],
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE (repeatable).")] = None,
    vol: Annotated[list[str] | None, typer.Option("--vol", help="VOLUME:/mountpoint (repeatable).")] = None,
    instance_memory: Annotated[
        int, typer.Option("--instanceMemory", help="Memory in MB (0: the image's default).")
    ] = 0,
    no_cleanup: Annotated[bool, typer.Option("--no-cleanup", help="Keep the instance's files on failure.")] = False,
    debug_mode: Annotated[bool, typer.Option("--debug-mode", help="Boot in debug mode.")] = False,
    host: HostOpt = None,
    publish: Annotated[
        list[str] | None,
        typer.Option("--publish", "-p", help="HOST:GUEST[/udp]: forward a host port to the guest (repeatable)."),
    ] = None,
) -> None:
    """Boot an instance of an image."""
    instance = _client(host).instances.run(
        instance_name,
        image_name,
        env=_parse_env(env),
        mounts=_parse_vols(vol),
        memory_mb=instance_memory,
        no_cleanup=no_cleanup,
        debug_mode=debug_mode,
        ports=_parse_publish(publish),
    )
    print_instances([instance])


@command("images")
def images(host: HostOpt = None) -> None:
    """List images."""
    print_images(_client(host).images.list())


@command("instances", "ps")
def instances(host: HostOpt = None) -> None:
    """List instances (alias: ps)."""
    print_instances(_client(host).instances.list())


@command("volumes")
def volumes(host: HostOpt = None) -> None:
    """List volumes."""
    print_volumes(_client(host).volumes.list())


@command("providers")
def providers(host: HostOpt = None) -> None:
    """List the daemon's configured providers."""
    for name in _client(host).available_providers():
        typer.echo(name)


@command("compilers")
def compilers(host: HostOpt = None) -> None:
    """List the daemon's compilers (base-language-provider)."""
    for name in _client(host).available_compilers():
        typer.echo(name)


@command("describe-compiler")
def describe_compiler(
    base: Annotated[str, typer.Option("--base")],
    language: Annotated[str, typer.Option("--language")],
    provider: Annotated[str, typer.Option("--provider")],
    host: HostOpt = None,
) -> None:
    """How to prepare an application for a compiler."""
    typer.echo(_client(host).describe_compiler(provider, base, language))


@command("describe-image")
def describe_image(image: Annotated[str, typer.Option("--image")], host: HostOpt = None) -> None:
    """Show an image as JSON."""
    _print_json(_client(host).images.get(image).model_dump())


@command("describe-instance")
def describe_instance(instance: Annotated[str, typer.Option("--instance")], host: HostOpt = None) -> None:
    """Show an instance as JSON."""
    _print_json(_client(host).instances.get(instance).model_dump())


@command("describe-volume")
def describe_volume(volume: Annotated[str, typer.Option("--volume")], host: HostOpt = None) -> None:
    """Show a volume as JSON."""
    _print_json(_client(host).volumes.get(volume).model_dump())


@command("delete-image", "rmi")
def delete_image(
    image: Annotated[str, typer.Option("--image")],
    force: Annotated[bool, typer.Option("--force", help="Also delete the image's instances.")] = False,
    host: HostOpt = None,
) -> None:
    """Delete an image (alias: rmi)."""
    _client(host).images.delete(image, force=force)
    typer.echo(f"deleted image {image}")


@command("delete-instance", "rm")
def delete_instance(
    instance: Annotated[str, typer.Option("--instance")],
    force: Annotated[bool, typer.Option("--force", help="Delete even when running.")] = False,
    host: HostOpt = None,
) -> None:
    """Delete an instance (alias: rm)."""
    _client(host).instances.delete(instance, force=force)
    typer.echo(f"deleted instance {instance}")


@command("start")
def start(instance: Annotated[str, typer.Option("--instance")], host: HostOpt = None) -> None:
    """Start a stopped instance."""
    _client(host).instances.start(instance)
    typer.echo(f"started instance {instance}")


@command("stop")
def stop(instance: Annotated[str, typer.Option("--instance")], host: HostOpt = None) -> None:
    """Stop a running instance."""
    _client(host).instances.stop(instance)
    typer.echo(f"stopped instance {instance}")


@command("logs")
def logs(
    instance: Annotated[str, typer.Option("--instance")],
    follow: Annotated[bool, typer.Option("--follow", help="Stream until the instance stops.")] = False,
    delete_on_disconnect: Annotated[
        bool, typer.Option("--deleteOnDisconnect", help="With --follow: delete the instance when this exits.")
    ] = False,
    host: HostOpt = None,
) -> None:
    """Print an instance's console output."""
    client = _client(host)
    if not follow:
        typer.echo(client.instances.logs(instance), nl=False)
        return
    stream = client.instances.follow_logs(instance, delete=delete_on_disconnect)
    try:
        for chunk in stream:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        # Leaving is how a follow normally ends; closing tells the daemon we left.
        raise typer.Exit(0) from None
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        client.close()


@command("create-volume")
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


@command("delete-volume", "rmv")
def delete_volume(
    volume: Annotated[str, typer.Option("--volume")],
    force: Annotated[bool, typer.Option("--force", help="Delete even when attached.")] = False,
    host: HostOpt = None,
) -> None:
    """Delete a volume (alias: rmv)."""
    _client(host).volumes.delete(volume, force=force)
    typer.echo(f"deleted volume {volume}")


@command("attach-volume", "attach")
def attach_volume(
    volume: Annotated[str, typer.Option("--volume")],
    instance_id: Annotated[str, typer.Option("--instanceId")],
    mount_point: Annotated[str, typer.Option("--mountPoint")],
    host: HostOpt = None,
) -> None:
    """Attach a volume to an instance (alias: attach)."""
    name = _client(host).volumes.attach(volume, instance_id, mount_point)
    typer.echo(f"attached volume {name or volume} to {instance_id} at {mount_point}")


@command("detach-volume", "detach")
def detach_volume(volume: Annotated[str, typer.Option("--volume")], host: HostOpt = None) -> None:
    """Detach a volume from its instance (alias: detach)."""
    name = _client(host).volumes.detach(volume)
    typer.echo(f"detached volume {name or volume}")


# ---------------------------------------------------------------------------- hub


def _hub_config() -> HubConfig:
    """Hub credentials from `unik login` (~/.unik/hub-config.yaml), either spelling."""
    return HubConfig.from_wire(_read_yaml(hub_config_path()))


@command("login")
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


@command("push")
def push(image: Annotated[str, typer.Option("--image")], host: HostOpt = None) -> None:
    """Push an image to the hub."""
    with _transfer_progress(image) as (show, seen):
        _client(host).images.push(image, _hub_config(), progress=show)
    typer.echo(f"pushed image {image}{_transfer_summary(seen)}")


@command("pull")
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


@command("remote-delete")
def remote_delete(image: Annotated[str, typer.Option("--image")], host: HostOpt = None) -> None:
    """Delete an image from the hub."""
    _client(host).images.remote_delete(image, _hub_config())
    typer.echo(f"deleted image {image} from the hub")


@command("search")
def search(host: HostOpt = None) -> None:
    """List the images on the hub (the daemon asks the hub with your credentials)."""
    found = _client(host).hub.search(_hub_config())
    _table(("NAME", "USER", "SIZE(MB)", "UPDATED"), ((i.Name, i.User, i.SizeMb, i.Updated) for i in found))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
