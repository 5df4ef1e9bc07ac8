"""Volumes inside real VMs: mounted at boot, hot-attached and detached, data safe on the host.
The tests that take `backend` run on qemu and on libvirt (a private libvirtd)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Backend, Daemon, requires_vm
from tests.test_e2e import qemu_pid, state, wait_for
from unik.client import UnikAPIError, UnikClient

pytestmark = [pytest.mark.vm, requires_vm]

PROBE = Path(__file__).parent / "apps" / "volume-probe"


def folder(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    path = tmp_path / name
    path.mkdir()
    for file, text in files.items():
        (path / file).write_text(text)
    return path


def disk(daemon: Daemon, client: UnikClient, volume: str) -> Path:
    return daemon.data_dir / "volumes" / client.volumes.get(volume).Id / "disk.img"


def create(backend: Backend, name: str, data: Path) -> None:
    backend.client.volumes.create(name, provider=backend.provider, data=data)


def read_back(image: Path, path: str) -> str:
    """Read a file from an ext filesystem image on the host, without mounting it."""
    done = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True, check=True)
    return done.stdout


def logs_after(client: UnikClient, instance: str, offset: int) -> str:
    return client.instances.logs(instance)[offset:]


def expect_error(status: int, call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(UnikAPIError) as error:
        call(*args, **kwargs)  # type: ignore[operator]
    assert error.value.status_code == status, error.value
    return str(error.value)


@pytest.fixture
def probe(client: UnikClient) -> str:
    client.images.build("probe", PROBE, "linux", "c", "qemu", mounts=["/data"])
    return "probe"


@pytest.fixture
def probe_on(backend: Backend) -> str:
    backend.client.images.build("probe", PROBE, "linux", "c", backend.provider, mounts=["/data"])
    return "probe"


def test_mount_at_boot_then_hot_attach_and_detach(backend: Backend, probe_on: str, tmp_path: Path) -> None:
    client, daemon, probe = backend.client, backend.daemon, probe_on
    create(backend, "boot", folder(tmp_path, "boot", {"data.txt": "from the boot volume\n"}))
    create(backend, "hot", folder(tmp_path, "hot", {"in.txt": "plugged in later\n"}))
    assert "/data" in expect_error(400, client.instances.run, "p1", probe)  # the image needs /data
    instance = client.instances.run("p1", probe, mounts={"/data": "boot"})
    assert client.volumes.get("boot").Attachment == instance.Id
    wait_for("the boot volume's file", lambda: "data=from the boot volume" in client.instances.logs("p1"))

    if backend.provider == "qemu":
        # A request cut off mid-line (a daemon killed while it talked to the guest) leaves a
        # fragment on the control channel; the next request must not be confused by it.
        with socket.socket(socket.AF_UNIX) as control:
            control.connect(str(daemon.data_dir / "instances" / instance.Id / "ctl.sock"))
            control.sendall(b"0badc0ffee umount /da")

    # Hot-attach: the guest mounts it without a reboot and the app reads (and writes) it.
    assert client.volumes.attach("hot", "p1", "/hot") == "hot"
    assert client.volumes.get("hot").Attachment == instance.Id
    wait_for("the hot volume's file", lambda: "hot=plugged in later" in client.instances.logs("p1"))
    wait_for("the app's write", lambda: "wrote /hot/out.txt" in client.instances.logs("p1"))

    # Detach: unmounted by the guest first, so the host reads what the guest wrote.
    assert client.volumes.detach("hot") == "hot"
    assert client.volumes.get("hot").Attachment == ""
    offset = len(client.instances.logs("p1"))
    wait_for("the guest to lose /hot", lambda: "hot=-" in logs_after(client, "p1", offset))
    assert read_back(disk(daemon, client, "hot"), "/out.txt") == "written by the guest\n"
    assert "uptime" not in client.instances.logs("p1")  # no reboot happened
    assert client.instances.logs("p1").count("tick 1 ") == 1

    # Stop: the guest syncs and unmounts; the boot volume stays attached for the next start.
    client.instances.stop("p1")
    assert client.volumes.get("boot").Attachment == instance.Id
    client.instances.start("p1")
    wait_for("the second boot", lambda: client.instances.logs("p1").count("tick 1 data=from the boot volume") == 2)

    # Deleting the instance detaches its volumes; their data stays.
    client.instances.delete("p1", force=True)
    assert client.volumes.get("boot").Attachment == ""
    assert read_back(disk(daemon, client, "boot"), "/data.txt") == "from the boot volume\n"


def test_busy_volume_cannot_be_detached(backend: Backend, probe_on: str, tmp_path: Path) -> None:
    client, probe = backend.client, probe_on
    create(backend, "boot", folder(tmp_path, "boot", {"data.txt": "x\n"}))
    create(backend, "held", folder(tmp_path, "held", {"hold": "kept open\n", "in.txt": "held\n"}))
    client.instances.run("p2", probe, mounts={"/data": "boot"})
    wait_for("the app", lambda: "tick 1" in client.instances.logs("p2"))
    client.volumes.attach("held", "p2", "/hot")
    wait_for("the app to hold the file", lambda: "holding /hot/hold" in client.instances.logs("p2"))
    assert "busy" in expect_error(409, client.volumes.detach, "held")
    # Still attached and still mounted in the guest.
    instance_id = client.instances.get("p2").Id
    assert client.volumes.get("held").Attachment == instance_id
    offset = len(client.instances.logs("p2"))
    wait_for("another tick", lambda: "tick" in logs_after(client, "p2", offset))
    assert "hot=held" in logs_after(client, "p2", offset)
    # A volume in use cannot go to another instance, nor be deleted without force.
    expect_error(409, client.volumes.attach, "held", "p2", "/other")
    expect_error(409, client.volumes.delete, "held")
    client.instances.delete("p2", force=True)
    client.volumes.delete("held")


def test_data_survives_a_forced_kill_after_sync(client: UnikClient, daemon: Daemon, probe: str, tmp_path: Path) -> None:
    client.volumes.create("boot", data=folder(tmp_path, "boot", {"data.txt": "x\n"}))
    client.volumes.create("scratch", data=folder(tmp_path, "scratch", {"in.txt": "go\n"}))
    instance = client.instances.run("p3", probe, mounts={"/data": "boot", "/hot": "scratch"})
    wait_for("the app's synced write", lambda: "wrote /hot/out.txt" in client.instances.logs("p3"))
    os.kill(qemu_pid(daemon.data_dir, instance.Id), signal.SIGKILL)
    wait_for("state stopped", lambda: state(client, "p3") == "stopped", timeout=10)
    assert read_back(disk(daemon, client, "scratch"), "/out.txt") == "written by the guest\n"
    # Force-deleting an attached volume detaches it first.
    client.volumes.delete("scratch", force=True)
    assert [v.Name for v in client.volumes.list()] == ["boot"]


def test_attach_to_a_stopped_instance_mounts_at_next_start(backend: Backend, probe_on: str, tmp_path: Path) -> None:
    client, probe = backend.client, probe_on
    create(backend, "boot", folder(tmp_path, "boot", {"data.txt": "x\n"}))
    create(backend, "later", folder(tmp_path, "later", {"in.txt": "attached while stopped\n"}))
    client.instances.run("p4", probe, mounts={"/data": "boot"})
    expect_error(409, client.instances.run, "p5", probe, mounts={"/data": "boot"})  # attached to p4
    assert [i.Name for i in client.instances.list()] == ["p4"]
    client.instances.stop("p4")
    client.volumes.attach("later", "p4", "/hot")
    client.instances.start("p4")
    wait_for("the volume at the next boot", lambda: "hot=attached while stopped" in client.instances.logs("p4"))
    client.instances.delete("p4", force=True)


def test_attach_right_after_run_while_the_guest_boots(backend: Backend, probe_on: str, tmp_path: Path) -> None:
    # The mount request reaches the guest before its init has opened the control port; the
    # daemon repeats it until answered (the guest runs it once).
    client, probe = backend.client, probe_on
    create(backend, "boot", folder(tmp_path, "boot", {"data.txt": "x\n"}))
    create(backend, "early", folder(tmp_path, "early", {"in.txt": "there from the start\n"}))
    client.instances.run("p6", probe, mounts={"/data": "boot"})
    client.volumes.attach("early", "p6", "/hot")
    wait_for("the early volume", lambda: "hot=there from the start" in client.instances.logs("p6"))
    client.instances.delete("p6", force=True)
