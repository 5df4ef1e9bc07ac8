"""Instance commands: run, instances (ps), describe-instance, delete-instance (rm), start, stop, logs."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Annotated, Any

import typer

from unik.cli.output import _print_json, print_instances
from unik.cli.settings import HostOpt, _client


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


def parse_publish(values: Iterable[str] | None) -> list[dict[str, Any]]:
    """`--publish 18080:8080` or `18080:8080/udp`, as `docker run -p` spells it."""
    ports: list[dict[str, Any]] = []
    for value in values or ():
        mapping, _, protocol = value.partition("/")
        host_port, sep, guest_port = mapping.partition(":")
        if not sep or not host_port.isdigit() or not guest_port.isdigit():
            raise ValueError(f"--publish expects HOST:GUEST[/tcp|/udp], got {value!r}")
        ports.append({"HostPort": int(host_port), "GuestPort": int(guest_port), "Protocol": protocol or "tcp"})
    return ports


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
        typer.Option(
            "--publish", "-p", help="HOST:GUEST or HOST:GUEST/udp: forward a host port to the guest (repeatable)."
        ),
    ] = None,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm",
            help="Start as a clone of a VM template of the same image, env and memory: "
            "the first such run boots cold and becomes the template once its app listens.",
        ),
    ] = False,
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
        ports=parse_publish(publish),
        warm_start=warm,
    )
    print_instances([instance])


def instances(host: HostOpt = None) -> None:
    """List instances (alias: ps)."""
    print_instances(_client(host).instances.list())


def describe_instance(instance: Annotated[str, typer.Option("--instance")], host: HostOpt = None) -> None:
    """Show an instance as JSON."""
    _print_json(_client(host).instances.get(instance).model_dump())


def delete_instance(
    instance: Annotated[str, typer.Option("--instance")],
    force: Annotated[bool, typer.Option("--force", help="Delete even when running.")] = False,
    host: HostOpt = None,
) -> None:
    """Delete an instance (alias: rm)."""
    _client(host).instances.delete(instance, force=force)
    typer.echo(f"deleted instance {instance}")


def start(instance: Annotated[str, typer.Option("--instance")], host: HostOpt = None) -> None:
    """Start a stopped instance."""
    _client(host).instances.start(instance)
    typer.echo(f"started instance {instance}")


def stop(instance: Annotated[str, typer.Option("--instance")], host: HostOpt = None) -> None:
    """Stop a running instance."""
    _client(host).instances.stop(instance)
    typer.echo(f"stopped instance {instance}")


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
