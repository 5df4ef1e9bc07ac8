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
import shutil
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


# -- a private libvirtd: hosts for the libvirt provider's tests and benchmarks ---------------------

LIBVIRT_START_TIMEOUT = 30.0
LIBVIRT_STOP_TIMEOUT = 15.0
# What a LibvirtHost runs, and the binaries it starts them with (util-linux for the namespace).
LIBVIRT_TOOLS = ("libvirtd", "virtlogd", "virsh", "unshare", "nsenter")
# The system user (and group) Debian's libvirtd looks up at start, before it reads qemu.conf.
LIBVIRT_QEMU_USER = "libvirt-qemu"
# As root, libvirtd and its qemu driver use fixed paths (no environment variable or libvirtd.conf
# key moves them; XDG_* counts only for unprivileged daemons): each host gets a mount namespace
# of its own where its folders under `root` are bound over these. Their parents get an empty
# tmpfs there first, so that no mount point is ever created on the real file system.
LIBVIRT_SYSTEM_DIRS = {
    "etc": "/etc/libvirt",  # libvirtd.conf, virtlogd.conf, qemu.conf; libvirtd adds nwfilter/, secrets/
    "run": "/run/libvirt",  # sockets (libvirt-sock, virtlogd-sock), pid files, qemu/ domain status
    "lib": "/var/lib/libvirt",  # qemu/domain-N-NAME/ (monitor socket), nvram, save, dumps
    "cache": "/var/cache/libvirt",  # qemu/capabilities/ (or the `cache` given to start())
    "log": "/var/log/libvirt",  # qemu/NAME.log (through virtlogd), the daemons' own logs
}
_LIBVIRT_NAMESPACE = r"""
set -e
root=$1
cache=$2
shift 2
for dir in /run /var/lib /var/cache /var/log; do mount -t tmpfs -o size=1m,mode=755 unik-libvirt "$dir"; done
mkdir -m 1777 /run/lock
mkdir /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
mount --bind "$root/etc" /etc/libvirt
mount --bind "$root/run" /run/libvirt
mount --bind "$root/lib" /var/lib/libvirt
mount --bind "$cache" /var/cache/libvirt
mount --bind "$root/log" /var/log/libvirt
exec "$@"
"""
# root in a container: no user switch, no chown/relabel of images, no cgroup of its own per VM;
# no mount namespace per VM either (its default), so that the host's qemus are in the host's.
_QEMU_CONF = """\
namespaces = [ ]
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"""


