"""Wire objects of the UniK API (docs/api.md): the one source of truth for JSON shapes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)

Name = Annotated[str, Field(pattern=NAME_PATTERN, description="1-64 of [A-Za-z0-9][A-Za-z0-9_.-]*")]


def is_valid_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name))


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class InstanceState(StrEnum):
    running = "running"
    stopped = "stopped"
    pending = "pending"
    unknown = "unknown"
    terminated = "terminated"
    error = "error"
    paused = "paused"
    suspended = "suspended"


class Infrastructure(StrEnum):
    AWS = "AWS"
    GCLOUD = "GCLOUD"
    VSPHERE = "VSPHERE"
    VIRTUALBOX = "VIRTUALBOX"
    QEMU = "QEMU"
    PHOTON = "PHOTON"
    XEN = "XEN"
    OPENSTACK = "OPENSTACK"
    UKVM = "UKVM"
    FIRECRACKER = "FIRECRACKER"


class ImageFormat(StrEnum):
    raw = "raw"
    qcow2 = "qcow2"
    vhd = "vhd"
    vmdk = "vmdk"
    folder = "folder"


def _drop_empty(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """docs/api.md marks some strings 'omitted when empty', as Go's `omitempty` did."""
    return {k: v for k, v in data.items() if not (k in keys and v == "")}


# What GET /images/{name}/disk makes of a kernel+initrd ("folder") image.
DISK_FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi")


class ImageStageSpec(BaseModel):
    ImageFormat: str = ImageFormat.folder.value
    XenVirtualizationType: str = ""
    # Addition: the bootable disk formats the image exports to (omitted when none).
    DiskFormats: list[str] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: Any) -> dict[str, Any]:
        data = _drop_empty(handler(self), ("XenVirtualizationType",))
        if not data.get("DiskFormats"):
            data.pop("DiskFormats", None)
        return data


class DeviceMapping(BaseModel):
    MountPoint: str
    DeviceName: str


class ImageRunSpec(BaseModel):
    DeviceMappings: list[DeviceMapping] = Field(default_factory=list)
    DefaultInstanceMemory: int = 128
    MinInstanceDiskMB: int = 0
    # Addition: the least MemoryMb the image boots in (a run below it is a 400); 0 when unknown.
    MinInstanceMemoryMB: int = 0
    StorageDriver: str = ""
    VsphereNetworkType: str = ""
    Compiler: str = ""

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: Any) -> dict[str, Any]:
        return _drop_empty(handler(self), ("StorageDriver", "Compiler"))


class Image(BaseModel):
    Id: str
    Name: str
    SizeMb: int
    Infrastructure: str
    Created: str
    StageSpec: ImageStageSpec = Field(default_factory=ImageStageSpec)
    RunSpec: ImageRunSpec = Field(default_factory=ImageRunSpec)


class Instance(BaseModel):
    Id: str
    Name: str
    State: str
    IpAddress: str = ""
    ImageId: str
    Infrastructure: str
    Created: str
    # Addition: its last start was a clone of a VM template (a warm start); omitted when not.
    StartedWarm: bool = False
    # Addition: the host it runs on, for providers with several (libvirt); omitted when empty.
    Host: str = ""

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in ("StartedWarm", "Host"):
            if not data.get(key):
                data.pop(key, None)
        return data


class Volume(BaseModel):
    Id: str
    Name: str
    SizeMb: int
    Attachment: str = ""
    Infrastructure: str
    Created: str


class PortMapping(BaseModel):
    """A host port forwarded to a guest port (user-mode networking), like `docker run -p`."""

    model_config = ConfigDict(extra="ignore")

    HostPort: int = Field(ge=1, le=65535, description="port on the daemon's publish_address")
    GuestPort: int = Field(ge=1, le=65535, description="port the app listens on inside the VM")
    Protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("Protocol", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class RunInstanceRequest(BaseModel):
    """Body of POST /instances/run, as the Go client sends it."""

    model_config = ConfigDict(extra="ignore")

    InstanceName: str = ""
    ImageName: str = ""
    Mounts: dict[str, str] | None = None
    Env: dict[str, str] | None = None
    MemoryMb: int = 0
    NoCleanup: bool = False
    DebugMode: bool = False
    # A daemon addition: clients that do not know it send nothing and publish nothing.
    Ports: list[PortMapping] | None = None
    # Addition: start as a clone of a VM template of the same image, Env and memory (the
    # first such run boots cold and becomes the template once its app is ready).
    WarmStart: bool = False

    @field_serializer("Mounts", "Env")
    def _none_as_empty(self, value: dict[str, str] | None) -> dict[str, str]:
        return value or {}


class HubConfig(BaseModel):
    """Push/pull body: the Go client sends URL/Username/Password, the docs url/user/pass."""

    url: str = ""
    user: str = ""
    password: str = ""

    @classmethod
    def from_wire(cls, body: Any) -> HubConfig:
        if not isinstance(body, dict):
            return cls()
        lowered = {str(k).lower(): v for k, v in body.items()}
        return cls(
            url=str(lowered.get("url") or ""),
            user=str(lowered.get("username") or lowered.get("user") or ""),
            password=str(lowered.get("password") or lowered.get("pass") or ""),
        )


class HubImage(BaseModel):
    """One image on the hub, as `POST /hub/search` lists it (a daemon addition)."""

    Name: str
    User: str = ""
    SizeMb: int
    Updated: str


class HubTransfer(BaseModel):
    """A push or pull in progress, as `GET /hub/transfers` shows it (a daemon addition)."""

    Image: str
    ImageId: str
    Direction: Literal["push", "pull"]
    Phase: str = Field(description="packing, uploading, downloading or verifying")
    Bytes: int = Field(description="bytes sent or received so far")
    Total: int = Field(description="bytes to send or receive; 0 while unknown")
    Seconds: float = Field(description="since the transfer started")


class ErrorBody(BaseModel):
    message: str
