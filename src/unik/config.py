"""daemon-config.yaml, with the original UniK's layout (the CLI owns client-config.yaml).

The original daemon config lists providers by kind, each kind a list of named
configurations (`providers: {qemu: [{name: my-qemu, ...}]}`); we keep that shape and
use the first entry of each kind. Each kind's entries are checked by the config model its
provider brings (providers.registry); kinds this daemon does not know are skipped with a warning.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from unik.providers import registry
from unik.providers.base import ProviderConfig

log = logging.getLogger(__name__)


class HubSettings(BaseModel):
    """Where the image hub keeps images; the endpoint and credentials come with each request."""

    model_config = ConfigDict(extra="ignore")

    bucket: str = Field(default="unik-hub", min_length=3, max_length=63)
    region: str = "us-east-1"
    # {user} is the hub user name, {image} the image name: the original UniK hub's layout.
    key: str = "{user}/{image}/latest"
    # Path style works with every S3-compatible store (MinIO, Ceph, moto); AWS accepts both.
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    # Memory held by one transfer is about chunk size x concurrency, whatever the image size.
    multipart_chunk_mb: int = Field(default=8, ge=5, le=512)
    max_concurrency: int = Field(default=4, ge=1, le=32)
    connect_timeout: float = Field(default=10, gt=0)
    read_timeout: float = Field(default=120, gt=0)

    @model_validator(mode="after")
    def _key_names_the_image(self) -> HubSettings:
        if "{image}" not in self.key:
            raise ValueError("hub.key must contain {image}")
        unknown = set(re.findall(r"{([^}]*)}", self.key)) - {"user", "image"}
        if unknown:
            raise ValueError(f"hub.key: unknown placeholder(s) {sorted(unknown)}; use {{user}} and {{image}}")
        return self


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Provider kind -> its configurations (the first one is used).
    providers: dict[str, list[SerializeAsAny[ProviderConfig]]] = Field(default_factory=registry.default_config)
    hub: HubSettings = Field(default_factory=HubSettings)
    max_upload_mb: int = Field(default=1024, gt=0)
    # Unpacked sources may be bigger than the upload; this bounds decompression bombs.
    max_unpacked_mb: int = Field(default=4096, gt=0)
    build_timeout: int = Field(default=600, gt=0)
    # Volume files are sparse, but an app may fill them: this bounds the host disk one can take.
    max_volume_mb: int = Field(default=65536, gt=0)
    # Exported disks (GET /images/{name}/disk) are kept for the next export of the same image,
    # format and run config; beyond this many MB the oldest go.
    disk_cache_mb: int = Field(default=4096, ge=0)
    # The kernel exported disks boot: "disk", ours with every driver built in (`make
    # kernel-disk`), or "cloud", Debian's, whose modules lack AHCI and e1000 (VirtualBox).
    disk_kernel: Literal["disk", "cloud"] = "disk"
    version: str = ""
    # Whether builds may download (go modules, pip's index, npm ci); off, an upload must carry
    # its dependencies (vendor/, wheels/, node_modules/).
    build_network: bool = False
    # The interpreters and JDK the language compilers pack (None: the distribution's / PATH's).
    python_interpreter: str | None = None
    node_binary: str | None = None
    java_home: Path | None = None
    # When set (or $UNIK_AUTH_TOKEN), every route wants `Authorization: Bearer <token>`.
    auth_token: str | None = Field(default=None, min_length=8)
    # Running (or starting) instances at once; more is a 409, before anything starts.
    max_running_instances: int = Field(default=64, gt=0)
    # HTTPS: handed to uvicorn as they are (PEM files).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Builds run the user's toolchain on the user's code: with bubblewrap they see the host
    # read-only and nothing of the data dir but their own folder. auto: when bwrap works here.
    build_sandbox: Literal["auto", "bwrap", "off"] = "auto"

    @field_validator("providers", mode="before")
    @classmethod
    def _by_kind(cls, value: Any) -> Any:
        """Each kind's entries validated by that kind's own config model."""
        if not isinstance(value, dict):
            return value
        checked: dict[str, list[ProviderConfig]] = {}
        for kind, entries in value.items():
            known = registry.lookup(str(kind))
            if known is None:
                log.warning("providers: unknown kind %r skipped; known: %s", kind, ", ".join(registry.kinds()))
                continue
            # A kind may be written as one mapping instead of a list of them.
            listed = entries if isinstance(entries, list) else [entries]
            checked[kind] = [_provider_entry(known.config_model, kind, i, entry) for i, entry in enumerate(listed)]
        return checked

    def provider_configs(self) -> dict[str, ProviderConfig]:
        """Each configured kind's config in use: its first entry."""
        return {kind: entries[0] for kind, entries in self.providers.items() if entries}


def _provider_entry(model: type[ProviderConfig], kind: str, index: int, entry: Any) -> ProviderConfig:
    if isinstance(entry, model):
        return entry
    try:
        return model.model_validate({"name": kind, **entry} if isinstance(entry, dict) else entry)
    except ValidationError as exc:
        raise ValueError(f"providers.{kind}[{index}]: {exc}") from None


def load_daemon_config(path: Path | None) -> DaemonConfig:
    """Absent file → the built-in default (one qemu provider)."""
    if path is None or not path.exists():
        return DaemonConfig()
    try:
        raw: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return DaemonConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from exc
