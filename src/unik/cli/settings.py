"""Which daemon the CLI talks to and as whom: ~/.unik's YAML files, --host/UNIK_HOST, the token, the client."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from unik.client import DEFAULT_HOST, UnikClient

HostOpt = Annotated[
    str | None,
    typer.Option("--host", help="Daemon as host[:port] or URL (overrides the client config).", show_default=False),
]


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
    """The one place the CLI builds its client (tests replace it as `unik.cli.make_client`)."""
    return UnikClient(host, token=token)


def _client(host: str | None) -> UnikClient:
    # Looked up on the package at call time, not bound at import: `unik.cli.make_client`
    # is the name tests replace, and every command must see the replacement.
    from unik import cli

    return cli.make_client(resolve_host(host), resolve_token())
