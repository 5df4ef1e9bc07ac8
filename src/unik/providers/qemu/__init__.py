"""The QEMU provider: one detached qemu per instance, TCG unless KVM really works.

Modules: config (its daemon-config entry), accel (KVM or TCG), options (QEMU options as typed
values), boot (the machine: boot_argv), control (QMP, disk hot-plug, the guest's control
channel), processes (instance folders and their qemu processes), staging (an instance's boot
files), provider (QemuProvider).
"""

from unik.providers.qemu.accel import kvm_usable
from unik.providers.qemu.boot import boot_argv
from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.provider import QemuProvider
from unik.providers.qemu.staging import SHARED_INITRD_MIN_BYTES

__all__ = ["SHARED_INITRD_MIN_BYTES", "QemuProvider", "QemuProviderConfig", "boot_argv", "kvm_usable"]
