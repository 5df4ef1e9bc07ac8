"""The micro kernel's build plumbing, without building a kernel (that is `make kernel-micro`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unik.kernel import MICRO_CONFIG, Kernel, _check_config, fragment_options, load
from unik.kernel import micro as kernel_mod


def test_fragment_is_packaged_and_asks_for_what_init_needs() -> None:
    options = fragment_options(MICRO_CONFIG.read_text())
    # What src/unik/guest/init.c and the qemu provider rely on, built in.
    needed = (
        "PVH VIRTIO_PCI VIRTIO_BLK VIRTIO_NET HOTPLUG_PCI_ACPI EXT4_FS EXT4_USE_FOR_EXT2 VFAT_FS SERIAL_8250 "
        "NLS_CODEPAGE_437 NLS_UTF8 NLS_ASCII DEVTMPFS TMPFS PROC_SYSCTL SERIO_I8042 KEYBOARD_ATKBD VT X86_IOPL_IOPERM"
    )
    for name in needed.split():
        assert options[f"CONFIG_{name}"] == "y", name
    assert options["CONFIG_MODULES"] is None


def test_fragment_options_reads_values_and_unset_lines() -> None:
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="utf8"\n# a comment\nCONFIG_D=437\n'
    assert fragment_options(text) == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": '"utf8"', "CONFIG_D": "437"}


def test_check_config_accepts_a_config_that_has_everything() -> None:
    _check_config("CONFIG_A=y\n# CONFIG_B is not set\n", "CONFIG_A=y\nCONFIG_X=y\n")


def test_check_config_names_every_lost_option() -> None:
    with pytest.raises(RuntimeError) as info:
        _check_config("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n", "CONFIG_B=y\nCONFIG_C=y\n")
    message = str(info.value)
    assert "CONFIG_A: wanted y, got n" in message
    assert "CONFIG_B: wanted n, got y" in message
    assert "CONFIG_C: wanted m, got y" in message


def _fake_micro(root: Path, version: str) -> None:
    folder = root / version
    modules = folder / "lib" / "modules" / version
    modules.mkdir(parents=True)
    for name in ("vmlinux", "vmlinuz"):
        (folder / name).write_bytes(b"x")
    (modules / "modules.dep").write_text("")
    (modules / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\nkernel/fs/fat/vfat.ko\n")
    (root / "micro").symlink_to(version)


def test_micro_flavour_loads_its_own_link_and_needs_no_modules(tmp_path: Path) -> None:
    _fake_micro(tmp_path, "6.1.192-unik-micro-abcdef12")
    kernel = load(tmp_path, "micro")
    assert kernel == Kernel(version="6.1.192-unik-micro-abcdef12", root=tmp_path / "6.1.192-unik-micro-abcdef12")
    assert kernel.module_closure(["virtio_blk", "vfat"]) == []
    with pytest.raises(ValueError, match="unknown kernel module"):
        kernel.module_closure(["nbd"])


def test_a_missing_flavour_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make kernel-micro"):
        load(tmp_path, "micro")
    with pytest.raises(FileNotFoundError, match="make setup"):
        load(tmp_path, "cloud")


def test_build_micro_returns_the_cached_kernel_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_mod, "_source_version", lambda: "6.1.192-3")
    _fake_micro(tmp_path, "6.1.192-unik-micro-abcdef12")
    key = kernel_mod._build_key("6.1.192-3", kernel_mod.MICRO_BUILD)
    (tmp_path / "6.1.192-unik-micro-abcdef12" / "build-key").write_text(key + "\n")

    def no_build(*args: object) -> Kernel:
        raise AssertionError("a cached micro kernel must not be rebuilt")

    monkeypatch.setattr(kernel_mod, "_build_locked", no_build)
    assert kernel_mod.build_micro(tmp_path).version == "6.1.192-unik-micro-abcdef12"


def test_the_build_key_follows_the_source_version_and_the_fragments() -> None:
    key = kernel_mod._build_key
    assert key("6.1.192-3", kernel_mod.MICRO_BUILD) != key("6.1.193-1", kernel_mod.MICRO_BUILD)
    assert key("6.1.192-3", kernel_mod.MICRO_BUILD) != key("6.1.192-3", kernel_mod.DISK_BUILD)


def test_the_disk_kernel_is_the_micro_kernel_plus_drivers_and_a_fast_bzimage() -> None:
    micro = fragment_options(kernel_mod.MICRO_CONFIG.read_text())
    disk = fragment_options(kernel_mod.DISK_CONFIG.read_text())
    assert kernel_mod.DISK_BUILD.fragments == (kernel_mod.MICRO_CONFIG, kernel_mod.DISK_CONFIG)
    assert disk["CONFIG_EFI_STUB"] == "y" and disk["CONFIG_KERNEL_LZ4"] == "y"
    # It overrides only the compression: the bzImage is what a disk boots.
    assert set(disk) & set(micro) == {"CONFIG_KERNEL_XZ"} and disk["CONFIG_KERNEL_XZ"] is None


def test_builds_in_reads_the_kernels_config(tmp_path: Path) -> None:
    (tmp_path / "config").write_text("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\n")
    kernel = Kernel(version="x", root=tmp_path)
    assert kernel.builds_in("CONFIG_A")
    assert not kernel.builds_in("CONFIG_B")  # a module is not built in
    assert not kernel.builds_in("CONFIG_C")
    assert not kernel.builds_in("CONFIG_D")
    assert not Kernel(version="y", root=tmp_path / "none").builds_in("CONFIG_A")
