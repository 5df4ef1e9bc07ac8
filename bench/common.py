"""What every benchmark needs: a free port, a real daemon in its own data dir, source tarballs.

The daemon is started as `unik daemon` in a child process (not in-process), so a benchmark
measures what a user gets: uvicorn, the access middleware, the SQLite store, the monitor.
"""

from __future__ import annotations

import contextlib
import functools
import io
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "bench" / "results"
START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    """A `unik daemon` child process; `url` is its base URL (also accepted by UnikClient)."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_daemon(data_dir: Path, config: str = "") -> Daemon:
    """Start a daemon on a free port and wait until it answers /_ping."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if config:
        (data_dir / "daemon-config.yaml").write_text(config)
    port = free_port()
    with open(data_dir / "daemon.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "unik.cli", "daemon", "--port", str(port), "--d", str(data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Daemon(data_dir, port, process)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{running.url}/_ping", timeout=2).text == "OK":
                return running
        time.sleep(0.1)
    running.stop()
    raise RuntimeError(f"daemon did not start: {(data_dir / 'daemon.log').read_text()[-2000:]}")


@functools.cache
def api(base: str) -> httpx.Client:
    """One client per daemon for the whole run; call it before a timer starts. Making an httpx
    client loads the CA bundle (~30 ms here): that is the benchmark's cost, not the daemon's."""
    return httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT)


@contextlib.contextmanager
def daemon(data_dir: Path, config: str = "") -> Iterator[str]:
    """A running daemon for the duration of the block; yields its base URL."""
    running = start_daemon(data_dir, config)
    try:
        yield running.url
    finally:
        running.stop()


def tarball(app: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """tar.gz of the app folder (recursively), plus `extra` files (name → content) at its top."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(app.iterdir()):
            tar.add(path, arcname=path.name)
        for name, content in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def publish(report: str, name: str) -> None:
    """Print a report and keep it as bench/results/<name>, where `make bench` puts everything."""
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(report.rstrip("\n") + "\n")
