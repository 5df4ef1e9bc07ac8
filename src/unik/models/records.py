"""Typed stored records: what the daemon keeps beside each wire object, and how a VM is booted.

The store keeps each resource as its wire object (what the API returns) plus one of these
metadata models; nothing reads an untyped dict. Paths of the daemon's own files are not
stored: they follow from the data dir and the record's id, so a data dir can be moved.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from unik.models.wire import PortMapping

KERNEL_INITRD = "kernel+initrd"


class ArtifactFile(BaseModel):
    """One file of an image: its role for the provider that boots it, and its name in the image."""

    model_config = ConfigDict(frozen=True)

    role: str
    name: str


class Artifact(BaseModel):
    """What an image is made of: a format that providers declare they boot, and its files.

    The image digest is taken over the files in this order, so two images with the same files
    have the same digest wherever they were built or pulled."""

    model_config = ConfigDict(frozen=True)

    format: str = KERNEL_INITRD
    files: tuple[ArtifactFile, ...] = (
        ArtifactFile(role="kernel", name="kernel"),
        ArtifactFile(role="initrd", name="initrd"),
    )

    def name_of(self, role: str) -> str:
        for file in self.files:
            if file.role == role:
                return file.name
        raise KeyError(f"a {self.format} image has no {role} file")

    @property
    def names(self) -> list[str]:
        return [file.name for file in self.files]


class ImageMeta(BaseModel):
    provider: str
    compiler: str = ""
    # The release of the kernel the image was built with: the firmware and the run-config
    # channel follow it, not the config's current choice.
    kernel_version: str = ""
    digest: str
    # The program's default arguments, baked into the image's initrd.
    args: list[str] = Field(default_factory=list)
    artifact: Artifact = Field(default_factory=Artifact)
    # hit: restored from the build cache; miss: compiled (and cached); off: not cacheable.
    build_cache: Literal["hit", "miss", "off"] | None = None
    pulled_from: str | None = None
    # What the provider made of the image elsewhere (an AWS AMI and its snapshot).
    provider_data: dict[str, str] = Field(default_factory=dict)


class VolumeAttachment(BaseModel):
    """A volume as the guest sees it: a disk with this serial, mounted at `mount`."""

    model_config = ConfigDict(frozen=True)

    serial: str
    path: str
    mount: str
    fs_type: str
    # The volume's VolumeMeta.provider_data (its EBS volume on AWS).
    provider_data: dict[str, str] = Field(default_factory=dict)


class LaunchSpec(BaseModel):
    """Everything needed to boot an instance; stored with it so `start` boots it the same way.

    It names the image's artifact, not local files: each provider finds (or stages) the files."""

    image_id: str
    artifact: Artifact = Field(default_factory=Artifact)
    memory_mb: int
    kernel_version: str = ""
    env: dict[str, str] = Field(default_factory=dict)
    args: list[str] | None = None
    hostname: str = ""
    debug_mode: bool = False
    ports: list[PortMapping] = Field(default_factory=list)
    # The instance's own address with prefix ("10.77.0.2/24"), allocated by the daemon: bridge mode.
    address: str = ""
    # Start as a clone of a VM template when the provider has one (RunInstanceRequest.WarmStart).
    warm_start: bool = False
    # The image's ImageMeta.provider_data (its AMI on AWS).
    image_data: dict[str, str] = Field(default_factory=dict)
    # Not stored: volumes come and go after the run, so each boot is told the current ones.
    volumes: list[VolumeAttachment] = Field(default_factory=list, exclude=True)


class InstanceMeta(BaseModel):
    provider: str
    spec: LaunchSpec
    no_cleanup: bool = False
    # Whether a run ever completed: recovery drops a first boot cut short by a crash.
    booted: bool = True


class VolumeMeta(BaseModel):
    provider: str
    fs_type: str
    # What the provider made of the volume elsewhere (an EBS volume and its snapshot).
    provider_data: dict[str, str] = Field(default_factory=dict)
    # Where the attached instance mounts it; None while detached.
    mount: str | None = None
