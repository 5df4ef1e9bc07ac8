"""LibvirtProvider: each instance a transient libvirt domain on one of the configured hosts.

Nothing assumes the daemon shares a filesystem with a host: an image's kernel and initrd are
uploaded once per host into a `dir` storage pool through the connection, an instance's run
archive too (the guest reads it through fw_cfg, as a big image's instances do on qemu), and
its console is read through the connection (`openConsole`) into the daemon's console file.
Domains carry unik metadata (instance, image, daemon); the hosts are polled for them in the
background, so a restarted daemon re-adopts what runs and alive() never waits on a host.
Every libvirt call runs in a worker thread under `call_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape, quoteattr

from unik import guest
from unik.errors import BadGateway, BadRequest, NotImplementedByProvider, UnikError
from unik.kernel import BOOT_ARGS, Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.models import ImageMeta
from unik.providers.base import LaunchSpec, Provider, ProviderConfig, ProviderContext
from unik.providers.libvirt.config import LibvirtProviderConfig
from unik.providers.network import USER_GUEST

try:
    import libvirt
except ImportError:  # the binding is installed by `make setup`; without it the provider says so
    libvirt = None

log = logging.getLogger(__name__)

T = TypeVar("T")
METADATA_NS = "https://unik.dev/xmlns/libvirt/1"
# Linux key codes for send-key: Ctrl-Alt-Del is SIGINT for the guest init (a graceful stop).
CTRL_ALT_DEL = [29, 56, 111]
STOP_SLACK = 10.0


class LibvirtProvider(Provider):
    name = "libvirt"
    infrastructure = "LIBVIRT"

    config: LibvirtProviderConfig

    def __init__(self, config: ProviderConfig, context: ProviderContext) -> None:
        if not isinstance(config, LibvirtProviderConfig):
            raise TypeError(f"the libvirt provider needs a LibvirtProviderConfig, not {type(config).__name__}")
        if libvirt is None:
            raise RuntimeError("the libvirt provider needs the libvirt-python binding: run `make setup`")
        super().__init__(config, context)
        self.root = context.data_dir / "libvirt"
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        id_file = self.root / "daemon-id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex + "\n")
        self.daemon_id = id_file.read_text().strip()
        self._connections: dict[str, Any] = {}
        self._lock = threading.Lock()
        # instance id -> (host, libvirt state, memory MB) of the daemon's domains, last polled.
        self._domains: dict[str, tuple[str, int, int]] = {}
        self._down: dict[str, str] = {}
        self._polled = False
        self._poller: asyncio.Task[None] | None = None
        self._consoles: dict[str, threading.Thread] = {}

    # -- what it is -------------------------------------------------------------------------

    def kernel(self) -> Kernel:
        try:
            return load_kernel(default_kernel_root(), "micro")
        except FileNotFoundError as exc:
            raise UnikError(str(exc)) from exc

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "infrastructure": self.infrastructure, "hosts": self.config.hosts,
                "down": dict(self._down)}  # fmt: skip

    def console_path(self, instance_id: str) -> Path:
        return self._folder(instance_id) / "console.log"

    def _folder(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id

    def host_of(self, instance_id: str) -> str | None:
        with contextlib.suppress(OSError):
            return (self._folder(instance_id) / "host").read_text().strip() or None
        return None

    # -- connections: every call in a thread, under a deadline ----------------------------------

    def _conn(self, uri: str) -> Any:
        with self._lock:
            conn = self._connections.get(uri)
        if conn is not None:
            with contextlib.suppress(Exception):
                if conn.isAlive():
                    return conn
        conn = libvirt.open(uri)
        with self._lock:
            self._connections[uri] = conn
        return conn

    def _run(self, uri: str, work: Callable[[Any], T]) -> T:
        try:
            return work(self._conn(uri))
        except libvirt.libvirtError as exc:
            with self._lock:
                self._connections.pop(uri, None)
            raise BadGateway(f"libvirt host {uri}: {exc.get_error_message()}") from exc

    async def _call(self, uri: str, work: Callable[[Any], T]) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._run, uri, work), self.config.call_timeout)
        except TimeoutError:
            raise BadGateway(f"libvirt host {uri} did not answer within {self.config.call_timeout:.0f} s") from None

    # -- images: kernel and initrd, uploaded once per host ---------------------------------------

    def _pool(self, conn: Any) -> Any:
        try:
            pool = conn.storagePoolLookupByName(self.config.pool)
        except libvirt.libvirtError:
            xml = (f"<pool type='dir'><name>{escape(self.config.pool)}</name>"
                   f"<target><path>{escape(self.config.pool_path)}</path></target></pool>")  # fmt: skip
            pool = conn.storagePoolDefineXML(xml, 0)
            pool.build(0)
            pool.setAutostart(1)
        if not pool.isActive():
            pool.create(0)
        return pool

    def _upload(self, conn: Any, name: str, source: Path | bytes, *, replace: bool = False) -> str:
        """The host-side path of volume `name` holding `source`, uploaded through the connection
        unless there (or `replace`)."""
        pool = self._pool(conn)
        with contextlib.suppress(libvirt.libvirtError):
            existing = pool.storageVolLookupByName(name)
            if not replace:
                return str(existing.path())
            existing.delete(0)
        data = source if isinstance(source, bytes) else None
        size = len(data) if data is not None else Path(source).stat().st_size  # type: ignore[arg-type]
        xml = f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{max(size, 1)}</capacity></volume>"
        volume = pool.createXML(xml, 0)
        stream = conn.newStream(0)
        volume.upload(stream, 0, size, 0)
        if data is not None:
            stream.sendAll(lambda _stream, n, buf: buf.pop(0)[:n] if buf else b"", [data])
        else:
            with open(source, "rb") as f:  # type: ignore[arg-type]
                stream.sendAll(lambda _stream, n, file: file.read(n), f)
        stream.finish()
        return str(volume.path())

    def forget_image(self, image_id: str, meta: ImageMeta) -> None:
        for uri in self.config.hosts:
            try:
                self._run(uri, lambda conn: self._delete_volumes(conn, f"img-{image_id}-"))
            except UnikError as exc:
                log.warning("image %s's files on %s not removed: %s", image_id, uri, exc)

    def _delete_volumes(self, conn: Any, prefix: str) -> None:
        pool = self._pool(conn)
        for volume in pool.listAllVolumes(0):
            if volume.name().startswith(prefix):
                volume.delete(0)

    # -- instances ------------------------------------------------------------------------------

    async def launch(self, instance_id: str, spec: LaunchSpec) -> bool:
        if spec.volumes:
            raise NotImplementedByProvider("provider libvirt cannot attach volumes yet")
        if spec.memory_mb <= 0 or spec.memory_mb > self.config.max_memory_mb:
            raise BadRequest(f"memory must be between 1 and {self.config.max_memory_mb} MB")
        if self.alive(instance_id):
            return False
        host = await self._place(instance_id, spec.memory_mb)
        kernel = self.context.artifacts.path(spec.image_id, spec.artifact, "kernel")
        initrd = self.context.artifacts.path(spec.image_id, spec.artifact, "initrd")
        run_archive = guest.run_config_cpio(
            env=spec.env, args=spec.args, hostname=spec.hostname or None, stop_timeout=self.config.stop_timeout,
            net=dict(USER_GUEST),
        )  # fmt: skip
        folder = self._folder(instance_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "host").write_text(host + "\n")

        def start(conn: Any) -> None:
            paths = {
                "kernel": self._upload(conn, f"img-{spec.image_id}-kernel", kernel),
                "initrd": self._upload(conn, f"img-{spec.image_id}-initrd", initrd),
                "run": self._upload(conn, f"run-{instance_id}", run_archive, replace=True),
            }
            # Paused until its console is read: the guest's first lines are not lost.
            domain = conn.createXML(self._domain_xml(instance_id, spec, paths), libvirt.VIR_DOMAIN_START_PAUSED)
            self._follow_console(instance_id, host, domain)
            domain.resume()

        await self._call(host, start)
        self._domains[instance_id] = (host, libvirt.VIR_DOMAIN_RUNNING, spec.memory_mb)
        self._ensure_poller()
        return False

    async def _place(self, instance_id: str, memory_mb: int) -> str:
        """The host with the most free memory that fits the instance, among those that answer.

        A guest touches its RAM lazily, so a host's free memory does not count yet what the
        daemon's recent instances will use: their whole memory is taken off, a conservative
        view that also spreads instances over hosts that share a machine."""
        free: dict[str, int] = {}

        async def ask(uri: str) -> None:
            try:
                free[uri] = await self._call(uri, lambda conn: int(conn.getFreeMemory()))
                self._down.pop(uri, None)
            except UnikError as exc:
                self._down[uri] = str(exc)

        await asyncio.gather(*(ask(uri) for uri in self.config.hosts))
        for other, (uri, _, mb) in self._domains.items():
            if uri in free and other != instance_id:
                free[uri] -= mb << 20
        fits = {uri: mem for uri, mem in free.items() if mem >= memory_mb << 20}
        if not fits:
            why = "; ".join(f"{uri}: {why}" for uri, why in self._down.items()) or "not enough free memory"
            raise BadGateway(f"no libvirt host can take a {memory_mb} MB instance ({why})")
        previous = self.host_of(instance_id)
        if previous in fits:
            return previous  # type: ignore[return-value]
        return max(fits, key=lambda uri: fits[uri])

    def _domain_xml(self, instance_id: str, spec: LaunchSpec, paths: dict[str, str]) -> str:
        cmdline = " ".join([*BOOT_ARGS, "noapictimer", "pmtmr=0"] if self.config.domain_type == "qemu" else BOOT_ARGS)
        return f"""<domain type='{self.config.domain_type}'>
  <name>unik-{instance_id}</name>
  <uuid>{uuid.UUID(instance_id)}</uuid>
  <metadata><unik:instance xmlns:unik='{METADATA_NS}' id='{instance_id}' image='{spec.image_id}'
    daemon='{self.daemon_id}'/></metadata>
  <memory unit='MiB'>{spec.memory_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(paths["kernel"])}</kernel>
    <initrd>{escape(paths["initrd"])}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <sysinfo type='fwcfg'><entry name='{guest.FW_CFG_RUN_ARCHIVE}' file={quoteattr(paths["run"])}/></sysinfo>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model>
    <feature policy='require' name='rdrand'/></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <serial type='pty'><target port='1'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <interface type='user'><model type='virtio'/></interface>
    <memballoon model='none'/>
  </devices>
