"""EC2's instance metadata service as the source of a disk's run configuration: a raw disk whose
baked /unik/run/net is ``guest.DHCP_IMDS`` boots under TCG on NVMe and virtio-net, as on AWS
Nitro. qemu's user-mode network (its subnet 169.254.0.0/16, so that the metadata address is on
the link) forwards the guest's connections to 169.254.169.254:80 to a relay process, and the relay
to a metadata server of the test's on 127.0.0.1; nothing the test does leaves loopback.

The user-data's volumes are EBS volumes: NVMe disks whose serial is the volume's id, attached
only once the instance runs, so the test hot-plugs one (ACPI PCI hot-plug, over QMP) while the
guest waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, folder_tar_gz, hello_tgz, requires_vm, services_of  # noqa: F401 - a fixture
from tests.test_disk import BOOT_DEADLINE, _boot
from tests.test_export import hello_api  # noqa: F401 - a fixture
from unik import guest, volumes
from unik.artifacts.disk import missing_disk_tools
from unik.kernel import Kernel, default_kernel_root, load
from unik.providers.aws.provider import build_ami_disk
from unik.providers.network import free_port
from unik.providers.qemu.control import qcode, qmp
from unik.providers.qemu.options import Blockdev

needs_disk_tools = pytest.mark.skipif(missing_disk_tools() is not None, reason=f"disk tools: {missing_disk_tools()}")
needs_musl = pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="needs musl-gcc (musl-tools)")

RELAY = Path(__file__).parent / "fixtures" / "tcp_relay.py"
TOKEN_PATH, USER_DATA_PATH = "/latest/api/token", "/latest/user-data"
TTL_HEADER, TOKEN_HEADER = "X-aws-ec2-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token"
USER_DATA = guest.run_config_cpio(env={"GREETING": "from the metadata service", "TICKS": "1"}, hostname="ec2-guest")
# restrict=on: slirp offers no router, so "via 0.0.0.0"; the metadata address is on the link anyway.
DHCP_LINE = re.compile(rb"eth0 has 169\.254\.\d+\.\d+/16 via [\d.]+ by DHCP")
FETCHED_LINE = f"unik: run configuration from the instance metadata service ({len(USER_DATA)} bytes)".encode()
NONE_LINE = b"unik: no user-data in the instance metadata service"
ANY_FETCHED_LINE = b"unik: run configuration from the instance metadata service ("
EXIT_125 = b"unik: exit status 125"
# An EBS volume's NVMe serial: its id without the dash.
EBS_SERIAL = "vol0123456789abcdef0"
VOLUME_TEXT = "written on the host, read in the guest from an NVMe disk plugged in after the boot\n"
GREETED, NOT_GREETED = b"hello from unik: from the metadata service", b"hello from unik: (no GREETING set)"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    client_port: int


@dataclass
class Metadata:
    """What the server answers, and every request it got, in order."""

    user_data: bytes | None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    requests: list[Request] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    """IMDSv2's two routes, as strict as EC2 about the token; HTTP/1.0: one request a connection."""

    server: _Server

    def _record(self) -> Metadata:
        metadata = self.server.metadata
        metadata.requests.append(Request(self.command, self.path, dict(self.headers), self.client_address[1]))
        return metadata

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        metadata = self._record()
        if self.path != TOKEN_PATH:
            self._answer(404)
        elif TTL_HEADER not in self.headers:
            self._answer(400, b"missing the token's ttl")
        else:
            self._answer(200, metadata.token.encode())

    def do_GET(self) -> None:
        metadata = self._record()
        if self.headers.get(TOKEN_HEADER) != metadata.token:
            self._answer(401)
        elif self.path != USER_DATA_PATH or metadata.user_data is None:
            self._answer(404)
        else:
            self._answer(200, metadata.user_data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self, metadata: Metadata) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.metadata = metadata


