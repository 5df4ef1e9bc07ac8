"""unik.testing.LibvirtHost: private libvirtd hosts for the libvirt provider's tests. Two run side
by side; on each, over qemu+tcp, a dir storage pool takes an uploaded volume and a tiny TCG
domain boots the micro kernel and prints on its serial console. A killed host refuses
connections at once and takes its VMs along."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_vm, static_init_initrd
from unik.kernel import BOOT_ARGS, default_kernel_root, load
from unik.testing import LIBVIRT_SYSTEM_DIRS, LibvirtHost, libvirt_missing

libvirt: Any = pytest.importorskip("libvirt", reason="the libvirt-python binding is not installed (make setup)")

BOOT_LINE = b"libvirt: init running"
BOOT_DEADLINE = 120.0
INIT_SOURCE = r"""
#include <unistd.h>
int main(void) {
    static const char line[] = "libvirt: init running\n";
    write(1, line, sizeof line - 1);
    for (;;) pause();
}
"""
# Outside a host's namespace, these stay as they were: a host writes only under its root.
SYSTEM_PATHS = [Path("/etc/libvirt"), Path("/var/run/libvirt"), *(Path(p) for p in LIBVIRT_SYSTEM_DIRS.values())]


@pytest.fixture(autouse=True)
def _needs_libvirtd() -> None:
    if (problem := libvirt_missing()) is not None:
        pytest.skip(problem)


def _system_state() -> dict[Path, list[str] | None]:
    return {path: sorted(p.name for p in path.iterdir()) if path.is_dir() else None for path in SYSTEM_PATHS}


@pytest.fixture(scope="module")
def system_before() -> dict[Path, list[str] | None]:
    return _system_state()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One capabilities cache for the module's hosts: qemu is probed once (~8 s), not per host."""
    return tmp_path_factory.mktemp("libvirt-cache")


@pytest.fixture(scope="module")
def hosts(
    tmp_path_factory: pytest.TempPathFactory, cache: Path, system_before: dict[Path, Any]
) -> Iterator[list[LibvirtHost]]:
    if (problem := libvirt_missing()) is not None:
        pytest.skip(problem)
    started: list[LibvirtHost] = []
    try:
        for name in ("host-a", "host-b"):
            began = time.perf_counter()
            started.append(LibvirtHost.start(tmp_path_factory.mktemp(name), cache=cache))
            print(f"\n{name}: libvirtd answers on {started[-1].uri} after {time.perf_counter() - began:.2f} s")
        yield started
    finally:
        for host in started:
            host.stop()


def test_two_private_hosts_answer_over_tcp(hosts: list[LibvirtHost], system_before: dict[Path, Any]) -> None:
    assert len({host.uri for host in hosts}) == 2
    for host in hosts:
        conn = libvirt.open(host.uri)
        try:
            assert conn.getURI() == host.uri
            assert conn.getType() == "QEMU"
            assert conn.listAllDomains() == []
        finally:
            conn.close()
        assert (host.root / "run" / "libvirt-sock").is_socket()
        assert (host.root / "run" / "virtlogd-sock").is_socket()
        assert len(host.pids()) == 2  # libvirtd and virtlogd, both in the host's own namespace
    assert hosts[0].namespace != hosts[1].namespace
    assert _system_state() == system_before


