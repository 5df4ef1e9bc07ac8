"""QEMU options as typed values: their spelling, the one quoting rule, and paths with a comma and
a space going through qemu itself and through a whole daemon."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import folder_tar_gz, requires_vm
from unik.client import UnikClient
from unik.providers.qemu import QemuProviderConfig, boot_argv
from unik.providers.qemu.options import (
    Accel,
    Arg,
    Blockdev,
    ChardevFile,
    ChardevSocket,
    Device,
    FwCfg,
    Machine,
    MemoryBackend,
    Name,
    Netdev,
    Qmp,
    Serial,
    flatten,
    format_props,
    quote,
)
from unik.testing import start_daemon

# A comma ends a QEMU option value unless doubled; a space needs nothing (no shell); an `=`
# breaks only the implied-key forms, which the options never use.
ODD = Path("/tmp/a,b c=d/f")
ODD_QUOTED = "/tmp/a,,b c=d/f"
PROBE = Path(__file__).parent / "apps" / "volume-probe"
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)


# ---------------------------------------------------------------- the quoting rule


@pytest.mark.parametrize(
    ("value", "quoted"),
    [("plain", "plain"), ("a,b", "a,,b"), ("a,,b", "a,,,,b"), ("with space", "with space"), ("k=v", "k=v"),
     ("", ""), (True, "on"), (False, "off"), (16, "16"), (ODD, ODD_QUOTED)],
)  # fmt: skip
def test_quote_doubles_commas_and_nothing_else(value: str | bool | int | Path, quoted: str) -> None:
    assert quote(value) == quoted


def test_props_skip_none_repeat_tuples_and_refuse_bad_keys() -> None:
    assert format_props("tcg", {"tb-size": None}) == "tcg"
    assert format_props("user", {"id": "n0", "hostfwd": ("tcp::1-:2", "udp::3-:4")}) == (
        "user,id=n0,hostfwd=tcp::1-:2,hostfwd=udp::3-:4"
    )
    assert format_props(None, {"romfile": ""}) == "romfile="
    for bad in ("a,b", "a=b", ""):
        with pytest.raises(ValueError):
            format_props(None, {bad: "x"})
        with pytest.raises(ValueError):
            format_props(bad, {})
    with pytest.raises(ValueError):
        Serial("a,b").argv()


# ---------------------------------------------------------------- every option that takes a path


def test_every_path_option_quotes_its_path() -> None:
    assert ChardevFile("console", ODD).argv() == ["-chardev", f"file,id=console,path={ODD_QUOTED},append=on"]
    assert ChardevSocket("ctl", ODD).argv() == ["-chardev", f"socket,id=ctl,path={ODD_QUOTED},server=on,wait=off"]
    assert Qmp(ODD).argv() == ["-qmp", f"unix:path={ODD_QUOTED},server=on,wait=off"]
    assert FwCfg("opt/unik/run", ODD).argv() == ["-fw_cfg", f"name=opt/unik/run,file={ODD_QUOTED}"]
    assert Blockdev("vol-1", ODD).argv() == [
        "-blockdev", f"driver=raw,node-name=vol-1,file.driver=file,file.filename={ODD_QUOTED}",
    ]  # fmt: skip


def test_options_qemu_takes_whole_are_not_quoted() -> None:
    assert Arg("-pidfile", ODD).argv() == ["-pidfile", str(ODD)]
    assert Arg("-daemonize").argv() == ["-daemonize"]
    argv = boot_argv(QemuProviderConfig(), "tcg", kernel=ODD / "k", initrd=ODD / "i", memory_mb=64, console=ODD / "c")
    assert argv[argv.index("-kernel") + 1] == f"{ODD}/k"
    assert argv[argv.index("-initrd") + 1] == f"{ODD}/i"
    assert f"file,id=console,path={ODD_QUOTED}/c,append=on" in argv


def test_qmp_arguments_are_json_not_quoted() -> None:
    assert Blockdev("vol-1", ODD).qmp() == {
        "driver": "raw", "node-name": "vol-1", "file": {"driver": "file", "filename": str(ODD)},
    }  # fmt: skip
    device = Device("virtio-blk-pci", {"drive": "vol-1", "id": "disk-1", "serial": "a,b", "rerror": None})
    assert device.qmp() == {"driver": "virtio-blk-pci", "drive": "vol-1", "id": "disk-1", "serial": "a,b"}
    assert device.argv() == ["-device", "virtio-blk-pci,drive=vol-1,id=disk-1,serial=a,,b"]


def test_the_other_kinds_spell_themselves() -> None:
    assert flatten([
        Machine("pc", {"memory-backend": "guest-ram"}),
        MemoryBackend("guest-ram", 64),
        Accel("tcg", {"tb-size": 16}),
        Accel("kvm"),
        Netdev("user", "n0", {"hostfwd": ("tcp:127.0.0.1:8080-:80",)}),
        Device("virtio-balloon-pci", {"free-page-reporting": True}),
        Name("unik-0123"),
        Serial("console"),
    ]) == [
        "-machine", "pc,memory-backend=guest-ram",
        "-object", "memory-backend-memfd,id=guest-ram,size=64M",
        "-accel", "tcg,tb-size=16",
        "-accel", "kvm",
        "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80",
        "-device", "virtio-balloon-pci,free-page-reporting=on",
        "-name", "guest=unik-0123",
        "-serial", "chardev:console",
    ]  # fmt: skip


# ---------------------------------------------------------------- qemu reads them back


@pytest.fixture
def odd_dir() -> Iterator[Path]:
    """A short folder whose name has a comma, a space and an `=` (unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="unik-q,", suffix=" x=y", dir="/tmp"))
    yield path
    for pidfile in path.rglob("qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


async def _qmp_queries(socket: Path) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    from qemu.qmp import QMPClient

    client = QMPClient("unik-test")
    await asyncio.wait_for(client.connect(str(socket)), 10)
    try:
        chardevs = await client.execute("query-chardev")
        nodes = await client.execute("query-named-block-nodes")
    finally:
        # No "quit": qemu closing the socket under disconnect() can surface as an EOFError.
        # The odd_dir fixture kills it through its pidfile.
        await client.disconnect()
    return chardevs, nodes  # type: ignore[return-value]


@needs_qemu
def test_qemu_opens_every_path_option_at_an_odd_path(odd_dir: Path) -> None:
    """qemu itself parses each option: it creates or opens each file at the path as given."""
    (odd_dir / "run.cpio").write_bytes(b"070701")
    disk = odd_dir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    options = [
        Arg("-machine", "pc"), Arg("-accel", "tcg"), Arg("-nodefaults"), Arg("-display", "none"), Arg("-S"),
        ChardevFile("console", odd_dir / "console.log"), Serial("console"),
        ChardevSocket("ctl", odd_dir / "ctl.sock"), Serial("ctl"),
        Qmp(odd_dir / "qmp.sock"),
        FwCfg("opt/unik/run", odd_dir / "run.cpio"),
        Blockdev("vol-1", disk), Device("virtio-blk-pci", {"drive": "vol-1", "id": "disk-1", "serial": "s1"}),
        Arg("-pidfile", odd_dir / "qemu.pid"), Arg("-daemonize"),
    ]  # fmt: skip
    done = subprocess.run(["qemu-system-x86_64", *flatten(options)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int((odd_dir / "qemu.pid").read_text()) > 0
    assert (odd_dir / "console.log").exists() and (odd_dir / "ctl.sock").is_socket()
    chardevs, nodes = asyncio.run(_qmp_queries(odd_dir / "qmp.sock"))
    # A file chardev reports no path: console.log existing where it was asked for is the proof.
    filenames = [str(c["filename"]) for c in chardevs]
    for socket in ("ctl.sock", "qmp.sock"):
        assert any(name.endswith(f":{odd_dir / socket},server=on") for name in filenames), filenames
    assert str(disk) in {str(n["file"]) for n in nodes}, nodes


# ---------------------------------------------------------------- a whole daemon at an odd path


def _wait_for(what: str, check: object, timeout: float = 90.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.vm
@requires_vm
def test_a_daemon_whose_data_dir_has_a_comma_and_a_space(odd_dir: Path, tmp_path: Path) -> None:
    """Build, run (a volume on the command line), read the log, hot-plug a volume, stop, delete."""
    data_dir = odd_dir / "d"
    sources = tmp_path / "probe.tar.gz"
    sources.write_bytes(folder_tar_gz(PROBE))
    boot_data, hot_data = tmp_path / "boot", tmp_path / "hot"
    boot_data.mkdir()
    (boot_data / "data.txt").write_text("at boot\n")
    hot_data.mkdir()
    (hot_data / "in.txt").write_text("plugged in\n")
    daemon = start_daemon(data_dir)
    try:
        with UnikClient(daemon.host) as client:
            client.images.build("probe", sources, "linux", "c", "qemu")
            client.volumes.create("boot", data=boot_data)
            client.volumes.create("hot", data=hot_data)
            instance = client.instances.run("odd", "probe", mounts={"/data": "boot"})
            argv = Path(f"/proc/{int((data_dir / 'instances' / instance.Id / 'qemu.pid').read_text())}/cmdline")
            assert ",," in argv.read_bytes().decode()  # the odd path went through quoting
            _wait_for("the app's line", lambda: "tick 1 data=at boot hot=-" in client.instances.logs("odd"))

            client.volumes.attach("hot", "odd", "/hot")
            _wait_for("the hot volume", lambda: "hot=plugged in" in client.instances.logs("odd"))
            _wait_for("the app's write", lambda: "wrote /hot/out.txt" in client.instances.logs("odd"))
            client.volumes.detach("hot")
            assert client.volumes.get("hot").Attachment == ""

            client.instances.stop("odd")
            assert client.instances.get("odd").State == "stopped"
            client.instances.delete("odd")
            assert not (data_dir / "instances" / instance.Id).exists()
    finally:
        daemon.stop()
