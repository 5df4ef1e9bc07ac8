"""A real `unik daemon` in a child process, for the test suite and the benchmarks.

Both measure or check what a user gets (uvicorn, the access middleware, the store, the
monitor), so they start the daemon as a user would; the daemon itself never imports this.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from unik.providers.network import free_port

START_TIMEOUT = 30.0


@dataclass
class DaemonProcess:
    """`unik daemon` on 127.0.0.1:`port` with its data in `data_dir`; start() waits for /_ping.

    With `netns` (a namespace from `ip netns add`, see NetworkNamespace) the daemon runs inside
    it, its bridge, taps and VMs with it, on the namespace's own 127.0.0.1:`port`; this side's
    127.0.0.1:`port` forwards there, so `host` and `url` serve as they are."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    netns: str | None = None
    forward: NetnsForward | None = field(default=None, repr=False)

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
        argv = [sys.executable, "-m", "unik.cli", "daemon", "--port", str(self.port), "--d", str(self.data_dir)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
            if self.forward is None:
                self.forward = NetnsForward(self.netns, ("127.0.0.1", self.port), port=self.port)
        with open(self.data_dir / "daemon.log", "ab") as log:
            self.process = subprocess.Popen(
                argv,
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
        self._close_forward()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        self._close_forward()

    def _close_forward(self) -> None:
        # Its connections hold the namespace: NetworkNamespace.delete() needs them gone.
        if self.forward is not None:
            self.forward.close()
            self.forward = None


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


# -- network namespaces: where tests put bridges, taps and the traffic to their guests -----------

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
# Bounds a connect to a guest not up yet (its ARP unanswered), so that the client soon retries.
NETNS_CONNECT_TIMEOUT = 5.0


def enter_netns(name: str) -> None:
    """Move the calling thread, and only it, into network namespace `name` (of `ip netns add`):
    the sockets it opens and the processes it starts from then on live there. Python 3.11 has
    no os.setns."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`func(*args, **kwargs)` in network namespace `name`, in a thread of its own that ends with
    the call, so that nothing else of this process runs there by mistake."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            enter_netns(name)
            outcome.append(func(*args, **kwargs))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


class NetworkNamespace:
    """A network namespace of the caller's own (`ip netns add`), its loopback up. delete() ends
    what still runs in it (a qemu left over would keep it alive, with its bridge and taps) and
    removes it, which takes every interface in it along."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def create(cls, prefix: str = "unikt") -> NetworkNamespace:
        """Raises OSError or CalledProcessError where namespaces cannot be made (not root, no
        iproute2, a container that forbids them): callers skip then."""
        name = f"{prefix}{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
        space = cls(name)
        try:
            space.ip("link", "set", "lo", "up")
        except BaseException:
            space.delete()
            raise
        return space

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip` inside the namespace."""
        return subprocess.run(["ip", "-n", self.name, *args], check=check, capture_output=True, text=True)

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(word) for word in listed.stdout.split() if word.isdigit() and int(word) != os.getpid()]

    def delete(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> NetworkNamespace:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.delete()


class NetnsForward:
    """127.0.0.1:`port` here (any free one by default) forwards each connection to `target`
    inside network namespace `netns`, the connection to the target being made from inside it.
    A connection the target refuses is closed at once, which HTTP clients see as a dropped one."""

    def __init__(self, netns: str, target: tuple[str, int], port: int = 0) -> None:
        self.netns = netns
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self.listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"forward-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, sock: socket.socket) -> bool:
        with self._guard:
            if self._closed:
                return False
            self._open.add(sock)
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if not self._track(client):
                return
            enter_netns(self.netns)
            upstream = socket.create_connection(self.target, timeout=NETNS_CONNECT_TIMEOUT)
            if not self._track(upstream):
                return
            upstream.settimeout(None)
            _pump(client, upstream)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with self._guard:
                        self._open.discard(sock)
                    sock.close()

    def close(self) -> None:
        with self._guard:
            self._closed = True
            sockets = list(self._open)
        # shutdown wakes the threads blocked in accept() or select(); close alone would not.
        for sock in (self.listener, *sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def __enter__(self) -> NetnsForward:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Bytes both ways until both sides have finished sending (or one fails)."""
    peer = {a: b, b: a}
    reading = {a, b}
    with selectors.DefaultSelector() as selector:
        for sock in reading:
            selector.register(sock, selectors.EVENT_READ)
        while reading:
            for key, _ in selector.select():
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                data = source.recv(65536)
                if data:
                    peer[source].sendall(data)
                else:
                    selector.unregister(source)
                    reading.discard(source)
                    peer[source].shutdown(socket.SHUT_WR)
