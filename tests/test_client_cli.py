"""Client and CLI against a mocked daemon: requests must match docs/api.md exactly."""

from __future__ import annotations

import gzip
import io
import json
import socket
import sys
import tarfile
import types
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from unik import cli
from unik.client import (
    DEFAULT_TIMEOUT,
    UnikAPIError,
    UnikClient,
    UnikConnectionError,
    normalize_host,
)
from unik.models import HubConfig

IMAGE = {
    "Id": "img-0123456789",
    "Name": "hello",
    "SizeMb": 12,
    "Infrastructure": "QEMU",
    "Created": "2026-11-28T20:01:02.123456Z",
    "StageSpec": {"ImageFormat": "qcow2"},
    "RunSpec": {
        "DeviceMappings": [
            {"MountPoint": "/", "DeviceName": "/dev/vda"},
            {"MountPoint": "/data", "DeviceName": "/dev/vdb"},
        ],
        "DefaultInstanceMemory": 128,
        "MinInstanceDiskMB": 0,
        "VsphereNetworkType": "",
    },
}
INSTANCE = {
    "Id": "inst-abcdef",
    "Name": "hello-1",
    "State": "running",
    "IpAddress": "10.0.2.15",
    "ImageId": "img-0123456789",
    "Infrastructure": "QEMU",
    "Created": "2026-11-28T20:01:03Z",
}
VOLUME = {
    "Id": "vol-42",
    "Name": "data",
    "SizeMb": 16,
    "Attachment": "",
    "Infrastructure": "QEMU",
    "Created": "2026-11-28T20:01:04Z",
}

Handler = Callable[[httpx.Request], httpx.Response]


class FakeDaemon:
    """Records every request and answers from a route table of (method, path) -> handler."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []
        self.routes: dict[tuple[str, str], Handler] = {}

    def on(self, method: str, path: str, status: int = 200, **response: Any) -> None:
        self.routes[(method, path)] = lambda _req: httpx.Response(status, **response)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        self.requests.append(request)
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return httpx.Response(404, json={"message": f"no route {request.method} {request.url.path}"})
        return handler(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def client(self, **kwargs: Any) -> UnikClient:
        return UnikClient("daemon:3000", transport=httpx.MockTransport(self), **kwargs)


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


def params(request: httpx.Request) -> dict[str, str]:
    return dict(request.url.params)


def multipart(request: httpx.Request, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Parse a multipart body into name -> (filename, payload)."""
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert message.is_multipart()
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        parts[str(name)] = (part.get_filename(), part.get_payload(decode=True))
    return parts


