"""What every benchmark needs: a real daemon in its own data dir (unik.testing), an API client, tarballs.

The daemon is started as `unik daemon` in a child process (not in-process), so a benchmark
measures what a user gets: uvicorn, the access middleware, the SQLite store, the monitor.
"""

from __future__ import annotations

import contextlib
import functools
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from unik.providers.network import free_port
from unik.testing import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "bench" / "results"
REQUEST_TIMEOUT = 120.0


@functools.cache
def api(base: str) -> httpx.Client:
    """One client per daemon for the whole run; call it before a timer starts. Making an httpx
    client loads the CA bundle (~30 ms here): that is the benchmark's cost, not the daemon's."""
    return httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT)


@contextlib.contextmanager
def daemon(data_dir: Path, config: str = "", netns: str | None = None) -> Iterator[str]:
    """A running daemon for the duration of the block (inside network namespace `netns` when
    given, reached through a forward from this side's loopback); yields its base URL."""
    running = DaemonProcess(data_dir, free_port(), netns=netns)
    running.start(config)
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
