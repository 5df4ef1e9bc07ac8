"""The AWS provider's config: where instances run, as `providers: {aws: [{...}]}` names it."""

from __future__ import annotations

from pydantic import Field

from unik.providers.base import ProviderConfig


class AwsProviderConfig(ProviderConfig):
    region: str = "us-east-1"
    # An EC2- and EBS-compatible endpoint instead of AWS's (a private cloud, or tests' moto).
    endpoint_url: str | None = None
    subnet_id: str | None = None
    # Where EBS volumes are made and instances placed (they must share a zone): default the
    # subnet's zone, else the region's first ("a").
    availability_zone: str | None = None
    security_group_ids: list[str] = Field(default_factory=list)
    instance_type: str = "t3.micro"
    key_name: str | None = None
    # Added to every instance, volume, snapshot and AMI the daemon makes (beside its own unik:*).
    tags: dict[str, str] = Field(default_factory=dict)
    # Parallel EBS direct-API uploads of a disk's blocks.
    upload_threads: int = Field(default=8, gt=0, le=64)
    # How long a stop or start may take before the API call gives up (the instance goes on).
    state_timeout: float = Field(default=600.0, gt=0)
    # EC2 is asked for the state of all the daemon's instances at most this often.
    describe_interval: float = Field(default=2.0, gt=0)
    # An instance's console (get_console_output) is fetched at most this often.
    console_interval: float = Field(default=5.0, ge=0)
    # How long the guest waits at boot for its EBS volumes, which EC2 attaches only once the
    # instance runs.
    volume_wait: int = Field(default=180, gt=0, le=3600)