def tar_names(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {
            m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


# --------------------------------------------------------------------------- client


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("localhost:3000", "http://localhost:3000"),
        ("10.0.0.5", "http://10.0.0.5:3000"),
        ("unik.example:8080", "http://unik.example:8080"),
        ("https://unik.example/api/", "https://unik.example/api"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("[::1]:3000", "http://[::1]:3000"),
    ],
)
def test_normalize_host(host: str, url: str) -> None:
    assert normalize_host(host) == url


def test_default_timeout_allows_long_builds() -> None:
    assert DEFAULT_TIMEOUT.connect == 10.0
    assert DEFAULT_TIMEOUT.read is not None and DEFAULT_TIMEOUT.read >= 600


def test_lists_and_gets(daemon: FakeDaemon) -> None:
    daemon.on("GET", "/images", json=[IMAGE])
    daemon.on("GET", "/images/hello", json=IMAGE)
    daemon.on("GET", "/instances", json=[INSTANCE])
    daemon.on("GET", "/instances/inst-abcdef", json=INSTANCE)
    daemon.on("GET", "/volumes", json=[])
    daemon.on("GET", "/volumes/data", json=VOLUME)
    client = daemon.client()

    [image] = client.images.list()
    assert image.Name == "hello" and image.RunSpec.DeviceMappings[1].MountPoint == "/data"
    assert client.images.get("hello").Id == IMAGE["Id"]
    assert client.instances.list()[0].IpAddress == "10.0.2.15"
    assert client.instances.get("inst-abcdef").State == "running"
    assert client.volumes.list() == []
    assert client.volumes.get("data").SizeMb == 16
    assert all(r.method == "GET" for r in daemon.requests)


def test_info_routes(daemon: FakeDaemon) -> None:
    daemon.on("GET", "/available_compilers", json=["linux-c-qemu"])
    daemon.on("GET", "/available_providers", json=["qemu"])
    daemon.on("GET", "/describe_compiler", text="put a Makefile there")
    daemon.on("GET", "/_ping", text="OK")
    daemon.on("GET", "/version", json={"version": "0.1.0"})
    client = daemon.client()

    assert client.available_compilers() == ["linux-c-qemu"]
    assert client.available_providers() == ["qemu"]
    assert client.describe_compiler("qemu", "linux", "c") == "put a Makefile there"
    assert params(daemon.last) == {"provider": "qemu", "base": "linux", "lang": "c"}
    assert client.ping() is True
    assert client.version() == {"version": "0.1.0"}


def test_build_folder_sends_query_params_and_tarfile(daemon: FakeDaemon, tmp_path: Path) -> None:
    src = tmp_path / "app"
    (src / "lib").mkdir(parents=True)
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    (src / "lib" / "util.h").write_text("#pragma once\n")
    daemon.on("POST", "/images/hello/create", 201, json=IMAGE)
    seen: list[tuple[int, int]] = []

    image = daemon.client().images.build(
        "hello",
        src,
        base="linux",
        lang="c",
        provider="qemu",
        args="-v 1",
        mounts=["/data", "/etc/app"],
        force=True,
        progress=lambda sent, total: seen.append((sent, total)),
    )

    assert image.Name == "hello"
    request, body = daemon.last, daemon.bodies[-1]
    assert request.method == "POST"
    assert params(request) == {
        "base": "linux",
        "lang": "c",
        "provider": "qemu",
        "args": "-v 1",
        "mounts": "/data,/etc/app",
        "force": "true",
        "no_cleanup": "false",
    }
    parts = multipart(request, body)
    assert list(parts) == ["tarfile"]
    filename, payload = parts["tarfile"]
    assert filename == "app.tar.gz"
    assert gzip.decompress(payload)  # really gzip
    files = tar_names(payload)
    assert files["main.c"].startswith(b"int main")
    assert files["lib/util.h"] == b"#pragma once\n"
    assert not any(name.startswith(("/", "./")) or str(tmp_path) in name for name in files)
    # Known length (not chunked), and progress ends at exactly that length.
    assert int(request.headers["content-length"]) == len(body)
    assert seen[0] == (0, len(body))
    assert seen[-1] == (len(body), len(body))
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_build_from_targz_sends_file_unchanged(daemon: FakeDaemon, tmp_path: Path) -> None:
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("main.c")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    daemon.on("POST", "/images/hello/create", 201, json=IMAGE)

    daemon.client().images.build("hello", archive, "linux", "c", "qemu", no_cleanup=True)

    filename, payload = multipart(daemon.last, daemon.bodies[-1])["tarfile"]
    assert (filename, payload) == ("src.tar.gz", archive.read_bytes())
    assert params(daemon.last)["no_cleanup"] == "true"
    assert params(daemon.last)["mounts"] == ""


def test_build_missing_source_raises(daemon: FakeDaemon, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        daemon.client().images.build("hello", tmp_path / "nope", "linux", "c", "qemu")
    assert daemon.requests == []


def test_image_delete_and_hub(daemon: FakeDaemon) -> None:
    daemon.on("DELETE", "/images/hello", 204)
    for route in ("push", "pull", "remote-delete"):
        daemon.on("POST", f"/images/{route}/hello", 202)
    client = daemon.client()
    hub = HubConfig(url="https://hub.example", user="me", password="s3cret")
    wire = {"URL": "https://hub.example", "Username": "me", "Password": "s3cret"}

    client.images.delete("hello", force=True)
    assert (daemon.last.method, params(daemon.last)) == ("DELETE", {"force": "true"})
    client.images.delete("hello")
    assert params(daemon.last) == {"force": "false"}

    client.images.push("hello", hub)
    assert daemon.last.url.path == "/images/push/hello"
    assert json.loads(daemon.bodies[-1]) == wire
    client.images.pull("hello", hub, provider="qemu", force=True)
    assert daemon.last.url.path == "/images/pull/hello"
    assert params(daemon.last) == {"provider": "qemu", "force": "true"}
    assert json.loads(daemon.bodies[-1]) == wire
    client.hub.delete("hello", hub)
    assert daemon.last.url.path == "/images/remote-delete/hello"
    assert json.loads(daemon.bodies[-1]) == wire
    # What the client sends, the daemon's parser reads back.
    assert HubConfig.from_wire(json.loads(daemon.bodies[-1])) == hub


def test_run_sends_run_instance_request(daemon: FakeDaemon) -> None:
    daemon.on("POST", "/instances/run", 201, json=INSTANCE)
    client = daemon.client()

    instance = client.instances.run(
        "hello-1", "hello", env={"A": "1"}, mounts={"/data": "data"}, memory_mb=256, debug_mode=True
    )

    assert instance.Id == "inst-abcdef"
    assert json.loads(daemon.bodies[-1]) == {
        "InstanceName": "hello-1",
        "ImageName": "hello",
        "Mounts": {"/data": "data"},
        "Env": {"A": "1"},
        "MemoryMb": 256,
        "NoCleanup": False,
        "DebugMode": True,
    }
    client.instances.run("hello-2", "hello")
    body = json.loads(daemon.bodies[-1])
    assert (body["Mounts"], body["Env"], body["MemoryMb"]) == ({}, {}, 0)


def test_run_sends_warm_start_only_when_asked(daemon: FakeDaemon) -> None:
    daemon.on("POST", "/instances/run", 201, json={**INSTANCE, "StartedWarm": True})
    client = daemon.client()

    instance = client.instances.run("hello-1", "hello", warm_start=True)
    assert json.loads(daemon.bodies[-1])["WarmStart"] is True
    assert instance.StartedWarm is True
    # Without it the body is the Go client's, as old daemons know it.
    client.instances.run("hello-2", "hello", warm_start=False)
    assert "WarmStart" not in json.loads(daemon.bodies[-1])
    daemon.on("GET", "/instances/inst-abcdef", json=INSTANCE)
    assert client.instances.get("inst-abcdef").StartedWarm is False


def test_instance_actions(daemon: FakeDaemon) -> None:
    daemon.on("POST", "/instances/i1/start")
    daemon.on("POST", "/instances/i1/stop")
    daemon.on("DELETE", "/instances/i1", 204)
    daemon.on("GET", "/instances/i1/logs", text="booted\n")
    client = daemon.client()

    client.instances.start("i1")
    assert daemon.last.url.path == "/instances/i1/start"
    client.instances.stop("i1")
    assert daemon.last.url.path == "/instances/i1/stop"
    client.instances.delete("i1", force=True)
    assert (daemon.last.method, params(daemon.last)) == ("DELETE", {"force": "true"})
    assert client.instances.logs("i1") == "booted\n"
    assert params(daemon.last) == {}


def test_ids_are_escaped_into_one_path_segment(daemon: FakeDaemon) -> None:
    client = daemon.client()
    with pytest.raises(UnikAPIError):
        client.instances.get("a/b?c")
    assert daemon.last.url.raw_path == b"/instances/a%2Fb%3Fc"


def test_follow_logs_streams_chunks(daemon: FakeDaemon) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"line 1\n"
        yield b"line 2\n"

    daemon.routes[("GET", "/instances/i1/logs")] = lambda _req: httpx.Response(200, content=chunks())
    stream = daemon.client().instances.follow_logs("i1", delete=True)

    assert params(daemon.last) == {"follow": "true", "delete": "true"}
    assert "".join(stream) == "line 1\nline 2\n"


def test_follow_logs_raises_before_iterating(daemon: FakeDaemon) -> None:
    daemon.on("GET", "/instances/nope/logs", 404, json={"message": "instance nope not found"})
    with pytest.raises(UnikAPIError) as err:
        daemon.client().instances.follow_logs("nope")
    assert err.value.status_code == 404


def test_volume_create_without_data_posts_null(daemon: FakeDaemon) -> None:
    daemon.on("POST", "/volumes/data", 201, json=VOLUME)

    volume = daemon.client().volumes.create("data", size_mb=16, fs_type="ext4")

    assert volume.Name == "data"
    assert daemon.bodies[-1] == b"null"
    assert "multipart" not in daemon.last.headers.get("content-type", "")
    assert params(daemon.last) == {"size": "16", "provider": "qemu", "no_cleanup": "false", "type": "ext4"}


def test_volume_create_with_data_is_multipart(daemon: FakeDaemon, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hello.txt").write_text("hi")
    daemon.on("POST", "/volumes/data", 201, json=VOLUME)

    daemon.client().volumes.create("data", data=tmp_path / "data", fs_type="fat")

    assert params(daemon.last) == {"size": "0"}
    parts = multipart(daemon.last, daemon.bodies[-1])
    assert parts["provider"] == (None, b"qemu")
    assert parts["raw"] == (None, b"false")
    assert parts["type"] == (None, b"fat")
    assert parts["no_cleanup"] == (None, b"false")
    assert tar_names(parts["tarfile"][1]) == {"hello.txt": b"hi"}


def test_volume_create_raw_image(daemon: FakeDaemon, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    daemon.on("POST", "/volumes/raw", 201, json=VOLUME | {"Name": "raw"})

    daemon.client().volumes.create("raw", data=disk, raw=True, size_mb=8)

    parts = multipart(daemon.last, daemon.bodies[-1])
    assert parts["raw"] == (None, b"true")
    assert parts["tarfile"] == ("disk.img", disk.read_bytes())
    assert params(daemon.last) == {"size": "8"}


def test_volume_actions(daemon: FakeDaemon) -> None:
    daemon.on("DELETE", "/volumes/data", 204)
    daemon.on("POST", "/volumes/data/attach/i1", 202, text="data")
    daemon.on("POST", "/volumes/data/detach", 202, text="data")
    client = daemon.client()

    client.volumes.delete("data", force=True)
    assert params(daemon.last) == {"force": "true"}
    assert client.volumes.attach("data", "i1", "/data") == "data"
    assert params(daemon.last) == {"mount": "/data"}
    assert client.volumes.detach("data") == "data"


def test_token_is_sent_as_bearer(daemon: FakeDaemon) -> None:
    daemon.on("GET", "/images", json=[])
    daemon.client(token="t0k").images.list()
    assert daemon.last.headers["authorization"] == "Bearer t0k"
    daemon.client().images.list()
    assert "authorization" not in daemon.last.headers


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(404, json={"message": "image nope not found"}), "image nope not found"),
        (httpx.Response(409, json={"message": "name taken"}), "name taken"),
        (httpx.Response(500, text="plain failure\n"), "plain failure"),
        (httpx.Response(400, json={"detail": "bad"}), "bad"),
        (httpx.Response(502), "Bad Gateway"),
    ],
)
def test_errors_map_to_unik_api_error(daemon: FakeDaemon, response: httpx.Response, message: str) -> None:
    daemon.routes[("GET", "/images/nope")] = lambda _req: response
    with pytest.raises(UnikAPIError) as err:
        daemon.client().images.get("nope")
    assert err.value.status_code == response.status_code
    assert err.value.message == message


def test_connection_refused_names_the_host() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    client = UnikClient(f"127.0.0.1:{port}", timeout=5)
    with pytest.raises(UnikConnectionError) as err:
        client.images.list()
    assert f"127.0.0.1:{port}" in str(err.value)


def test_transport_failure_is_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = UnikClient("unik.example:3000", transport=httpx.MockTransport(refuse))
    with pytest.raises(UnikConnectionError, match=r"unik\.example:3000"):
        client.ping()


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("UNIK_HOST", raising=False)
    monkeypatch.delenv("UNIK_TOKEN", raising=False)
    return tmp_path


@pytest.fixture
def cli_daemon(daemon: FakeDaemon, home: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    """The CLI's clients all talk to `daemon`; `daemon.made` records (host, token)."""
    made: list[tuple[str, str | None]] = []

    def make_client(host: str, token: str | None) -> UnikClient:
        made.append((host, token))
        return UnikClient(host, token=token, transport=httpx.MockTransport(daemon))

    monkeypatch.setattr(cli, "make_client", make_client)
    daemon.made = made  # type: ignore[attr-defined]
    return daemon


def test_cli_images_table(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("GET", "/images", json=[IMAGE])
    result = runner.invoke(cli.app, ["images"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split()
    assert header == ["NAME", "ID", "INFRASTRUCTURE", "CREATED", "SIZE(MB)", "MOUNTPOINTS"]
    assert "img-0123456789" in result.output and "/data" in result.output


@pytest.mark.parametrize("name", ["instances", "ps"])
def test_cli_instances_table_and_alias(runner: CliRunner, cli_daemon: FakeDaemon, name: str) -> None:
    cli_daemon.on("GET", "/instances", json=[INSTANCE])
    result = runner.invoke(cli.app, [name])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == [
        "NAME", "ID", "INFRASTRUCTURE", "CREATED", "IMAGE", "IPADDRESS", "STATE",
    ]  # fmt: skip
    assert "10.0.2.15" in result.output and "running" in result.output
    assert "(warm)" not in result.output


def test_cli_instances_marks_warm_starts(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("GET", "/instances", json=[{**INSTANCE, "StartedWarm": True}, {**INSTANCE, "Id": "inst-cold"}])
    result = runner.invoke(cli.app, ["instances"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines()[1:]}
    assert rows["inst-abcdef"].rstrip().endswith("running (warm)")
    assert rows["inst-cold"].rstrip().endswith("running")
    # describe-instance's JSON carries the field as the daemon sent it.
    cli_daemon.on("GET", "/instances/i1", json={**INSTANCE, "StartedWarm": True})
    result = runner.invoke(cli.app, ["describe-instance", "--instance", "i1"])
    assert json.loads(result.stdout) == {**INSTANCE, "StartedWarm": True}


def test_cli_host_resolution(
    runner: CliRunner, cli_daemon: FakeDaemon, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_daemon.on("GET", "/volumes", json=[VOLUME])
    made: list[tuple[str, str | None]] = cli_daemon.made  # type: ignore[attr-defined]

    assert runner.invoke(cli.app, ["volumes"]).exit_code == 0
    assert made[-1] == ("localhost:3000", None)

    (home / ".unik").mkdir()
    (home / ".unik" / "client-config.yaml").write_text("host: 10.1.1.1:3000\ntoken: abc\n")
    assert runner.invoke(cli.app, ["volumes"]).exit_code == 0
    assert made[-1] == ("10.1.1.1:3000", "abc")
    assert cli_daemon.last.headers["authorization"] == "Bearer abc"

    monkeypatch.setenv("UNIK_HOST", "envhost:1")
    monkeypatch.setenv("UNIK_TOKEN", "envtok")
    assert runner.invoke(cli.app, ["volumes"]).exit_code == 0
    assert made[-1] == ("envhost:1", "envtok")

    assert runner.invoke(cli.app, ["--host", "global:2", "volumes"]).exit_code == 0
    assert made[-1][0] == "global:2"
    assert runner.invoke(cli.app, ["--host", "global:2", "volumes", "--host", "local:3"]).exit_code == 0
    assert made[-1][0] == "local:3"


def test_cli_target_writes_client_config(runner: CliRunner, home: Path) -> None:
    result = runner.invoke(cli.app, ["target", "--host", "192.168.1.9", "--port", "3001"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((home / ".unik" / "client-config.yaml").read_text())
    assert config == {"host": "192.168.1.9:3001"}
    assert cli.resolve_host() == "192.168.1.9:3001"


def test_cli_build(runner: CliRunner, cli_daemon: FakeDaemon, tmp_path: Path) -> None:
    src = tmp_path / "app"
    src.mkdir()
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    cli_daemon.on("POST", "/images/hello/create", 201, json=IMAGE)
    result = runner.invoke(
        cli.app,
        [
            "build", "--name", "hello", "--path", str(src), "--base", "linux", "--language", "c",
            "--provider", "qemu", "--args", "a b", "--mountpoints", "/data,/x", "--mountpoints", "/y",
            "--force", "--no-cleanup",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert params(cli_daemon.last) == {
        "base": "linux",
        "lang": "c",
        "provider": "qemu",
        "args": "a b",
        "mounts": "/data,/x,/y",
        "force": "true",
        "no_cleanup": "true",
    }
    assert "main.c" in tar_names(multipart(cli_daemon.last, cli_daemon.bodies[-1])["tarfile"][1])
    assert "img-0123456789" in result.output


def test_cli_run(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("POST", "/instances/run", 201, json=INSTANCE)
    result = runner.invoke(
        cli.app,
        [
            "run", "--instanceName", "hello-1", "--imageName", "hello", "--env", "A=1", "--env", "B=x=y",
            "--vol", "data:/data", "--instanceMemory", "64", "--debug-mode",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    body = json.loads(cli_daemon.bodies[-1])
    assert body["Env"] == {"A": "1", "B": "x=y"}
    assert body["Mounts"] == {"/data": "data"}
    assert (body["MemoryMb"], body["DebugMode"], body["NoCleanup"]) == (64, True, False)
    assert "inst-abcdef" in result.output
    assert "WarmStart" not in body


def test_cli_run_warm(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("POST", "/instances/run", 201, json={**INSTANCE, "StartedWarm": True})
    result = runner.invoke(cli.app, ["run", "--instanceName", "hello-1", "--imageName", "hello", "--warm"])
    assert result.exit_code == 0, result.output
    assert json.loads(cli_daemon.bodies[-1])["WarmStart"] is True
    assert "running (warm)" in result.output
    help_text = runner.invoke(cli.app, ["run", "--help"]).output
    assert "--warm" in help_text and "VM template" in help_text


def test_cli_run_rejects_bad_env(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    result = runner.invoke(cli.app, ["run", "--instanceName", "a", "--imageName", "b", "--env", "NOVALUE"])
    assert result.exit_code == 1
    assert "unik: --env expects KEY=VALUE" in result.stderr
    assert cli_daemon.requests == []


def test_cli_api_error_is_one_line(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("GET", "/images/nope", 404, json={"message": "image nope not found"})
    result = runner.invoke(cli.app, ["describe-image", "--image", "nope"])
    assert result.exit_code == 1
    assert result.stderr == "unik: image nope not found\n"
    assert "Traceback" not in result.output


def test_cli_connection_error(runner: CliRunner, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    monkeypatch.setattr(cli, "make_client", lambda host, token: UnikClient(host, transport=httpx.MockTransport(refuse)))
    result = runner.invoke(cli.app, ["--host", "nowhere:3000", "images"])
    assert result.exit_code == 1
    assert result.stderr.startswith("unik: cannot connect to the UniK daemon at http://nowhere:3000")


def test_cli_describe_and_deletes(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("GET", "/instances/i1", json=INSTANCE)
    cli_daemon.on("DELETE", "/images/hello", 204)
    cli_daemon.on("DELETE", "/instances/i1", 204)
    cli_daemon.on("DELETE", "/volumes/data", 204)

    result = runner.invoke(cli.app, ["describe-instance", "--instance", "i1"])
    assert result.exit_code == 0 and json.loads(result.stdout) == INSTANCE

    for args, path in [
        (["rmi", "--image", "hello", "--force"], "/images/hello"),
        (["delete-image", "--image", "hello"], "/images/hello"),
        (["rm", "--instance", "i1", "--force"], "/instances/i1"),
        (["rmv", "--volume", "data"], "/volumes/data"),
    ]:
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        assert (cli_daemon.last.method, cli_daemon.last.url.path) == ("DELETE", path)
        assert params(cli_daemon.last) == {"force": "true" if "--force" in args else "false"}


def test_cli_info_commands(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("GET", "/available_providers", json=["qemu", "xen"])
    cli_daemon.on("GET", "/available_compilers", json=["linux-c-qemu"])
    cli_daemon.on("GET", "/describe_compiler", text="how to")
    assert runner.invoke(cli.app, ["providers"]).stdout == "qemu\nxen\n"
    assert runner.invoke(cli.app, ["compilers"]).stdout == "linux-c-qemu\n"
    result = runner.invoke(cli.app, ["describe-compiler", "--base", "linux", "--language", "c", "--provider", "qemu"])
    assert result.stdout == "how to\n"
    assert params(cli_daemon.last) == {"provider": "qemu", "base": "linux", "lang": "c"}


def test_cli_start_stop(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    cli_daemon.on("POST", "/instances/i1/start")
    cli_daemon.on("POST", "/instances/i1/stop")
    assert runner.invoke(cli.app, ["start", "--instance", "i1"]).exit_code == 0
    assert cli_daemon.last.url.path == "/instances/i1/start"
    assert runner.invoke(cli.app, ["stop", "--instance", "i1"]).exit_code == 0
    assert cli_daemon.last.url.path == "/instances/i1/stop"


def test_cli_logs(runner: CliRunner, cli_daemon: FakeDaemon) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"hello "
        yield b"world\n"

    cli_daemon.routes[("GET", "/instances/i1/logs")] = lambda req: (
        httpx.Response(200, content=chunks()) if req.url.params.get("follow") else httpx.Response(200, text="so far\n")
    )
    result = runner.invoke(cli.app, ["logs", "--instance", "i1"])
    assert (result.exit_code, result.stdout) == (0, "so far\n")

    result = runner.invoke(cli.app, ["logs", "--instance", "i1", "--follow", "--deleteOnDisconnect"])
    assert (result.exit_code, result.stdout) == (0, "hello world\n")
    assert params(cli_daemon.last) == {"follow": "true", "delete": "true"}


def test_cli_volume_commands(runner: CliRunner, cli_daemon: FakeDaemon, tmp_path: Path) -> None:
    cli_daemon.on("POST", "/volumes/data", 201, json=VOLUME)
    cli_daemon.on("POST", "/volumes/data/attach/i1", 202, text="data")
    cli_daemon.on("POST", "/volumes/data/detach", 202, text="data")

    result = runner.invoke(cli.app, ["create-volume", "--name", "data", "--size", "16", "--type", "ext4"])
    assert result.exit_code == 0, result.output
    assert cli_daemon.bodies[-1] == b"null"
    assert params(cli_daemon.last)["type"] == "ext4"

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    result = runner.invoke(cli.app, ["create-volume", "--name", "data", "--data", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "tarfile" in multipart(cli_daemon.last, cli_daemon.bodies[-1])

    result = runner.invoke(cli.app, ["create-volume", "--name", "data"])
    assert result.exit_code == 1 and "--size" in result.stderr

    result = runner.invoke(cli.app, ["attach", "--volume", "data", "--instanceId", "i1", "--mountPoint", "/data"])
    assert result.exit_code == 0, result.output
    assert params(cli_daemon.last) == {"mount": "/data"}
    assert runner.invoke(cli.app, ["detach-volume", "--volume", "data"]).exit_code == 0
    assert cli_daemon.last.url.path == "/volumes/data/detach"


def test_cli_hub_commands(runner: CliRunner, cli_daemon: FakeDaemon, home: Path) -> None:
    cli_daemon.on("POST", "/images/push/hello", 202)
    cli_daemon.on("POST", "/images/pull/hello", 202)
    result = runner.invoke(cli.app, ["login", "--url", "https://hub", "--user", "me", "--pass", "pw"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli.app, ["push", "--image", "hello"]).exit_code == 0
    assert json.loads(cli_daemon.bodies[-1]) == {"URL": "https://hub", "Username": "me", "Password": "pw"}
    assert runner.invoke(cli.app, ["pull", "--image", "hello", "--provider", "qemu"]).exit_code == 0
    assert params(cli_daemon.last) == {"provider": "qemu", "force": "false"}


def test_cli_daemon_calls_serve(runner: CliRunner, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("unik.daemon")
    fake.serve = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unik.daemon", fake)

    result = runner.invoke(
        cli.app, ["daemon", "--port", "4000", "--d", str(home / "data"), "--f", "cfg.yaml", "--debug"]
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        {
            "host": "127.0.0.1",
            "port": 4000,
            "data_dir": home / "data",
            "config_file": Path("cfg.yaml"),
            "debug": True,
        }
    ]