@contextmanager
def _serving(metadata: Metadata) -> Iterator[int]:
    """The metadata server on a free loopback port, for the block's duration."""
    server = _Server(metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _archive_file(archive: bytes, path: str) -> bytes:
    name = path.encode() + b"\0"
    start = archive.index(name) + len(name)
    start += -(start % -4)  # newc pads the name to 4 bytes
    return archive[start : archive.index(b"070701", start)].rstrip(b"\0")


def _net_file(net: dict[str, str]) -> bytes:
    return _archive_file(guest.run_config_cpio(env={}, net=net), "unik/run/net")


def test_dhcp_imds_is_one_more_line_and_nothing_else_goes() -> None:
    assert _net_file(guest.DHCP_IMDS) == b"address=dhcp\nconfig=imds\n"
    assert _net_file(guest.DHCP) == b"address=dhcp\n"
    static_imds = {"address": "10.0.2.15/24", "config": "imds"}
    for bad in ({"address": "dhcp", "config": "gce"}, static_imds, {"config": "imds"}):
        with pytest.raises(ValueError, match="network config needs"):
            guest.run_config_cpio(env={}, net=bad)


def test_the_mount_timeout_is_whole_seconds_init_accepts() -> None:
    mounts = [(EBS_SERIAL, "/data", "ext4")]
    for seconds in (0, 60, guest.MAX_MOUNT_TIMEOUT):
        archive = guest.run_config_cpio(env={}, mounts=mounts, mount_timeout=seconds)
        assert _archive_file(archive, "unik/run/mount_timeout") == f"{seconds}\n".encode()
    assert b"unik/run/mount_timeout" not in guest.run_config_cpio(env={}, mounts=mounts)
    for bad in (-1, guest.MAX_MOUNT_TIMEOUT + 1):
        with pytest.raises(ValueError, match="mount_timeout"):
            guest.run_config_cpio(env={}, mounts=mounts, mount_timeout=bad)


@pytest.fixture
def disk_kernel() -> Kernel:
    try:
        return load(default_kernel_root(), "disk")
    except FileNotFoundError as exc:
        pytest.skip(f"no disk kernel (`make kernel-disk`): {exc}")


def _imds_raw_disk(api: TestClient, name: str, kernel: Kernel, tmp_path: Path) -> Path:
    """The image on a raw disk with today's init, its network by DHCP and its run configuration
    from the metadata service."""
    ctx = services_of(api).ctx
    image = ctx.store.images.find(name)
    image_initrd = ctx.artifacts.path(image.id, image.meta.artifact, "initrd")
    # The very disk the AWS provider uploads for an AMI.
    return build_ami_disk(image_initrd, kernel, guest.ensure_init_binary(tmp_path), tmp_path)


@pytest.fixture
def imds_disk(hello_api: TestClient, disk_kernel: Kernel, tmp_path: Path) -> Path:  # noqa: F811
    """examples/c-hello, baked without GREETING."""
    return _imds_raw_disk(hello_api, "hello", disk_kernel, tmp_path)


@pytest.fixture
def web_imds_disk(api: TestClient, disk_kernel: Kernel, tmp_path: Path) -> Path:
    """examples/c-http: GET /mount_test serves /data/data.txt, on port 8080."""
    built = api.post("/images/web/create?base=linux&lang=c&provider=qemu",
                     files={"tarfile": ("a.tgz", folder_tar_gz(EXAMPLES / "c-http"))})  # fmt: skip
    assert built.status_code == 201, built.text
    return _imds_raw_disk(api, "web", disk_kernel, tmp_path)


def _ec2_like_vm(disk: Path, console: Path, server_port: int, *, netdev_extra: str = "") -> list[str]:
    # libslirp runs the guestfwd command once per guest connection (the relay's upstream
    # connections show it: one per request), so the relay serves exactly one. restrict=on: the
    # guest reaches nothing but the forward and slirp's own DHCP (and explicit hostfwd rules).
    relay = shlex.join([sys.executable, str(RELAY), "127.0.0.1", str(server_port)]).replace(",", ",,")
    netdev = f"user,id=n0,net=169.254.0.0/16,restrict=on,guestfwd=tcp:169.254.169.254:80-cmd:{relay}{netdev_extra}"
    return [
        "qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "256", "-cpu", "qemu64,+rdrand",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
        "-drive", f"file={disk},format=raw,if=none,id=d0,snapshot=on", "-device", "nvme,drive=d0,serial=unik0",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip


@contextmanager
def _running(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def _await_line(proc: subprocess.Popen[bytes], console: Path, line: bytes, deadline: float) -> float:
    """When (perf_counter) `line` showed on the console; fails if qemu exits first or time runs out."""
    while time.perf_counter() < deadline:
        exited = proc.poll() is not None  # asked first: the VM prints its line, then powers off
        with contextlib.suppress(OSError):
            if line in console.read_bytes():
                return time.perf_counter()
        if exited:
            break
        time.sleep(0.02)
    log = console.read_bytes()[-3000:] if console.exists() else b"(no console output)"
    pytest.fail(f"the console never showed {line!r} (qemu {'exited' if proc.poll() is not None else 'runs'}): {log!r}")


def _user_data(mounts: list[tuple[str, str, str]], mount_timeout: int) -> Metadata:
    return Metadata(guest.run_config_cpio(env={}, mounts=mounts, mount_timeout=mount_timeout))


def _ext4_volume(tmp_path: Path, files: dict[str, str]) -> Path:
    """An ext4 image holding `files`, made as the daemon makes a volume from uploaded data (no root)."""
    folder = tmp_path / "volume-data"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    image = tmp_path / "volume.img"
    upload = io.BytesIO(folder_tar_gz(folder))
    work = tmp_path / "volume-work"
    work.mkdir()
    asyncio.run(volumes.create_from_tar(upload, work, image, "ext4", 0, max_bytes=1 << 30, max_mb=1024))
    return image


async def _attach_like_ebs(qmp_socket: Path, image: Path) -> None:
    """Hot-plug the image as EC2 attaches an EBS volume to a running Nitro instance: an NVMe
    controller whose serial is the volume's id, on the PCI bus (ACPI hot-plug on -M pc)."""
    await qmp(qmp_socket, "ebs-test", "blockdev-add", Blockdev("ebs", image).qmp())
    device = {"driver": "nvme", "drive": "ebs", "serial": EBS_SERIAL, "id": "ebs-nvme"}
    await qmp(qmp_socket, "ebs-test", "device_add", device)


@pytest.mark.vm
@requires_vm
@needs_disk_tools
@needs_musl
def test_the_user_data_is_the_run_configuration(imds_disk: Path, tmp_path: Path) -> None:
    metadata = Metadata(USER_DATA)
    console = tmp_path / "console.log"
    with _serving(metadata) as port:
        _boot(_ec2_like_vm(imds_disk, console, port), console, "IMDS user-data", GREETED)
    log = console.read_bytes()
    assert DHCP_LINE.search(log) and FETCHED_LINE in log, log[-3000:]
    assert b"cannot" not in log, log[-3000:]  # the hostname from the user-data was set, among others
    first, last = metadata.requests[0], metadata.requests[-1]
    assert (first.method, first.path, first.headers[TTL_HEADER]) == ("PUT", TOKEN_PATH, "300")
    assert (last.method, last.path, last.headers[TOKEN_HEADER]) == ("GET", USER_DATA_PATH, metadata.token)
    # One relay, so one upstream connection, per guest connection.
    assert len({r.client_port for r in metadata.requests}) == len(metadata.requests)


@pytest.mark.vm
@requires_vm
@needs_disk_tools
@needs_musl
def test_without_user_data_the_baked_configuration_stays(imds_disk: Path, tmp_path: Path) -> None:
    metadata = Metadata(None)
    console = tmp_path / "console.log"
    with _serving(metadata) as port:
        _boot(_ec2_like_vm(imds_disk, console, port), console, "IMDS without user-data", NOT_GREETED)
    log = console.read_bytes()
    assert DHCP_LINE.search(log) and NONE_LINE in log, log[-3000:]
    assert [(r.method, r.path) for r in metadata.requests] == [("PUT", TOKEN_PATH), ("GET", USER_DATA_PATH)]


@pytest.mark.vm
@requires_vm
@needs_disk_tools
@needs_musl
def test_an_ebs_volume_attached_after_the_boot_is_mounted_before_the_app(web_imds_disk: Path, tmp_path: Path) -> None:
    volume = _ext4_volume(tmp_path, {"data.txt": VOLUME_TEXT})
    metadata = _user_data([(EBS_SERIAL, "/data", "ext4")], mount_timeout=60)
    console, qmp_socket, web_port = tmp_path / "console.log", tmp_path / "qmp.sock", free_port()
    with _serving(metadata) as port:
        argv = _ec2_like_vm(web_imds_disk, console, port, netdev_extra=f",hostfwd=tcp:127.0.0.1:{web_port}-:8080")
        started = time.perf_counter()
        with _running([*argv, "-qmp", f"unix:{qmp_socket},server=on,wait=off"]) as proc:
            fetched = _await_line(proc, console, ANY_FETCHED_LINE, started + BOOT_DEADLINE)
            # Seconds later, as EC2 would: the guest must still be waiting, not have given up.
            time.sleep(2)
            assert EXIT_125 not in console.read_bytes()
            plugged = time.perf_counter()
            asyncio.run(_attach_like_ebs(qmp_socket, volume))
            answer: httpx.Response | None = None
            deadline = plugged + 90
            while time.perf_counter() < deadline and proc.poll() is None and EXIT_125 not in console.read_bytes():
                with contextlib.suppress(httpx.HTTPError):
                    answer = httpx.get(f"http://127.0.0.1:{web_port}/mount_test", timeout=2)
                    if answer.status_code == 200:
                        break
                time.sleep(0.2)
            served = time.perf_counter()
    log = console.read_bytes()
    print(f"\nEBS-like volume: user-data after {fetched - started:.2f} s, plugged at {plugged - started:.2f} s, "
          f"/mount_test answered {served - plugged:.2f} s after the plug")  # fmt: skip
    assert answer is not None and answer.status_code == 200, (answer, log[-3000:])
    assert answer.text == VOLUME_TEXT
    assert EXIT_125 not in log and b"cannot" not in log, log[-3000:]


@pytest.mark.vm
@requires_vm
@needs_disk_tools
@needs_musl
def test_a_volume_that_never_comes_ends_the_boot_after_the_mount_timeout(imds_disk: Path, tmp_path: Path) -> None:
    metadata = _user_data([("vol00000000000000000", "/data", "ext4")], mount_timeout=2)
    console = tmp_path / "console.log"
    with _serving(metadata) as port, _running(_ec2_like_vm(imds_disk, console, port)) as proc:
        started = time.perf_counter()
        fetched = _await_line(proc, console, ANY_FETCHED_LINE, started + BOOT_DEADLINE)
        ended = _await_line(proc, console, EXIT_125, fetched + 60)
    log = console.read_bytes()
    print(f"\nmissing volume: user-data after {fetched - started:.2f} s, status 125 {ended - fetched:.2f} s later")
    assert b"unik: cannot mount volume vol00000000000000000 on /data: no disk with that serial appeared" in log, log
    assert GREETED not in log and NOT_GREETED not in log  # the app never started
    # The wait is the user-data's 2 s, not the default 15 s (the console file is polled: some slack).
    assert 1.5 <= ended - fetched < 10, log[-3000:]


@pytest.mark.vm
@requires_vm
@needs_disk_tools
@needs_musl
def test_a_stop_ends_the_wait_for_a_volume(imds_disk: Path, tmp_path: Path) -> None:
    """A long mount timeout must not make the instance deaf to a graceful stop (ctrl-alt-del: SIGINT)."""
    metadata = _user_data([("vol00000000000000000", "/data", "ext4")], mount_timeout=600)
    console, qmp_socket = tmp_path / "console.log", tmp_path / "qmp.sock"
    with _serving(metadata) as port:
        argv = [*_ec2_like_vm(imds_disk, console, port), "-qmp", f"unix:{qmp_socket},server=on,wait=off"]
        with _running(argv) as proc:
            started = time.perf_counter()
            fetched = _await_line(proc, console, ANY_FETCHED_LINE, started + BOOT_DEADLINE)
            keys = {"keys": [qcode("ctrl"), qcode("alt"), qcode("delete")]}
            asyncio.run(qmp(qmp_socket, "ebs-test", "send-key", keys))
            ended = _await_line(proc, console, EXIT_125, fetched + 30)
    log = console.read_bytes()
    assert b"cannot mount volume vol00000000000000000 on /data: stopped while waiting for its disk" in log, log
    print(f"\nstop while waiting for a volume: status 125 {ended - fetched:.2f} s after the user-data")
