"""Crashes: kill -9 of the daemon in the middle of a build, a run, a volume create and a push;
and a full disk. After a restart on the same data dir nothing half-made is listed, `<data>/tmp`
is empty, VMs that run are re-adopted, and everything works again.

(kill -9 of a qemu, and of the daemon while a VM runs, are in tests/test_e2e.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, Daemon, free_port, instance_meta, requires_vm, tar_gz
from tests.test_e2e import wait_for
from tests.test_hostile import decompression_bomb
from tests.test_hub import S3Hub, image_files, plant_image, s3_hub  # noqa: F401 - s3_hub is a fixture
from unik.client import UnikAPIError, UnikClient
from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel
from unik.models import Instance, InstanceState, now_rfc3339
from unik.providers.qemu.config import QemuProviderConfig
from unik.store import Record, Store

HELLO_C = (EXAMPLES / "c-hello" / "hello.c").read_text()
BUILD = {"base": "linux", "lang": "c", "provider": "qemu"}


def in_background(call: Callable[[], object]) -> threading.Thread:
    """A request whose answer never comes (the daemon dies under it): its error is expected."""

    def swallow() -> None:
        with contextlib.suppress(Exception):
            call()

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    return thread


def processes_under(folder: Path) -> list[int]:
    """Pids of processes working in `folder` (their cwd): what the daemon started for a build."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd").startswith(str(folder)):
                    found.append(int(entry.name))
    return found


