"""The QEMU provider: one detached qemu per instance, TCG unless KVM really works."""

from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.provider import SHARED_INITRD_MIN_BYTES, QemuProvider, boot_argv, kvm_usable

__all__ = ["SHARED_INITRD_MIN_BYTES", "QemuProvider", "QemuProviderConfig", "boot_argv", "kvm_usable"]
