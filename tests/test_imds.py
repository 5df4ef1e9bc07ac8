"""EC2's instance metadata service as the source of a disk's run configuration: a raw disk whose
baked /unik/run/net is ``guest.DHCP_IMDS`` boots under TCG on NVMe and virtio-net, as on AWS
Nitro. qemu's user-mode network (its subnet 169.254.0.0/16, so that the metadata address is on
the link) forwards the guest's connections to 169.254.169.254:80 to a relay process, and the relay
to a metadata server of the test's on 127.0.0.1; nothing the test does leaves loopback."""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import hello_tgz, requires_vm, services_of  # noqa: F401 - hello_tgz is a fixture
from tests.test_disk import _boot
from tests.test_export import hello_api  # noqa: F401 - a fixture
from unik import guest
from unik.artifacts.disk import build_raw_disk, missing_disk_tools
from unik.kernel import BOOT_ARGS, Kernel, default_kernel_root, load

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


def _net_file(net: dict[str, str]) -> bytes:
    archive = guest.run_config_cpio(env={}, net=net)
    name = b"unik/run/net\0"
    start = archive.index(name) + len(name)
    start += -(start % -4)  # newc pads the name to 4 bytes
    return archive[start : archive.index(b"070701", start)].rstrip(b"\0")


def test_dhcp_imds_is_one_more_line_and_nothing_else_goes() -> None:
    assert _net_file(guest.DHCP_IMDS) == b"address=dhcp\nconfig=imds\n"
    assert _net_file(guest.DHCP) == b"address=dhcp\n"
    static_imds = {"address": "10.0.2.15/24", "config": "imds"}
    for bad in ({"address": "dhcp", "config": "gce"}, static_imds, {"config": "imds"}):
        with pytest.raises(ValueError, match="network config needs"):
            guest.run_config_cpio(env={}, net=bad)


@pytest.fixture
def disk_kernel() -> Kernel:
    try:
        return load(default_kernel_root(), "disk")
    except FileNotFoundError as exc:
        pytest.skip(f"no disk kernel (`make kernel-disk`): {exc}")


@pytest.fixture
def imds_disk(hello_api: TestClient, disk_kernel: Kernel, tmp_path: Path) -> Path:  # noqa: F811
    """examples/c-hello on a raw disk with today's init, baked without GREETING, its network by
    DHCP and its run configuration from the metadata service."""
    ctx = services_of(hello_api).ctx
    image = ctx.store.images.find("hello")
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as out:
        out.write(ctx.artifacts.path(image.id, image.meta.artifact, "initrd").read_bytes())
        out.write(guest.modules_cpio([], init_binary=guest.ensure_init_binary(tmp_path)))
        out.write(guest.run_config_cpio(env={}, net=guest.DHCP_IMDS))
    disk = tmp_path / "disk.raw"
    build_raw_disk(disk_kernel.bzimage, initrd, " ".join(BOOT_ARGS), disk)
    return disk


def _ec2_like_vm(disk: Path, console: Path, server_port: int) -> list[str]:
    # libslirp runs the guestfwd command once per guest connection (the relay's upstream
    # connections show it: one per request), so the relay serves exactly one. restrict=on: the
    # guest reaches nothing but the forward and slirp's own DHCP.
    relay = shlex.join([sys.executable, str(RELAY), "127.0.0.1", str(server_port)]).replace(",", ",,")
    netdev = f"user,id=n0,net=169.254.0.0/16,restrict=on,guestfwd=tcp:169.254.169.254:80-cmd:{relay}"
    return [
        "qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "256", "-cpu", "qemu64,+rdrand",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
        "-drive", f"file={disk},format=raw,if=none,id=d0,snapshot=on", "-device", "nvme,drive=d0,serial=unik0",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip


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
