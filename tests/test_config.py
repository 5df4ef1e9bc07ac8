"""unik.config: daemon-config.yaml (the original UniK layout) and client-config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unik.config import DaemonConfig, load_daemon_config
from unik.providers.qemu.config import QemuProviderConfig


def qemu(config: DaemonConfig) -> QemuProviderConfig | None:
    found = config.provider_configs().get("qemu")
    assert found is None or isinstance(found, QemuProviderConfig)
    return found


@pytest.fixture(autouse=True)
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read or write the real ~/.unik."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def write(tmp_path: Path, text: str, name: str = "daemon-config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- daemon config --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["none", "absent"])
def test_no_file_gives_the_default_with_one_qemu_provider(tmp_path: Path, where: str) -> None:
    config = load_daemon_config(None if where == "none" else tmp_path / "missing.yaml")

    assert config == DaemonConfig()
    assert len(config.providers["qemu"]) == 1
    assert qemu(config) == QemuProviderConfig()
    assert qemu(config).name == "qemu"
    assert qemu(config).accel == "auto"
    assert config.max_upload_mb == 1024
    assert config.max_unpacked_mb == 4096
    assert config.build_timeout == 600


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "~\n"])
def test_an_empty_file_gives_the_default(tmp_path: Path, text: str) -> None:
    assert load_daemon_config(write(tmp_path, text)) == DaemonConfig()


def test_the_original_unik_layout(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "providers:\n  qemu:\n    - name: my-qemu\n      no_graphic: true\n      debugger_port: 3001\n",
    )

    config = load_daemon_config(path)

    assert qemu(config) is not None
    assert qemu(config).name == "my-qemu"
    assert qemu(config).no_graphic is True
    assert qemu(config).debugger_port == 3001
    assert qemu(config).accel == "auto"  # unspecified fields keep their defaults
    assert len(config.providers["qemu"]) == 1


def test_the_original_layout_in_flow_style(tmp_path: Path) -> None:
    path = write(tmp_path, "providers: {qemu: [{name: my-qemu, no_graphic: true, debugger_port: 3001}]}\n")
    config = load_daemon_config(path)
    assert qemu(config) is not None
    assert (qemu(config).name, qemu(config).no_graphic, qemu(config).debugger_port) == ("my-qemu", True, 3001)


def test_a_kind_written_as_a_single_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  qemu:\n    name: solo\n    accel: tcg\n    machine: q35\n")

    config = load_daemon_config(path)

    assert qemu(config) is not None
    assert len(config.providers["qemu"]) == 1
    assert (qemu(config).name, qemu(config).accel, qemu(config).machine) == ("solo", "tcg", "q35")


def test_the_first_of_several_configurations_is_used(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  qemu:\n    - name: first\n    - name: second\n")
    config = load_daemon_config(path)
    assert [q.name for q in config.providers["qemu"]] == ["first", "second"]
    assert qemu(config) is not None
    assert qemu(config).name == "first"


def test_an_empty_qemu_list_means_no_qemu_provider(tmp_path: Path) -> None:
    config = load_daemon_config(write(tmp_path, "providers:\n  qemu: []\n"))
    assert qemu(config) is None


def test_other_provider_kinds_and_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "providers:\n"
        "  virtualbox:\n    - name: my-vbox\n      adapter_type: host_only\n"
        "  qemu:\n    - name: q\n      some_future_option: 1\n"
        "unknown_top_level: yes\n"
        "max_upload_mb: 10\n"
        "version: '0.9'\n",
    )
    config = load_daemon_config(path)
    assert qemu(config) is not None
    assert qemu(config).name == "q"
    assert config.max_upload_mb == 10
    assert config.version == "0.9"


def test_every_qemu_option_is_read(tmp_path: Path) -> None:
    options = {
        "name": "full",
        "accel": "kvm",
        "machine": "q35",
        "kernel_dir": str(tmp_path / "kernels"),
        "qemu_binary": "/opt/qemu/bin/qemu-system-x86_64",
        "default_memory_mb": 256,
        "max_memory_mb": 1024,
        "stop_timeout": 0,
        "kernel_cmdline": "quiet",
        "debugger_port": 1234,
        "no_graphic": False,
        "network": "bridge",
        "bridge": "br-test",
        "subnet": "10.1.2.0/24",
        "publish_address": "127.0.0.2",
        "dns": "10.1.2.53",
        "kernel": "cloud",
        "firmware": "seabios",
        "tcg_cache_mb": 0,
        "guest_memory": "anonymous",
        "warm_templates": 3,
        "warm_templates_mb": 512,
    }
    path = write(tmp_path, yaml.safe_dump({"providers": {"qemu": [options]}, "build_timeout": 5}))

    config = load_daemon_config(path)

    assert qemu(config) is not None
    dumped = qemu(config).model_dump(mode="json")
    dumped["kernel_dir"] = str(dumped["kernel_dir"])
    assert dumped == options
    assert config.build_timeout == 5


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("providers: {qemu: [{accel: xen}]}\n", "accel"),
        ("providers: {qemu: [{machine: virt}]}\n", "machine"),
        ("providers: {qemu: {default_memory_mb: 0}}\n", "default_memory_mb"),
        ("providers: {qemu: {max_memory_mb: -5}}\n", "max_memory_mb"),
        ("providers: {qemu: {stop_timeout: 601}}\n", "stop_timeout"),
        ("providers: {qemu: {debugger_port: lots}}\n", "debugger_port"),
        ("providers: {qemu: [{name: a}, 7]}\n", "qemu"),
        ("providers: {qemu: 3}\n", "qemu"),
        ("providers: [qemu]\n", "providers"),
        ("max_upload_mb: 0\n", "max_upload_mb"),
        ("max_unpacked_mb: -1\n", "max_unpacked_mb"),
        ("build_timeout: soon\n", "build_timeout"),
    ],
)
def test_bad_values_are_a_value_error_naming_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ValueError) as info:
        load_daemon_config(path)

    message = str(info.value)
    assert str(path) in message
    assert field in message


@pytest.mark.parametrize("text", ["- qemu\n- other\n", "just a string\n", "42\n"])
def test_a_top_level_that_is_not_a_mapping_is_a_value_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="mapping") as info:
        load_daemon_config(path)
    assert str(path) in str(info.value)


def test_broken_yaml_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  qemu: [name: x\n    - : :\n")
    with pytest.raises(ValueError) as info:
        load_daemon_config(path)
    assert str(path) in str(info.value)