def libvirt_missing() -> str | None:
    """Why no LibvirtHost can start here (a tool or the libvirt-qemu user missing), or None."""
    import pwd

    absent = [tool for tool in LIBVIRT_TOOLS if shutil.which(tool) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (run `make setup`)"
    try:
        pwd.getpwnam(LIBVIRT_QEMU_USER)
    except KeyError:
        return f"no system user {LIBVIRT_QEMU_USER}: libvirtd refuses to start (run `make libvirt-user`)"
    if os.geteuid() != 0:
        return "a private system libvirtd needs root (mount namespace, qemu:///system)"
    return None


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone, or a zombie
        return None


@dataclass
class LibvirtHost:
    """A libvirtd of its own on qemu+tcp://127.0.0.1:`port`/system (auth none), with its
    virtlogd, for tests and benchmarks of the libvirt provider. All it writes is under `root`:
    root/etc (its configs), root/run (sockets, pid files), root/lib, root/cache, root/log, seen by
    its daemons and qemus as /etc/libvirt, /run/libvirt, ... in a mount namespace of its own; so
    two hosts run side by side, and the machine's own libvirt folders are never touched.

    Domains must be type='qemu' (TCG). start() returns once the daemon answers over TCP."""

    root: Path
    port: int
    cache: Path
    virtlogd: subprocess.Popen[bytes] | None = None
    libvirtd: subprocess.Popen[bytes] | None = None
    namespace: str | None = None

    @property
    def uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    @classmethod
    def start(cls, root: Path, cache: Path | None = None) -> LibvirtHost:
        """Raises RuntimeError when libvirtd does not come up (libvirt_missing() tells why first).

        `cache`, when given, is bound as /var/cache/libvirt instead of root/cache: hosts that
        share one probe qemu's capabilities once (~8 s under TCG, at a host's first domain or
        capabilities call) instead of each. libvirt rewrites its entries atomically and checks
        them against the qemu binaries and its own version, so sharing is safe."""
        if (problem := libvirt_missing()) is not None:
            raise RuntimeError(problem)
        root = root.resolve()
        for path in (root, cache.resolve()) if cache is not None else (root,):
            hidden = [p for p in ("/run", "/var/lib", "/var/cache", "/var/log") if path.is_relative_to(p)]
            if hidden:
                raise ValueError(f"{path} is under {hidden[0]}, which the host's namespace hides")
        for name in LIBVIRT_SYSTEM_DIRS:
            (root / name).mkdir(parents=True, exist_ok=True)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        (root / "etc" / "qemu.conf").write_text(_QEMU_CONF)
        (root / "etc" / "virtlogd.conf").write_text(f'log_outputs = "3:file:{root}/log/virtlogd.log"\n')
        host = cls(root, free_port(), cache=cache.resolve() if cache is not None else root / "cache")
        try:
            host._start_virtlogd()
            host._start_libvirtd()
        except BaseException:
            host.stop()
            raise
        return host

    def _start_virtlogd(self) -> None:
        # The namespace's first process: unshare and sh exec into virtlogd, so its pid is
        # virtlogd's, and libvirtd joins the namespace through it. libvirtd as root never starts
        # a virtlogd itself: it connects to /run/libvirt/virtlogd-sock, this one's.
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _LIBVIRT_NAMESPACE, "sh"]
        argv += [str(self.root), str(self.cache)]
        argv += ["virtlogd", "--config", f"{self.root}/etc/virtlogd.conf"]
        argv += ["--pid-file", f"{self.root}/run/virtlogd.pid"]
        with open(self.root / "log" / "virtlogd.out", "ab") as out:
            self.virtlogd = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        socket_path = self.root / "run" / "virtlogd-sock"
        deadline = time.monotonic() + LIBVIRT_START_TIMEOUT
        while not socket_path.exists():
            if self.virtlogd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtlogd did not start: {self._tail('virtlogd.out')}")
            time.sleep(0.02)
        self.namespace = _mount_namespace(self.virtlogd.pid)
        if self.namespace is None or self.namespace == _mount_namespace(os.getpid()):
            raise RuntimeError("virtlogd is not in a mount namespace of its own")

    def _start_libvirtd(self, attempts: int = 3) -> None:
        assert self.virtlogd is not None
        for attempt in range(attempts):
            if attempt:
                self.port = free_port()  # another process took the port between free_port() and bind
            # --listen: without socket activation, listen_tcp counts only with it.
            (self.root / "etc" / "libvirtd.conf").write_text(
                "listen_tls = 0\n"
                "listen_tcp = 1\n"
                'listen_addr = "127.0.0.1"\n'
                f'tcp_port = "{self.port}"\n'
                'auth_tcp = "none"\n'
                f'log_outputs = "3:file:{self.root}/log/libvirtd.log"\n'
            )
            argv = ["nsenter", f"--mount=/proc/{self.virtlogd.pid}/ns/mnt", "libvirtd", "--listen"]
            argv += ["--config", f"{self.root}/etc/libvirtd.conf", "--pid-file", f"{self.root}/run/libvirtd.pid"]
            with open(self.root / "log" / "libvirtd.out", "ab") as out:
                self.libvirtd = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + LIBVIRT_START_TIMEOUT
            while self.libvirtd.poll() is None and time.monotonic() < deadline:
                if self._answers():
                    return
                time.sleep(0.05)
            if self.libvirtd.poll() is None:
                break  # up but silent: no other port would help
            self.libvirtd = None
        raise RuntimeError(f"libvirtd did not start: {self._tail('libvirtd.out')} {self._tail('libvirtd.log')}")

    def _answers(self) -> bool:
        asked = self._virsh("uri", timeout=10)
        return asked is not None and asked.returncode == 0

    def _virsh(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _tail(self, name: str) -> str:
        try:
            return (self.root / "log" / name).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """Every live process of this host: its daemons, its qemus and whatever they started."""
        if self.namespace is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _mount_namespace(int(entry)) == self.namespace:
                found.append(int(entry))
        return found

    def qemu_pids(self) -> list[int]:
        """Its running qemus (libvirtd double-forks them: they are nobody's children here)."""
        daemons = {p.pid for p in (self.virtlogd, self.libvirtd) if p is not None}
        return [pid for pid in self.pids() if pid not in daemons]

    def kill(self) -> None:
        """The host goes down: libvirtd gets SIGKILL, no chance to clean up; then its qemus
        (which outlive libvirtd by design) and its virtlogd get SIGKILL too, as with a machine
        that lost power. A connection to `uri` is refused from then on."""
        if self.libvirtd is not None:
            self.libvirtd.kill()
            self.libvirtd.wait(10)
            self.libvirtd = None
        self._kill_namespace()

    def stop(self) -> None:
        """Destroy every domain it runs, stop libvirtd and virtlogd; no process of it remains."""
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            listed = self._virsh("list", "--name")
            for name in listed.stdout.split() if listed is not None and listed.returncode == 0 else []:
                self._virsh("destroy", name)
        for daemon in (self.libvirtd, self.virtlogd):
            if daemon is not None and daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(LIBVIRT_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(5)
        self.libvirtd = None
        self._kill_namespace()

    def _kill_namespace(self) -> None:
        """SIGKILL whatever still runs in the namespace (a qemu whose destroy failed), and wait."""
        deadline = time.monotonic() + LIBVIRT_STOP_TIMEOUT
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if self.virtlogd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.virtlogd.wait(5)
            self.virtlogd = None
        if not self.pids():
            self.namespace = None  # gone with its last process: its number may be reused

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