def kill_leftovers(folder: Path) -> None:
    for pid in processes_under(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_consistent(client: UnikClient, data_dir: Path) -> None:
    """Nothing half-made: every folder has its record and back, no leftovers, no instance stuck booting."""
    assert list((data_dir / "tmp").iterdir()) == []
    assert {p.name for p in (data_dir / "images").iterdir()} == {i.Id for i in client.images.list()}
    assert {p.name for p in (data_dir / "volumes").iterdir()} == {v.Id for v in client.volumes.list()}
    assert all(i.State in ("running", "stopped") for i in client.instances.list()), client.instances.list()


def restart(daemon: Daemon) -> UnikClient:
    daemon.start()
    return UnikClient(daemon.host)


# -- without a VM: what recovery does with a run cut short --------------------------------------


def _plant_instance(data_dir: Path, name: str, booted: bool | None) -> str:
    instance_id = os.urandom(16).hex()
    meta = instance_meta("gone", **({} if booted is None else {"booted": booted}))
    instance = Instance(Id=instance_id, Name=name, State=InstanceState.pending.value, IpAddress="",
                        ImageId="gone", Infrastructure="QEMU", Created=now_rfc3339())  # fmt: skip
    store = Store(data_dir / "unik.db")
    try:
        store.instances.insert(Record(instance, meta))
    finally:
        store.close()
    (data_dir / "instances" / instance_id).mkdir(parents=True)
    (data_dir / "instances" / instance_id / "console.log").write_text("booting\n")
    return instance_id


def test_a_first_boot_cut_short_is_dropped_a_restart_cut_short_reads_stopped(data_dir: Path) -> None:
    from unik.daemon import build_app

    half_made = _plant_instance(data_dir, "never-answered", booted=False)
    _plant_instance(data_dir, "was-restarting", booted=True)
    _plant_instance(data_dir, "older-record", booted=None)
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        listed = {i["Name"]: i["State"] for i in api.get("/instances").json()}
        assert listed == {"was-restarting": "stopped", "older-record": "stopped"}
        assert api.get("/instances/never-answered").status_code == 404
        # Its files go once the daemon's loop runs.
        wait_for("the half-made instance's files", lambda: not (data_dir / "instances" / half_made).exists(), 30)
        assert api.get("/instances/was-restarting/logs").text == "booting\n"


# -- kill -9 of the daemon: build, run, volume create, push ------------------------------------


@pytest.mark.vm
@requires_vm
def test_kill_during_a_build(client: UnikClient, daemon: Daemon) -> None:
    slow = tar_gz({"hello.c": HELLO_C, "Makefile": "app: hello.c\n\tsleep 20\n\t$(CC) -static -o app hello.c\n"})
    in_background(lambda: client.images.build("slow", _write(daemon.data_dir.parent, slow), **BUILD))
    wait_for("the build's make to run", lambda: bool(processes_under(daemon.data_dir / "tmp")), 60)
    daemon.kill()
    try:
        again = restart(daemon)
        print(f"\nkilled during a build: {len(processes_under(daemon.data_dir))} build processes outlived the daemon")
        assert again.images.list() == []
        assert_consistent(again, daemon.data_dir)
        # The same name builds now, from scratch.
        built = again.images.build("slow", EXAMPLES / "c-hello", **BUILD)
        assert [i.Id for i in again.images.list()] == [built.Id]
        assert_consistent(again, daemon.data_dir)
    finally:
        kill_leftovers(daemon.data_dir)


@pytest.mark.vm
@requires_vm
def test_kill_during_a_run(client: UnikClient, daemon: Daemon) -> None:
    client.images.build("hello", EXAMPLES / "c-hello", **BUILD)
    in_background(lambda: client.instances.run("booting", "hello"))
    # As soon as the record exists: the boot is in flight (or has just finished).
    wait_for("the instance record", lambda: bool(client.instances.list()), 60)
    daemon.kill()
    again = restart(daemon)
    listed = again.instances.list()
    print(f"\nkilled during a run: the instance was {'re-adopted' if listed else 'dropped as half-made'}")
    assert_consistent(again, daemon.data_dir)
    if listed:
        # The VM had come up: it is re-adopted, its app runs and its logs grow.
        assert [(i.Name, i.State) for i in listed] == [("booting", "running")]
        wait_for("the adopted app's ticks", lambda: "tick 2" in again.instances.logs("booting"))
        again.instances.stop("booting")
        assert again.instances.get("booting").State == "stopped"
        again.instances.delete("booting")
    # Either way the name is free for a fresh run, which works.
    fresh = again.instances.run("fresh", "hello")
    assert fresh.State == "running"
    wait_for("the fresh app", lambda: "tick 1" in again.instances.logs("fresh"))
    again.instances.delete("fresh", force=True)
    assert_consistent(again, daemon.data_dir)


def test_kill_during_a_volume_create(client: UnikClient, daemon: Daemon, tmp_path: Path) -> None:
    # A gigabyte of zeros that arrives as one megabyte: the unpacking takes a while.
    big = tmp_path / "big.tar.gz"
    big.write_bytes(decompression_bomb(1024))
    in_background(lambda: client.volumes.create("big", data=big))
    unpacking = daemon.data_dir / "tmp"
    wait_for("the unpacking", lambda: any(p.stat().st_size > 0 for p in unpacking.glob("volume-*/files/*")), 60)
    daemon.kill()
    again = restart(daemon)
    assert again.volumes.list() == []
    assert_consistent(again, daemon.data_dir)
    made = again.volumes.create("big", data=_write(tmp_path, tar_gz({"a.txt": "a\n"})))
    assert [v.Id for v in again.volumes.list()] == [made.Id]
    assert_consistent(again, daemon.data_dir)


def test_kill_during_a_push(client: UnikClient, daemon: Daemon, s3_hub: S3Hub) -> None:  # noqa: F811
    image = plant_image(daemon.data_dir, "heavy", 200 << 20)
    original = image_files(daemon.data_dir, image.Id)
    in_background(lambda: client.images.push("heavy", s3_hub.hub))
    wait_for("bytes on their way", lambda: any(t.Bytes > 0 for t in client.hub.transfers()), 60)
    daemon.kill()
    again = restart(daemon)
    assert [(i.Name, i.Id) for i in again.images.list()] == [("heavy", image.Id)]
    assert again.hub.transfers() == []
    assert_consistent(again, daemon.data_dir)
    # The hub holds the whole image or nothing: a pull of what it lists is intact.
    listed = [i.Name for i in again.hub.search(s3_hub.hub) if i.User == s3_hub.hub.user]
    assert listed in ([], ["heavy"])
    again.images.push("heavy", s3_hub.hub)
    again.images.pull("heavy", s3_hub.hub, provider="qemu", force=True)
    assert image_files(daemon.data_dir, again.images.get("heavy").Id) == original
    assert_consistent(again, daemon.data_dir)


def _write(folder: Path, blob: bytes) -> Path:
    path = folder / f"upload-{os.urandom(4).hex()}.tar.gz"
    path.write_bytes(blob)
    return path


# -- disk full -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 32 MB tmpfs as the data dir: less than one image (the kernel alone is ~50 MB)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = Path(tempfile.mkdtemp(prefix="unik-full-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        kill_leftovers(mountpoint)
        for pidfile in mountpoint.glob("instances/*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        shutil.rmtree(mountpoint, ignore_errors=True)


def _fill(folder: Path, leave_mb: int) -> Path:
    """A file taking all the free space but `leave_mb`."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free - (leave_mb << 20)
    with open(filler, "wb") as f:
        while free > 0:
            block = min(free, 1 << 20)
            f.write(b"\xff" * block)
            free -= block
    return filler


@requires_vm
def test_a_full_disk_is_a_clear_507_and_leaves_nothing(small_disk: Path, tmp_path: Path) -> None:
    daemon = Daemon(small_disk, free_port())
    daemon.start()
    try:
        with UnikClient(daemon.host) as client:
            # The kernel does not fit beside the sources and the initrd: the build fails midway.
            # Room for half the kernel, whichever it is (cloud ~50 MB, micro ~16 MB).
            kernel_mb = load_kernel(default_kernel_root(), QemuProviderConfig().kernel).vmlinux.stat().st_size >> 20
            filler = _fill(small_disk, leave_mb=kernel_mb // 2)
            with pytest.raises(UnikAPIError) as full:
                client.images.build("hello", EXAMPLES / "c-hello", **BUILD)
            assert full.value.status_code == 507, full.value
            assert "disk is full" in full.value.message and "Traceback" not in full.value.message
            assert client.images.list() == []
            assert_consistent(client, small_disk)
            filler.unlink()

            # A volume whose data does not fit any more.
            filler = _fill(small_disk, leave_mb=2)
            data = _write(tmp_path, tar_gz({"random.bin": os.urandom(6 << 20)}))
            with pytest.raises(UnikAPIError) as full:
                client.volumes.create("data", data=data)
            assert full.value.status_code == 507, full.value
            assert "disk is full" in full.value.message
            assert client.volumes.list() == []
            assert_consistent(client, small_disk)

            # Room again: the same request works.
            filler.unlink()
            made = client.volumes.create("data", data=data)
            assert [v.Id for v in client.volumes.list()] == [made.Id]
            assert_consistent(client, small_disk)
    finally:
        daemon.stop()
