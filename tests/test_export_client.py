"""`images.export` and `unik export` against a mocked daemon: GET /images/{name}/disk as docs/api.md has it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.test_client_cli import FakeDaemon, cli_daemon, daemon, home, runner
from unik import cli
from unik.client import UnikAPIError, UnikConnectionError

__all__ = ["cli_daemon", "daemon", "home", "runner"]  # fixtures, used by name

# Not a multiple of the client's chunk size, so the last, short chunk is exercised too.
DISK = os.urandom(3 * 1024 * 1024 + 12345)


def disk_answer(body: bytes = DISK, filename: str = "hello.qcow2") -> httpx.Response:
    return httpx.Response(
        200,
        content=body,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(len(body)),
        },
    )


def serve_disk(daemon: FakeDaemon, name: str = "hello", body: bytes = DISK, filename: str = "hello.qcow2") -> None:
    daemon.routes[("GET", f"/images/{name}/disk")] = lambda _req: disk_answer(body, filename)


def files_in(folder: Path) -> list[str]:
    # Hidden names too: a leftover temporary file is what these tests look for.
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- client


def test_export_sends_format_repeated_env_and_args(daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(daemon)
    dest = tmp_path / "out.qcow2"
    got = daemon.client().images.export(
        "hello", "qcow2", dest, env={"A": "1", "B": "x=y"}, args="-v --port 8080 'two words'"
    )
    request = daemon.last
    assert (request.method, request.url.path) == ("GET", "/images/hello/disk")
    assert request.url.params.multi_items() == [
        ("format", "qcow2"),
        ("env", "A=1"),
        ("env", "B=x=y"),
        ("args", "-v --port 8080 'two words'"),
    ]
    # Unencoded, so that Content-Length counts the bytes that end up in the file.
    assert request.headers["accept-encoding"] == "identity"
    assert got == dest


def test_export_without_env_or_args_sends_only_format(daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(daemon, filename="hello.img")
    daemon.client().images.export("hello", "raw", tmp_path / "hello.img")
    assert daemon.last.url.params.multi_items() == [("format", "raw")]


def test_export_empty_args_is_sent(daemon: FakeDaemon, tmp_path: Path) -> None:
    # "" says "no default arguments", which is not the same as leaving the image's own.
    serve_disk(daemon)
    daemon.client().images.export("hello", "qcow2", tmp_path / "d", args="")
    assert daemon.last.url.params.multi_items() == [("format", "qcow2"), ("args", "")]


def test_export_escapes_the_name_into_one_segment(daemon: FakeDaemon, tmp_path: Path) -> None:
    with pytest.raises(UnikAPIError):
        daemon.client().images.export("../instances", "raw", tmp_path / "x.img")
    assert daemon.last.url.raw_path.startswith(b"/images/..%2Finstances/disk?")
    assert files_in(tmp_path) == []


def test_export_writes_the_whole_disk_with_progress(daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(daemon)
    calls: list[tuple[int, int]] = []
    dest = tmp_path / "hello.qcow2"
    daemon.client().images.export("hello", "qcow2", str(dest), progress=lambda done, total: calls.append((done, total)))
    assert dest.read_bytes() == DISK
    assert files_in(tmp_path) == ["hello.qcow2"]
    assert calls[0] == (0, len(DISK))
    assert calls[-1] == (len(DISK), len(DISK))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert {total for _, total in calls} == {len(DISK)}


def test_export_into_a_folder_uses_the_image_name(daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(daemon, filename="hello.img")
    got = daemon.client().images.export("hello", "raw", tmp_path)
    assert got == tmp_path / "hello.img"
    assert got.read_bytes() == DISK


def test_export_without_content_length_reports_total_zero(daemon: FakeDaemon, tmp_path: Path) -> None:
    def chunked(_req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([DISK[:1000], DISK[1000:]]))

    daemon.routes[("GET", "/images/hello/disk")] = chunked
    calls: list[tuple[int, int]] = []
    dest = daemon.client().images.export("hello", "vdi", tmp_path / "h.vdi", progress=lambda d, t: calls.append((d, t)))
    assert dest.read_bytes() == DISK
    assert calls[-1] == (len(DISK), 0)


def test_export_replaces_an_existing_file(daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(daemon)
    dest = tmp_path / "hello.qcow2"
    dest.write_bytes(b"old")
    daemon.client().images.export("hello", "qcow2", dest)
    assert dest.read_bytes() == DISK
    assert files_in(tmp_path) == ["hello.qcow2"]


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "unknown disk format 'iso': raw, qcow2, vmdk, vhd, vhdx or vdi"),
        (400, "env: expected KEY=VALUE, got 'NOVALUE'"),
        (404, "image nope not found"),
        (501, "this host cannot make vhdx disks"),
    ],
)
def test_export_error_leaves_no_file(daemon: FakeDaemon, tmp_path: Path, status: int, message: str) -> None:
    daemon.on("GET", "/images/nope/disk", status, json={"message": message})
    dest = tmp_path / "nope.qcow2"
    with pytest.raises(UnikAPIError) as caught:
        daemon.client().images.export("nope", "qcow2", dest)
    assert (caught.value.status_code, caught.value.message) == (status, message)
    assert files_in(tmp_path) == []


def test_export_error_keeps_an_existing_file(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.on("GET", "/images/nope/disk", 404, json={"message": "image nope not found"})
    dest = tmp_path / "nope.qcow2"
    dest.write_bytes(b"keep me")
    with pytest.raises(UnikAPIError):
        daemon.client().images.export("nope", "qcow2", dest)
    assert dest.read_bytes() == b"keep me"
    assert files_in(tmp_path) == ["nope.qcow2"]


def test_export_broken_stream_leaves_no_file(daemon: FakeDaemon, tmp_path: Path) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            yield DISK[:4096]
            raise httpx.ReadError("connection reset", request=request)

        return httpx.Response(200, content=body(), headers={"Content-Length": str(len(DISK))})

    daemon.routes[("GET", "/images/hello/disk")] = broken
    with pytest.raises(UnikConnectionError, match="broke"):
        daemon.client().images.export("hello", "qcow2", tmp_path / "hello.qcow2")
    assert files_in(tmp_path) == []


def test_export_short_body_is_an_error(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.routes[("GET", "/images/hello/disk")] = lambda _req: httpx.Response(
        200, content=DISK[:5000], headers={"Content-Length": str(len(DISK))}
    )
    with pytest.raises(UnikConnectionError, match=f"after 5000 of {len(DISK)} bytes"):
        daemon.client().images.export("hello", "qcow2", tmp_path / "hello.qcow2")
    assert files_in(tmp_path) == []


def test_export_failing_progress_callback_leaves_no_file(daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(daemon)

    def stop(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        daemon.client().images.export("hello", "qcow2", tmp_path / "hello.qcow2", progress=stop)
    assert files_in(tmp_path) == []


def test_export_to_a_missing_folder_sends_nothing(daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(daemon)
    with pytest.raises(FileNotFoundError):
        daemon.client().images.export("hello", "qcow2", tmp_path / "no" / "such" / "hello.qcow2")
    assert daemon.requests == []


# ------------------------------------------------------------------------------ CLI


def test_cli_export_writes_the_file_and_says_where(runner: CliRunner, cli_daemon: FakeDaemon, tmp_path: Path) -> None:
    serve_disk(cli_daemon)
    out = tmp_path / "disks" / "hello-prod.qcow2"
    out.parent.mkdir()
    result = runner.invoke(
        cli.app,
        [
            "export", "--image", "hello", "--format", "qcow2", "--output", str(out),
            "--env", "A=1", "--env", "B=x=y", "--args", "-v --port 8080",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == DISK
    assert files_in(out.parent) == ["hello-prod.qcow2"]
    assert cli_daemon.last.url.path == "/images/hello/disk"
    assert cli_daemon.last.url.params.multi_items() == [
        ("format", "qcow2"),
        ("env", "A=1"),
        ("env", "B=x=y"),
        ("args", "-v --port 8080"),
    ]
    assert f"exported image hello to {out}" in result.stdout


@pytest.mark.parametrize(("fmt", "filename"), [("raw", "hello.img"), ("vmdk", "hello.vmdk"), ("vhdx", "hello.vhdx")])
def test_cli_export_default_output_is_in_the_current_folder(
    runner: CliRunner, cli_daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, filename: str
) -> None:
    serve_disk(cli_daemon, filename=filename)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(cli.app, ["export", "--image", "hello", "--format", fmt])
    assert result.exit_code == 0, result.output
    assert files_in(work) == [filename]
    assert (work / filename).read_bytes() == DISK
    assert cli_daemon.last.url.params.multi_items() == [("format", fmt)]
    assert f"to {filename}" in result.stdout


def test_cli_export_error_is_one_line_and_leaves_no_file(
    runner: CliRunner, cli_daemon: FakeDaemon, tmp_path: Path
) -> None:
    cli_daemon.on("GET", "/images/nope/disk", 404, json={"message": "image nope not found"})
    result = runner.invoke(
        cli.app, ["export", "--image", "nope", "--format", "qcow2", "--output", str(tmp_path / "nope.qcow2")]
    )
    assert result.exit_code == 1
    assert result.stderr.endswith("unik: image nope not found\n")
    assert "Traceback" not in result.output
    assert not any(p.name.startswith(("nope", ".nope")) for p in tmp_path.iterdir())


def test_cli_export_rejects_bad_env_before_asking(runner: CliRunner, cli_daemon: FakeDaemon, tmp_path: Path) -> None:
    result = runner.invoke(
        cli.app, ["export", "--image", "hello", "--format", "raw", "--output", str(tmp_path / "h"), "--env", "NOVALUE"]
    )
    assert result.exit_code == 1
    assert "unik: --env expects KEY=VALUE" in result.stderr
    assert cli_daemon.requests == []


def test_cli_export_help(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["export", "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--image", "--format", "--output", "--env", "--args", "--host"):
        assert flag in result.output
    assert "qcow2" in result.output


def test_cli_export_is_listed(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "export" in result.output