def test_a_volume_uploads_through_the_connection(hosts: list[LibvirtHost]) -> None:
    for index, host in enumerate(hosts):
        data = f"volume of host {index}\n".encode() * 1000
        conn = libvirt.open(host.uri)
        try:
            folder = host.root / "pool"
            pool = conn.storagePoolDefineXML(
                f"<pool type='dir'><name>unik</name><target><path>{folder}</path></target></pool>"
            )
            pool.build(0)
            pool.create(0)
            volume = pool.createXML(
                "<volume><name>data.raw</name>"
                f"<capacity unit='bytes'>{len(data)}</capacity>"
                "<target><format type='raw'/></target></volume>",
                0,
            )
            stream = conn.newStream(0)
            volume.upload(stream, 0, len(data), 0)
            chunks = iter([data[i : i + 4096] for i in range(0, len(data), 4096)])
            stream.sendAll(lambda _stream, _nbytes, rest: next(rest, b""), chunks)
            stream.finish()
            assert (folder / "data.raw").read_bytes() == data
            assert volume.info()[1] == len(data)
            pool.refresh(0)
            assert pool.listVolumes() == ["data.raw"]
            volume.delete(0)
            pool.destroy()
            pool.undefine()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initramfs whose init prints BOOT_LINE and sleeps."""
    if shutil.which("musl-gcc") is None:
        pytest.skip("musl-gcc is not installed (apt-get install -y musl-tools)")
    return static_init_initrd(tmp_path_factory.mktemp("libvirt-initrd"), INIT_SOURCE)


def domain_xml(name: str, initrd: Path) -> str:
    kernel = load(default_kernel_root(), "micro").vmlinux
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{" ".join(BOOT_ARGS)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


class ConsoleReader:
    """The domain's serial console through the connection, read by a blocking stream in a
    thread of its own (a non-blocking stream without an event loop never returns data)."""

    def __init__(self, conn: Any, dom: Any) -> None:
        self.stream = conn.newStream(0)
        dom.openConsole(None, self.stream, 0)
        self.output = b""
        self.seen = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while BOOT_LINE not in self.output:
                data = self.stream.recv(4096)
                if not isinstance(data, bytes) or not data:
                    return
                self.output += data
            self.seen.set()
        except libvirt.libvirtError:
            return

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.stream.abort()
        self.thread.join(10)


@pytest.mark.vm
@requires_vm
def test_a_tcg_domain_on_each_host_prints_on_its_console(hosts: list[LibvirtHost], initrd: Path) -> None:
    conns = [libvirt.open(host.uri) for host in hosts]
    try:
        # Started paused: qemu drops what a pty gets while nobody has it open, so the console
        # is opened first, then the guest runs.
        doms = [conn.defineXML(domain_xml(f"tiny-{i}", initrd)) for i, conn in enumerate(conns)]
        began = time.perf_counter()
        for dom in doms:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        # The first includes probing qemu's capabilities, unless the cache had them.
        print(f"\nboth domains created (paused) in {time.perf_counter() - began:.2f} s")
        for host in hosts:
            assert len(host.qemu_pids()) == 1  # each qemu in its own host's namespace
        readers = [ConsoleReader(conn, dom) for conn, dom in zip(conns, doms, strict=True)]
        began = time.perf_counter()
        for dom in doms:
            dom.resume()
        try:
            for dom, reader in zip(doms, readers, strict=True):
                assert reader.seen.wait(BOOT_DEADLINE), f"{dom.name()} console: {reader.output[-2000:]!r}"
                print(f"{dom.name()}: guest line {time.perf_counter() - began:.2f} s after resume")
        finally:
            for reader in readers:
                reader.close()
        for dom in doms:
            dom.destroy()
            dom.undefine()
        for conn in conns:
            assert conn.listAllDomains() == []
        for host in hosts:
            assert host.qemu_pids() == []
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.vm
@requires_vm
def test_a_killed_host_refuses_connections_and_its_vms_die(tmp_path: Path, cache: Path, initrd: Path) -> None:
    host = LibvirtHost.start(tmp_path / "host", cache=cache)
    try:
        conn = libvirt.open(host.uri)
        conn.defineXML(domain_xml("doomed", initrd)).create()
        qemus = host.qemu_pids()
        assert len(qemus) == 1
        host.kill()
        assert host.pids() == []
        began = time.perf_counter()
        with pytest.raises(libvirt.libvirtError):
            libvirt.open(host.uri)
        assert time.perf_counter() - began < 5
        with pytest.raises(libvirt.libvirtError):
            conn.listAllDomains()  # the open connection fails too
    finally:
        host.stop()
