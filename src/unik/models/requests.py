"""Typed requests: what the HTTP layer parses each call into before it calls one service.

RunInstanceRequest is a wire body of its own (models.wire); the rest arrive as query strings
and multipart forms, and become these objects at the edge, so the services never see HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from unik.models.wire import HubConfig


@dataclass(frozen=True)
class BuildImageRequest:
    name: str
    sources: BinaryIO
    base: str
    lang: str
    provider: str
    args: str = ""
    mounts: list[str] = field(default_factory=list)
    force: bool = False
    no_cleanup: bool = False


@dataclass(frozen=True)
class CreateVolumeRequest:
    name: str
    # A tar.gz whose files fill the filesystem, a raw disk image (raw), or None: empty.
    data: BinaryIO | None = None
    provider: str | None = None
    raw: bool = False
    fs_type: str | None = None
    size_mb: int = 0
    no_cleanup: bool = False


@dataclass(frozen=True)
class AttachVolumeRequest:
    volume: str
    instance: str
    mount: str


@dataclass(frozen=True)
class PullImageRequest:
    name: str
    credentials: HubConfig
    provider: str
    force: bool = False


@dataclass(frozen=True)
class ExportDiskRequest:
    image: str
    format: str
    # KEY=VALUE pairs as given: the service says which one is malformed.
    env: list[str] = field(default_factory=list)
    # None: the image's own default arguments.
    args: str | None = None
