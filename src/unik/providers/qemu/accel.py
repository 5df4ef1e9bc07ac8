"""The accelerator: whether KVM really works here, which one a provider uses, and its -accel option."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.options import Accel


def kvm_usable() -> tuple[bool, str]:
    """KVM only when the CPU has vmx/svm *and* /dev/kvm creates a VM: the device node alone
    may exist where KVM does not work."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False, "cannot read /proc/cpuinfo"
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    if not flags & {"vmx", "svm"}:
        return False, "the CPU has no vmx/svm flag"
    kvm_get_api_version, kvm_create_vm = 0xAE00, 0xAE01
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    try:
        if fcntl.ioctl(fd, kvm_get_api_version) != 12:
            return False, "unexpected KVM API version"
        vm_fd = fcntl.ioctl(fd, kvm_create_vm, 0)
        os.close(vm_fd)
    except OSError as exc:
        return False, f"KVM_CREATE_VM failed: {exc.strerror}"
    finally:
        os.close(fd)
    return True, "KVM works"


def choose_accel(config: QemuProviderConfig) -> tuple[str, str]:
    """The accelerator ("kvm" or "tcg") and why: "auto" probes, anything else is the config's word."""
    if config.accel == "auto":
        use_kvm, reason = kvm_usable()
        return ("kvm" if use_kvm else "tcg"), reason
    return config.accel, "set in the daemon config"


def accel_option(config: QemuProviderConfig, accel: str, memory_mb: int) -> Accel:
    """-accel, with TCG's translated-code cache sized by the guest's RAM unless the config sizes it."""
    if accel != "tcg":
        return Accel(accel)
    cache_mb = max(16, memory_mb // 8) if config.tcg_cache_mb is None else config.tcg_cache_mb
    return Accel(accel, {"tb-size": cache_mb or None})
