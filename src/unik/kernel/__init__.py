"""The guest kernels: Debian's cloud kernel (fetched) and our micro and disk kernels (built), in one cache root.

``layout`` holds the root's layout and ``Kernel``/``load``; ``cloud`` fetches, ``micro`` builds,
``boot`` has the command line and the vmlinux extraction; ``python -m unik.kernel`` drives
``fetch`` and ``build-micro`` (the Makefile's `kernel` and `kernel-micro` targets).
"""

from unik.kernel.boot import BOOT_ARGS, extract_vmlinux
from unik.kernel.cloud import META_PACKAGE, fetch
from unik.kernel.layout import CURRENT, DISK, FLAVOURS, MICRO, Kernel, default_kernel_root, fragment_options, load
from unik.kernel.micro import DISK_BUILD, MICRO_CONFIG, MICRO_LOCALVERSION, MICRO_SOURCE_PACKAGE, build_micro
from unik.kernel.micro import _check_config as _check_config

__all__ = [
    "BOOT_ARGS", "CURRENT", "DISK", "DISK_BUILD", "FLAVOURS", "META_PACKAGE", "MICRO", "MICRO_CONFIG",
    "MICRO_LOCALVERSION", "MICRO_SOURCE_PACKAGE", "Kernel", "build_micro", "default_kernel_root",
    "extract_vmlinux", "fetch", "fragment_options", "load",
]  # fmt: skip
