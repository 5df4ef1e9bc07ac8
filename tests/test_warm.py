"""Warm starts: a warm run becomes a VM template once its app listens, and later warm runs of the
same image, Env and memory start as clones of it, each its own machine (ports, hostname,
random state, clock), through stop/start; templates follow their key and their image."""

from __future__ import annotations

import json
import os
import time
from ipaddress import IPv4Network
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLES, requires_vm, wait_for_log
from tests.test_network import bridge_daemon, guest_get, netns  # noqa: F401 - fixtures
from unik.artifacts import ArtifactStore
from unik.client import UnikClient
from unik.models import Instance, LaunchSpec, VolumeAttachment
from unik.providers.base import ProviderContext
from unik.providers.network import free_port, mac_address
from unik.providers.qemu import QemuProvider
from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.templates import TemplateStore, qemu_fingerprint, template_key
from unik.testing import DaemonProcess as Daemon
from unik.testing import NetworkNamespace

TEMPLATE_DEADLINE = 90.0


def templates_of(data_dir: Path) -> list[Path]:
    return templates_of_root(data_dir / "templates")


def templates_of_root(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def eventually_templates(data_dir: Path, count: int) -> list[Path]:
    deadline = time.monotonic() + TEMPLATE_DEADLINE
    while time.monotonic() < deadline:
        found = templates_of(data_dir)
        if len(found) == count and all((t / "meta.json").is_file() for t in found):
            return found
        time.sleep(0.2)
    raise AssertionError(f"expected {count} VM templates, found {templates_of(data_dir)}")


def warm_run(client: UnikClient, name: str, key: str) -> tuple[Instance, int]:
    """A warm run of `web` with KEY=key and port 8080 published: (the instance, its port)."""
    port = free_port()
    ports = [{"HostPort": port, "GuestPort": 8080}]
    return client.instances.run(name, "web", env={"KEY": key}, ports=ports, warm_start=True), port


def answer(port: int, path: str, timeout: float = 60.0) -> httpx.Response:
    """The app's answer; a fresh VM's port may accept before the app does, hence short tries."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.vm
@requires_vm
def test_clones_of_one_template_are_machines_of_their_own(
    client: UnikClient, daemon: Daemon, data_dir: Path, tmp_path: Path
) -> None:
    client.images.build("web", EXAMPLES / "c-http", "linux", "c", "qemu")
    first, first_port = warm_run(client, "first", "one")
    assert not first.StartedWarm  # no template yet: it boots, and becomes the template
    assert answer(first_port, "/env_test").text == "one"
    (template,) = eventually_templates(data_dir, 1)

    clones = {}
    for name in ("clone-a", "clone-b"):
        instance, port = warm_run(client, name, "one")
        assert instance.StartedWarm, instance
        clones[name] = port
    identities = {}
    for name, port in clones.items():
        assert answer(port, "/env_test").text == "one"
        identities[name] = answer(port, "/identity_test").json()
        assert identities[name]["hostname"] == name
        assert abs(identities[name]["time"] - time.time()) < 5, identities[name]  # its clock, not the template's
    identities["first"] = answer(first_port, "/identity_test").json()
    assert len({i["random"] for i in identities.values()}) == 3, identities  # the CRNG reseeded in each
    # A clone's console is its own: the template's boot lines are not in it.
    assert "listening on port" not in client.instances.logs("clone-a")

    client.instances.stop("clone-a")
    client.instances.start("clone-a")
    restarted = client.instances.get("clone-a")
    assert restarted.StartedWarm and restarted.State == "running"
    assert answer(clones["clone-a"], "/identity_test").json()["hostname"] == "clone-a"

    # Another Env is another template; the same one found the existing template.
    other, other_port = warm_run(client, "other-env", "two")
    assert not other.StartedWarm
    assert answer(other_port, "/env_test").text == "two"
    assert template in eventually_templates(data_dir, 2)

    client.images.delete("web", force=True)
    assert templates_of(data_dir) == []


@pytest.mark.vm
@requires_vm
def test_a_warm_app_that_never_listens_is_templated_after_its_first_line(
    client: UnikClient, data_dir: Path
) -> None:
    client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", "qemu")
    assert not client.instances.run("h1", "hello", env={"GREETING": "warm"}, warm_start=True).StartedWarm
    eventually_templates(data_dir, 1)
    assert client.instances.run("h2", "hello", env={"GREETING": "warm"}, warm_start=True).StartedWarm
    # The clone goes on from where the template was: ticking, without greeting again.
    logs = wait_for_log(client, "h2", "tick", 30)
    assert "hello from unik" not in logs


@pytest.mark.vm
@requires_vm
def test_bridged_clones_get_their_own_address_and_mac(
    bridge_daemon: tuple[Daemon, str, IPv4Network],  # noqa: F811
    netns: NetworkNamespace,  # noqa: F811
    data_dir: Path,
) -> None:
    daemon, _, _ = bridge_daemon
    with UnikClient(daemon.host) as client:
        client.images.build("web", EXAMPLES / "c-http", "linux", "c", "qemu")
        instances = [client.instances.run("first", "web", env={"KEY": "bridged"}, warm_start=True)]
        eventually_templates(data_dir, 1)
        for name in ("clone-a", "clone-b"):
            instances.append(client.instances.run(name, "web", env={"KEY": "bridged"}, warm_start=True))
        assert [i.StartedWarm for i in instances] == [False, True, True]
        assert len({i.IpAddress for i in instances}) == 3
        for instance in instances:
            identity = guest_get(netns, instance.IpAddress, "/identity_test").json()
            assert identity["hostname"] == instance.Name
            neighbour = netns.ip("-j", "neigh", "show", instance.IpAddress).stdout
            assert mac_address(instance.Id) in neighbour, neighbour  # its own MAC on the link


# ---------------------------------------------------------------- no VM


def _spec(**changes: object) -> LaunchSpec:
    return LaunchSpec(image_id="i" * 32, memory_mb=128, env={"KEY": "v"}, kernel_version="k").model_copy(
        update=changes
    )


def test_the_key_follows_what_a_clone_shares_and_not_what_is_its_own() -> None:
    base = template_key(_spec(), "fp")
    assert template_key(_spec(hostname="other", ports=[], address="10.0.0.9/24"), "fp") == base
    for changed in (_spec(env={"KEY": "w"}), _spec(memory_mb=256), _spec(args=["x"]), _spec(kernel_version="k2")):
        assert template_key(changed, "fp") != base
    assert template_key(_spec(), "another qemu") != base


def test_a_new_qemu_binary_changes_the_fingerprint(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"v1")
    before = qemu_fingerprint(str(qemu), "{}")
    assert qemu_fingerprint(str(qemu), "{}") == before
    assert qemu_fingerprint(str(qemu), '{"machine": "q35"}') != before
    qemu.write_bytes(b"v2!")
    os.utime(qemu, ns=(1, 1))
    assert qemu_fingerprint(str(qemu), "{}") != before


def _fake_template(store: TemplateStore, key: str, *, image_id: str = "img", fingerprint: str = "fp") -> Path:
    work = store.work_dir(key)
    (work / "ram").write_bytes(b"r" * 4096)
    (work / "state").write_bytes(b"s")
    return store.publish(work, key, image_id=image_id, fingerprint=fingerprint).folder


def test_templates_of_another_qemu_and_cut_short_captures_are_removed_at_start(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path, max_count=8, max_mb=100)
    kept = _fake_template(store, "a" * 32)
    stale = _fake_template(store, "b" * 32, fingerprint="old qemu")
    half = store.work_dir("c" * 32)
    store.clean("fp")
    assert kept.is_dir() and not stale.exists() and not half.exists()
    assert store.find("a" * 32) is not None and store.find("b" * 32) is None


def test_templates_are_bounded_and_go_with_their_image(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path, max_count=2, max_mb=100)
    oldest = _fake_template(store, "a" * 32)
    os.utime(oldest / "meta.json", (1, 1))
    _fake_template(store, "b" * 32, image_id="other")
    _fake_template(store, "c" * 32)
    assert sorted(p.name for p in templates_of_root(tmp_path)) == ["b" * 32, "c" * 32]
    store.remove_image("img")
    assert [p.name for p in templates_of_root(tmp_path)] == ["b" * 32]


def test_a_warm_run_with_volumes_or_debug_mode_boots_cold(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    provider = QemuProvider(QemuProviderConfig(), ProviderContext(data_dir, ArtifactStore(data_dir / "images")))
    volume = VolumeAttachment(serial="s1", path=str(data_dir / "v.img"), mount="/data", fs_type="ext4")
    caplog.set_level("INFO", logger="unik.providers.qemu.warm")
    assert provider.warm.key("x", _spec(warm_start=True)) is not None
    assert provider.warm.key("x", _spec(warm_start=False)) is None
    assert provider.warm.key("x", _spec(warm_start=True, volumes=[volume])) is None
    assert "boots cold: it has volumes at boot" in caplog.text
    assert provider.warm.key("x", _spec(warm_start=True, debug_mode=True)) is None


def test_template_meta_names_its_image(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path, max_count=8, max_mb=100)
    folder = _fake_template(store, "d" * 32, image_id="the-image")
    assert json.loads((folder / "meta.json").read_text())["image_id"] == "the-image"