</domain>"""

    def _follow_console(self, instance_id: str, host: str, domain: Any) -> None:
        """A thread copying the guest's console from the connection into the console file
        until the domain ends (a blocking stream: without an event loop non-blocking ones
        never return data)."""
        conn = self._conn(host)
        stream = conn.newStream(0)
        domain.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        path = self.console_path(instance_id)

        def copy() -> None:
            with open(path, "ab", buffering=0) as out, contextlib.suppress(Exception):
                while data := stream.recv(4096):
                    if isinstance(data, int):  # -2: would block, on a blocking stream: never
                        break
                    out.write(data)
            with contextlib.suppress(Exception):
                stream.finish()
            self._consoles.pop(instance_id, None)

        thread = threading.Thread(target=copy, name=f"console-{instance_id[:8]}", daemon=True)
        self._consoles[instance_id] = thread
        thread.start()

    async def stop(self, instance_id: str) -> None:
        host = self.host_of(instance_id)
        if host is None or not self.alive(instance_id):
            return

        def press(conn: Any) -> None:
            conn.lookupByName(f"unik-{instance_id}").sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 0, CTRL_ALT_DEL, 3, 0)

        with contextlib.suppress(UnikError):
            await self._call(host, press)
            deadline = time.monotonic() + self.config.stop_timeout + STOP_SLACK
            while time.monotonic() < deadline:
                if not await self._call(host, lambda conn: self._exists(conn, instance_id)):
                    self._domains.pop(instance_id, None)
                    return
                await asyncio.sleep(0.2)
        log.warning("instance %s did not power off gracefully; destroying its domain", instance_id)
        await self._destroy(host, instance_id)

    def _exists(self, conn: Any, instance_id: str) -> bool:
        try:
            conn.lookupByName(f"unik-{instance_id}")
        except libvirt.libvirtError:
            return False
        return True

    async def _destroy(self, host: str, instance_id: str) -> None:
        def destroy(conn: Any) -> None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(f"unik-{instance_id}").destroy()

        await self._call(host, destroy)
        self._domains.pop(instance_id, None)

    async def remove(self, instance_id: str, *, keep_files: bool = False) -> None:
        host = self.host_of(instance_id)
        if host is not None:
            with contextlib.suppress(UnikError):
                await self._destroy(host, instance_id)
                await self._call(host, lambda conn: self._delete_volumes(conn, f"run-{instance_id}"))
        self._domains.pop(instance_id, None)
        if not keep_files:
            await asyncio.to_thread(shutil.rmtree, self._folder(instance_id), True)

    # -- what runs where: polled in the background --------------------------------------------

    def unreachable(self, instance_id: str) -> str | None:
        host = self.host_of(instance_id)
        if host is not None and host in self._down:
            return f"its host {host} does not answer: {self._down[host]}"
        return None

    def alive(self, instance_id: str) -> bool:
        if not self._polled:
            self._poll_once()
        self._ensure_poller()
        found = self._domains.get(instance_id)
        return found is not None and found[1] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED,
                                                  libvirt.VIR_DOMAIN_BLOCKED)  # fmt: skip

    def instance_ids(self) -> set[str]:
        if not self._polled:
            self._poll_once()
        folders = {p.name for p in (self.root / "instances").iterdir() if p.is_dir()}
        return folders | set(self._domains)

    def _poll_once(self) -> None:
        seen: dict[str, tuple[str, int, int]] = {}
        for uri in self.config.hosts:
            try:
                seen.update(self._run(uri, lambda conn, uri=uri: self._daemon_domains(conn, uri)))
                self._down.pop(uri, None)
            except UnikError as exc:
                if uri not in self._down:
                    log.warning("libvirt host %s is unreachable: %s", uri, exc)
                self._down[uri] = str(exc)
                # Its instances are not known to run: they read stopped until it answers again.
        self._domains = seen
        self._polled = True

    def _daemon_domains(self, conn: Any, uri: str) -> dict[str, tuple[str, int, int]]:
        found: dict[str, tuple[str, int, int]] = {}
        for domain in conn.listAllDomains(0):
            try:
                element = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
            except libvirt.libvirtError:
                continue  # not one of unik's
            if f"daemon=\"{self.daemon_id}\"" not in element and f"daemon='{self.daemon_id}'" not in element:
                continue
            instance_id = domain.name().removeprefix("unik-")
            state = domain.state(0)[0]
            found[instance_id] = (uri, state, domain.maxMemory() >> 10)
            if instance_id not in self._consoles and state == libvirt.VIR_DOMAIN_RUNNING:
                # Re-adopted after a restart: its console is read again (what it printed while
                # nobody read is lost with the pty).
                with contextlib.suppress(Exception):
                    self._follow_console(instance_id, uri, domain)
        return found

    def _ensure_poller(self) -> None:
        if self._poller is not None and not self._poller.done():
            return
        with contextlib.suppress(RuntimeError):
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(self._poll_once), self.config.call_timeout)
