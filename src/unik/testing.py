"""A real `unik daemon` in a child process, for the test suite and the benchmarks.

Both measure or check what a user gets (uvicorn, the access middleware, the store, the
monitor), so they start the daemon as a user would; the daemon itself never imports this.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from unik.providers.network import free_port

START_TIMEOUT = 30.0


@dataclass
class DaemonProcess:
    """`unik daemon` on 127.0.0.1:`port` with its data in `data_dir`; start() waits for /_ping."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, config: str = "") -> None:
        """Start it (with `config` as its daemon-config.yaml when given) and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if config:
            (self.data_dir / "daemon-config.yaml").write_text(config)
        with open(self.data_dir / "daemon.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "unik.cli", "daemon", "--port", str(self.port), "--d", str(self.data_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/_ping", timeout=2).text == "OK":
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"daemon did not start: {(self.data_dir / 'daemon.log').read_text()[-2000:]}")

    def kill(self) -> None:
        """kill -9: the daemon gets no chance to clean up, like a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None


def start_daemon(data_dir: Path, config: str = "") -> DaemonProcess:
    """A started daemon on a free port."""
    running = DaemonProcess(data_dir, free_port())
    running.start(config)
    return running


def _kib(field: str, text: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def qemu_memory(pid: int, guest_mb: int) -> dict[str, float]:
    """PSS and RSS of a whole qemu, and of its guest-RAM mapping (MiB): the benchmark's P5 and
    the test of what the host gets back. The guest RAM is the one mapping of (about: anonymous
    RAM is aligned) the guest's size; what of it is resident is the guest's own memory, not
    qemu's overhead. A qemu without such a mapping reads 0 for it."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    memory = {"pss": _kib("Pss", rollup) / 1024, "rss": _kib("Rss", rollup) / 1024, "guest_pss": 0.0, "guest_rss": 0.0}
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path(f"/proc/{pid}/smaps").read_text()):
        if guest_mb * 1024 <= _kib("Size", block) <= (guest_mb + 4) * 1024:
            memory["guest_pss"], memory["guest_rss"] = _kib("Pss", block) / 1024, _kib("Rss", block) / 1024
            break
    return memory
