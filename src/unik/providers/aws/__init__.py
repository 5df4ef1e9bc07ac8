"""The AWS EC2 provider: images as AMIs (EBS direct-API snapshots), instances on EC2."""

from unik.providers.aws.config import AwsProviderConfig

__all__ = ["AwsProviderConfig"]
