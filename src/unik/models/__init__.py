"""Models: the wire objects of the API, the typed records the store keeps, and typed requests."""

from unik.models.records import (
    KERNEL_INITRD,
    Artifact,
    ArtifactFile,
    ImageMeta,
    InstanceMeta,
    LaunchSpec,
    VolumeAttachment,
    VolumeMeta,
)
from unik.models.requests import (
    AttachVolumeRequest,
    BuildImageRequest,
    CreateVolumeRequest,
    ExportDiskRequest,
    PullImageRequest,
)
from unik.models.wire import (
    DISK_FORMATS,
    NAME_PATTERN,
    DeviceMapping,
    ErrorBody,
    HubConfig,
    HubImage,
    HubTransfer,
    Image,
    ImageFormat,
    ImageRunSpec,
    ImageStageSpec,
    Infrastructure,
    Instance,
    InstanceState,
    Name,
    PortMapping,
    RunInstanceRequest,
    Volume,
    is_valid_name,
    now_rfc3339,
)

__all__ = [
    "DISK_FORMATS", "KERNEL_INITRD", "NAME_PATTERN", "Artifact", "ArtifactFile", "AttachVolumeRequest",
    "BuildImageRequest",
    "CreateVolumeRequest", "DeviceMapping", "ErrorBody", "ExportDiskRequest", "HubConfig", "HubImage",
    "HubTransfer", "Image", "ImageFormat", "ImageMeta", "ImageRunSpec", "ImageStageSpec", "Infrastructure",
    "Instance", "InstanceMeta", "InstanceState", "LaunchSpec", "Name", "PortMapping", "PullImageRequest",
    "RunInstanceRequest", "Volume",
    "VolumeAttachment", "VolumeMeta", "is_valid_name", "now_rfc3339",
]  # fmt: skip
