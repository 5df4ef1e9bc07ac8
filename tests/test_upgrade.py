"""A data dir written by the release before typed records (tests/fixtures/datadir-v0, made by
its make.py with that release's code) opens in today's daemon and keeps working: the same
lists, and its stopped instance boots again with its env, memory and volume."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Daemon, free_port, requires_vm, wait_for_log
from unik.client import UnikClient
from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel
from unik.store import Store
from unik.store.migrations import VERSION as SCHEMA_VERSION

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "datadir-v0"
IMAGE_ID = "fa59f9422d304e4a970b108518b9276d"
INSTANCE_ID = "87f91037d4264a07b763be41496afe36"
DATA_VOLUME_ID = "759b06110c494f44ba57c7192eaf81bf"
SPARE_VOLUME_ID = "7ff9546838a5483e94dcd8c933df52dd"
FIXTURE_KERNEL = "6.1.192-unik-micro-4bb70341"
BOOT_WAIT = 180.0


def v0_store(data_dir: Path) -> Path:
    db = data_dir / "unik.db"
    with sqlite3.connect(db) as connection:
        connection.executescript((FIXTURE / "unik.sql").read_text())
    return db


def v0_data_dir(data_dir: Path, kernel: Path) -> None:
    """The fixture's store and files, as the old release left them (its paths were elsewhere)."""
    v0_store(data_dir)
    image = data_dir / "images" / IMAGE_ID
    image.mkdir(parents=True)
    shutil.copyfile(FIXTURE / "initrd", image / "initrd")
    shutil.copyfile(kernel, image / "kernel")
    for volume_id, fs_type, size_mb in ((DATA_VOLUME_ID, "ext2", 8), (SPARE_VOLUME_ID, "fat", 4)):
        disk = data_dir / "volumes" / volume_id / "disk.img"
        disk.parent.mkdir(parents=True)
        with open(disk, "wb") as out:
            out.truncate(size_mb << 20)
        command = ["mkfs.fat", str(disk)] if fs_type == "fat" else ["mkfs.ext2", "-q", "-F", str(disk)]
        subprocess.run(command, check=True, capture_output=True)


def test_a_v0_store_migrates_to_typed_records(tmp_path: Path) -> None:
    store = Store(v0_store(tmp_path))
    assert store.schema_version() == SCHEMA_VERSION
    image = store.images.find("hello")
    assert image.meta.args == ["a", "b"] and image.meta.kernel_version == FIXTURE_KERNEL
    assert image.meta.artifact.names == ["kernel", "initrd"]
    assert image.obj.StageSpec.DiskFormats == ["raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi"]  # v2
    instance = store.instances.find("hello-1")
    spec = instance.meta.spec
    assert (spec.image_id, spec.memory_mb, spec.env) == (IMAGE_ID, 96, {"GREETING": "from v0"})
    assert [(p.HostPort, p.GuestPort, p.Protocol) for p in spec.ports] == [(18093, 8080, "tcp")]
    assert store.volumes.find("data").meta.mount == "/data"
    assert store.volumes.find("spare").meta.fs_type == "fat"
    # Nothing names the old data dir's paths any more: the data dir can move.
    for table in ("images", "instances", "volumes"):
        for (meta,) in store.query(f"SELECT meta FROM {table}"):
            assert "/tmp/v0-data" not in meta, json.loads(meta)
    store.close()
    assert Store(tmp_path / "unik.db").schema_version() == SCHEMA_VERSION  # a second open is a no-op


def test_a_store_from_a_newer_daemon_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "unik.db"
    Store(db).close()
    with sqlite3.connect(db) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(Exception, match="newer"):
        Store(db)


@pytest.mark.vm
@requires_vm
def test_a_v0_data_dir_keeps_working_after_the_upgrade(data_dir: Path) -> None:
    # The micro kernel has everything built in, so the fixture's initrd (which carries no
    # modules) boots on whichever micro build the cache holds.
    v0_data_dir(data_dir, load_kernel(default_kernel_root(), "micro").vmlinux)
    daemon = Daemon(data_dir, free_port())
    daemon.start()
    try:
        with UnikClient(daemon.host) as client:
            assert [(i.Name, i.Id) for i in client.images.list()] == [("hello", IMAGE_ID)]
            assert [(i.Name, i.State, i.Id) for i in client.instances.list()] == [("hello-1", "stopped", INSTANCE_ID)]
            volumes = {v.Name: v.Attachment for v in client.volumes.list()}
            assert volumes == {"data": INSTANCE_ID, "spare": ""}

            client.instances.start("hello-1")
            assert client.instances.get("hello-1").State == "running"
            logs = wait_for_log(client, "hello-1", "tick 1", BOOT_WAIT)
            assert "hello from unik: from v0" in logs
            assert "arg 1: a" in logs and "arg 2: b" in logs  # the image's default args, kept from v0
            client.instances.stop("hello-1")
            assert client.volumes.detach("data")
            client.instances.delete("hello-1")
            client.images.delete("hello")
            client.volumes.delete("data")
            assert client.instances.list() == [] and client.images.list() == []
            assert [v.Name for v in client.volumes.list()] == ["spare"]
    finally:
        daemon.stop()
