"""The libvirt provider: instances as libvirt domains on one or more hosts, images staged through the connection."""

from unik.providers.libvirt.config import LibvirtProviderConfig

__all__ = ["LibvirtProviderConfig"]
