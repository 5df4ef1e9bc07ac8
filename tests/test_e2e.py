"""End to end: a real daemon process, examples/c-hello built from tar.gz, booted under TCG.

The lifecycle tests run on each provider that boots VMs on this machine (`backend`): qemu,
and libvirt with a private libvirtd reached over qemu+tcp on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLES, Backend, Daemon, requires_vm
from unik.client import UnikAPIError, UnikClient
from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel
from unik.store import Store
from unik.testing import qemu_memory

pytestmark = [pytest.mark.vm, requires_vm]

BOOT_TIMEOUT = 90.0


def wait_for(what: str, check: Callable[[], bool], timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def state(client: UnikClient, name: str) -> str:
    return client.instances.get(name).State


def qemu_pid(data_dir: Path, instance_id: str) -> int:
    return int((data_dir / "instances" / instance_id / "qemu.pid").read_text())


def test_build_run_logs_stop_start_delete(backend: Backend) -> None:
    client = backend.client
    image = client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", backend.provider, args="a b")
    instance = client.instances.run("h1", "hello", env={"GREETING": "hi"}, memory_mb=128)
    assert instance.State == "running"
    assert instance.ImageId == image.Id
    wait_for("the app's first ticks", lambda: "tick 2" in client.instances.logs("h1"))
    logs = client.instances.logs("h1")
    # The program's own output, from inside the VM, with run-time env and build-time args.
    assert "hello from unik: hi\narg 1: a\narg 2: b\ntick 1\n" in logs.replace("\r\n", "\n")

    # Graceful stop: the app gets SIGTERM and says goodbye; the init reports its status.
    first_pid = backend.vm_pid(instance.Id)
    client.instances.stop("h1")
    assert state(client, "h1") == "stopped"
    logs = client.instances.logs("h1").replace("\r\n", "\n")
    assert "goodbye\n" in logs and "unik: exit status 0" in logs
    assert not _alive(first_pid)

    # Start boots the same instance again, with the same configuration; the log is appended.
    client.instances.start("h1")
    assert state(client, "h1") == "running"
    wait_for("the second boot", lambda: client.instances.logs("h1").count("hello from unik: hi") == 2)

    with pytest.raises(UnikAPIError) as refused:
        client.instances.delete("h1")
    assert refused.value.status_code == 409
    pid = backend.vm_pid(instance.Id)
    client.instances.delete("h1", force=True)
    assert client.instances.list() == []
    assert not _alive(pid)
    client.images.delete("hello")
    assert client.images.list() == []


def test_app_exit_is_noticed_and_follow_ends(backend: Backend) -> None:
    client = backend.client
    client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", backend.provider)
    client.instances.run("short", "hello", env={"TICKS": "2"})
    # Following a running instance streams until the VM powers off by itself.
    streamed = "".join(client.instances.follow_logs("short"))
    assert "tick 2" in streamed and "unik: exit status 0" in streamed
    wait_for("state stopped", lambda: state(client, "short") == "stopped", timeout=10)
    # Following a stopped instance returns what there is and ends.
    assert "".join(client.instances.follow_logs("short")) == client.instances.logs("short")


def test_follow_streams_live_and_delete_on_disconnect(backend: Backend) -> None:
    client = backend.client
    client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", backend.provider)
    instance = client.instances.run("live", "hello")
    seen = ""
    # The Go client's request: follow=true and delete=true in the query string.
    url = f"http://{backend.daemon.host}/instances/live/logs?follow=true&delete=true"
    with httpx.stream("GET", url, timeout=httpx.Timeout(10, read=BOOT_TIMEOUT)) as response:
        assert response.status_code == 200
        for chunk in response.iter_text():
            seen += chunk
            if "tick 2" in seen:
                break
    assert "tick 1" in seen
    pid = backend.vm_pid(instance.Id)
    wait_for("the instance to be deleted after the client left", lambda: client.instances.list() == [], timeout=30)
    assert not _alive(pid)


def test_killed_qemu_reads_stopped_and_keeps_logs(backend: Backend) -> None:
    client = backend.client
    client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", backend.provider)
    instance = client.instances.run("victim", "hello")
    wait_for("the app", lambda: "tick 1" in client.instances.logs("victim"))
    os.kill(backend.vm_pid(instance.Id), signal.SIGKILL)
    wait_for("state stopped", lambda: state(client, "victim") == "stopped", timeout=10)
    assert "tick 1" in client.instances.logs("victim")
    client.instances.start("victim")
    wait_for("the restarted app", lambda: client.instances.logs("victim").count("hello from unik") == 2)
    client.instances.delete("victim", force=True)


def test_daemon_restart_readopts_running_vm(backend: Backend) -> None:
    client, daemon = backend.client, backend.daemon
    image = client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", backend.provider)
    instance = client.instances.run("survivor", "hello", env={"GREETING": "still here"})
    wait_for("the app", lambda: "tick 1" in client.instances.logs("survivor"))
    pid = backend.vm_pid(instance.Id)

    daemon.kill()  # kill -9: no chance to tidy up
    assert _alive(pid), "the VM must outlive the daemon"
    daemon.start()

    with UnikClient(daemon.host) as again:
        assert [i.Name for i in again.images.list()] == ["hello"]
        assert again.images.get("hello").Id == image.Id
        assert state(again, "survivor") == "running"
        ticks = again.instances.logs("survivor").count("tick")
        wait_for("logs to keep growing", lambda: again.instances.logs("survivor").count("tick") > ticks)
        again.instances.stop("survivor")
        assert state(again, "survivor") == "stopped"
        assert not _alive(pid)
        assert "unik: exit status 0" in again.instances.logs("survivor")
        again.instances.start("survivor")
        assert state(again, "survivor") == "running"
        again.instances.delete("survivor", force=True)


def test_a_restart_ends_the_vms_no_record_names(client: UnikClient, daemon: Daemon) -> None:
    """VMs outlive the daemon by design; one whose record is lost (a store restored from a
    backup, a record deleted by hand, its folder deleted too) would run unseen for good. The
    next start stops it and removes its files; the others are re-adopted."""
    client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", "qemu")
    names = ("kept", "lost-record", "lost-folder")
    instances = {name: client.instances.run(name, "hello") for name in names}
    pids = {name: qemu_pid(daemon.data_dir, instance.Id) for name, instance in instances.items()}
    daemon.kill()
    try:
        store = Store(daemon.data_dir / "unik.db")
        try:
            for name in ("lost-record", "lost-folder"):
                store.instances.delete(instances[name].Id)
        finally:
            store.close()
        shutil.rmtree(daemon.data_dir / "instances" / instances["lost-folder"].Id)
        daemon.start()
        with UnikClient(daemon.host) as again:
            assert [(i.Name, i.State) for i in again.instances.list()] == [("kept", "running")]
            lost = [pids["lost-record"], pids["lost-folder"]]
            wait_for("the unnamed VMs to end", lambda: not any(_alive(pid) for pid in lost))
            folders = daemon.data_dir / "instances"
            wait_for("their files to go", lambda: [p.name for p in folders.iterdir()] == [instances["kept"].Id])
            assert _alive(pids["kept"])
            again.instances.delete("kept", force=True)
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_an_image_keeps_booting_on_its_own_kernel_after_the_config_changes(daemon: Daemon) -> None:
    """Built with `kernel: cloud`, run after the config went back to micro: the firmware follows
    the image's kernel (qboot, micro's firmware, never reaches the cloud kernel)."""
    try:
        load_kernel(default_kernel_root(), "cloud")
    except FileNotFoundError:
        pytest.skip("no cloud kernel fetched: run `make setup`")
    daemon.stop()
    daemon.start("providers: {qemu: [{kernel: cloud}]}\n")
    with UnikClient(daemon.host) as on_cloud:
        on_cloud.images.build("hello", EXAMPLES / "c-hello", "linux", "c", "qemu")
    daemon.stop()
    daemon.start("providers: {qemu: [{kernel: micro}]}\n")
    with UnikClient(daemon.host) as on_micro:
        on_micro.instances.run("old", "hello", env={"GREETING": "cloud kernel"})
        wait_for("the app", lambda: "hello from unik: cloud kernel" in on_micro.instances.logs("old"))
        on_micro.instances.delete("old", force=True)


def test_cli_walkthrough(daemon: Daemon, tmp_path: Path) -> None:
    """The issue's walk-through, command by command, as a user types it."""
    env = {**os.environ, "UNIK_HOST": daemon.host, "HOME": str(tmp_path)}

    def unik(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "unik.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"unik {' '.join(args)}: {done.stderr}"
        return done.stdout

    assert "linux-c-qemu" in unik("compilers")
    built = unik("build", "--name", "hello", "--path", str(EXAMPLES / "c-hello"), "--base", "linux",
                 "--language", "c", "--provider", "qemu", "--args", "a b")  # fmt: skip
    assert "hello" in built
    unik("run", "--instanceName", "h1", "--imageName", "hello", "--env", "GREETING=hi", "--instanceMemory", "128")
    assert "running" in unik("instances")

    follower = subprocess.Popen(
        [sys.executable, "-m", "unik.cli", "logs", "--instance", "h1", "--follow"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert follower.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    wait_for("followed output", lambda: any("tick 1" in line for line in lines))
    assert any("hello from unik: hi" in line for line in lines)

    unik("stop", "--instance", "h1")
    follower.wait(30)  # the stream ends when the instance stops
    assert any("goodbye" in line for line in lines)
    assert "stopped" in unik("ps")
    unik("start", "--instance", "h1")
    unik("rm", "--instance", "h1", "--force")
    unik("rmi", "--image", "hello")
    assert "hello" not in unik("images")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def test_debug_mode_waits_for_gdb_and_no_cleanup_keeps_files(client: UnikClient, daemon: Daemon) -> None:
    client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", "qemu")
    instance = client.instances.run("dbg", "hello", debug_mode=True, no_cleanup=True)
    assert instance.State == "running"
    daemon_log = (daemon.data_dir / "daemon.log").read_text()
    match = re.search(r"target remote 127\.0\.0\.1:(\d+)", daemon_log)
    assert match, daemon_log
    # qemu's gdb stub answers, and the guest has not run a single instruction yet.
    with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=5):
        pass
    time.sleep(1)
    assert client.instances.logs("dbg") == ""
    client.instances.stop("dbg")  # a paused guest cannot take ctrl-alt-del: it is powered off
    assert state(client, "dbg") == "stopped"
    client.instances.delete("dbg")
    # NoCleanup: the instance's files (console, initrd) stay for inspection.
    assert (daemon.data_dir / "instances" / instance.Id / "boot.initrd").exists()


def test_the_host_gets_back_the_ram_the_guest_frees(client: UnikClient, daemon: Daemon, tmp_path: Path) -> None:
    """Booting leaves the image's files twice in guest RAM: the initrd qemu loaded, and the files
    unpacked from it. The kernel frees the first and reports the pages to qemu's balloon
    (free page reporting), which hands them back to the host: an instance then costs the
    host about one copy of its image, not two."""
    if "linux-python-qemu" not in client.available_compilers():
        pytest.skip("no Python compiler here")
    payload_mib = 48
    (tmp_path / "main.py").write_text("import time\nprint('ready', flush=True)\ntime.sleep(3600)\n")
    (tmp_path / "payload.bin").write_bytes(os.urandom(payload_mib << 20))
    image = client.images.build("big", tmp_path, "linux", "python", "qemu")
    initrd_mib = (daemon.data_dir / "images" / image.Id / "initrd").stat().st_size / (1 << 20)
    memory_mb = int(image.RunSpec.DefaultInstanceMemory)
    instance = client.instances.run("big1", "big")
    wait_for("the app", lambda: "ready" in client.instances.logs("big1"))
    pid = qemu_pid(daemon.data_dir, instance.Id)
    # Two copies would be 2 x initrd; one copy plus the kernel and Python's own use stays far below.
    bound = 2 * initrd_mib - payload_mib / 2
    wait_for(
        f"guest RAM below {bound:.0f} MiB (initrd {initrd_mib:.0f} MiB)",
        lambda: 0 < qemu_memory(pid, memory_mb)["guest_rss"] < bound,
        timeout=60,
    )
    client.instances.delete("big1", force=True)
