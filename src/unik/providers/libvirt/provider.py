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
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

import libvirt
from unik import guest
from unik.errors import BadGateway, BadRequest, Conflict, UnikError
from unik.kernel import Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.models import ImageMeta, PortMapping, VolumeAttachment
from unik.providers.base import Capability, LaunchSpec, Provider, ProviderConfig, ProviderContext, daemon_id
from unik.providers.libvirt.config import LibvirtProviderConfig
from unik.providers.libvirt.domain import METADATA_NS, disk_xml, domain_xml, probe_xml, volume_name
from unik.providers.libvirt.streams import download, exchange, follow_console, upload
from unik.providers.network import USER_GUEST, free_port

log = logging.getLogger(__name__)
# libvirt prints every error to stderr before raising it, lookups that miss included: the
# exceptions carry them, so the daemon's log says only what matters.
libvirt.registerErrorHandler(lambda _ctx, _error: None, None)

T = TypeVar("T")
# Linux key codes for send-key: Ctrl-Alt-Del is SIGINT for the guest init (a graceful stop).
CTRL_ALT_DEL = [29, 56, 111]
STOP_SLACK = 10.0
UNPLUG_TIMEOUT = 15.0


class LibvirtProvider(Provider):
    name = "libvirt"
    infrastructure = "LIBVIRT"

    config: LibvirtProviderConfig

    def __init__(self, config: ProviderConfig, context: ProviderContext) -> None:
        if not isinstance(config, LibvirtProviderConfig):
            raise TypeError(f"the libvirt provider needs a LibvirtProviderConfig, not {type(config).__name__}")
        super().__init__(config, context)
        self.root = context.data_dir / "libvirt"
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        self.daemon_id = daemon_id(self.root)
        self._connections: dict[str, Any] = {}
        self._lock = threading.Lock()
        # instance id -> (host, libvirt state, memory MB) of the daemon's domains, last polled.
        self._domains: dict[str, tuple[str, int, int]] = {}
        self._down: dict[str, str] = {}
        self._polled = False
        self._poller: asyncio.Task[None] | None = None
        self._consoles: dict[str, threading.Thread] = {}
        # When each instance was last launched: a poll that began before must not forget it.
        self._launched: dict[str, float] = {}
        # Per host, the domain type `auto` chose.
        self._types: dict[str, str] = {}

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

    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.PUBLISHED_PORTS, Capability.HOT_PLUG, Capability.DEBUG_PORT})

    def publish_address(self) -> str | None:
        return self.config.publish_address

    def check_ports_free(self, ports: list[PortMapping]) -> None:
        """Ports are bound on the instance's host, which is chosen later: a taken one fails the run."""

    def address_of(self, instance_id: str) -> str | None:
        """Published ports listen on the instance's host: with 0.0.0.0, that host's name."""
        if self.config.publish_address != "0.0.0.0":
            return self.config.publish_address
        host = self.host_of(instance_id)
        return (urlsplit(host).hostname if host else None) or "127.0.0.1"

    def debug_port(self, instance_id: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self._folder(instance_id) / "gdb-port").read_text())
        return None

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

    async def _call(self, uri: str, work: Callable[[Any], T], *, extra: float = 0.0) -> T:
        timeout = self.config.call_timeout + extra
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._run, uri, work), timeout)
        except TimeoutError:
            raise BadGateway(f"libvirt host {uri} did not answer within {timeout:.0f} s") from None

    # -- the domain type: kvm where a probe boots under it ----------------------------------------

    async def _domain_type(self, host: str) -> str:
        if self.config.domain_type != "auto":
            return self.config.domain_type
        if host not in self._types:
            chosen = await self._call(host, self._probe, extra=self.config.probe_timeout)
            log.info("libvirt host %s runs domains of type %s", host, chosen)
            self._types[host] = chosen
        return self._types[host]

    def _probe(self, conn: Any) -> str:
        """kvm if the host offers it and a probe domain (the guest init, no app) prints its exit
        line under it in time: a host without VT-x may advertise kvm and then hang."""
        if "<domain type='kvm'" not in conn.getCapabilities():
            return "qemu"
        initrd = self.root / "probe-initrd"
        if not initrd.exists():
            empty = self.root / "probe-app"
            empty.mkdir(exist_ok=True)
            guest.assemble_initrd(initrd, init_binary=guest.ensure_init_binary(self.root / "init"), app_root=empty,
                                  entrypoint=["/unik/app"], args=[], env={}, modules=[])  # fmt: skip
        pool = self._pool(conn)
        xml = probe_xml(f"unik-probe-{uuid.uuid4().hex[:8]}", "kvm", upload(conn, pool, "probe-kernel",
                        self.kernel().vmlinux), upload(conn, pool, "probe-initrd", initrd))  # fmt: skip
        console = self.root / f"probe-{uuid.uuid4().hex[:8]}.log"
        try:
            domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError:
            return "qemu"
        try:
            follow_console(conn, domain, console, lambda: None)
            domain.resume()
            deadline = time.monotonic() + self.config.probe_timeout
            while time.monotonic() < deadline:
                if console.exists() and guest.EXIT_LINE.search(console.read_bytes()):
                    return "kvm"
                time.sleep(0.1)
            return "qemu"
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            console.unlink(missing_ok=True)

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
        if spec.memory_mb <= 0 or spec.memory_mb > self.config.max_memory_mb:
            raise BadRequest(f"memory must be between 1 and {self.config.max_memory_mb} MB")
        if self.alive(instance_id):
            return False
        host = await self._place(instance_id, spec.memory_mb)
        kernel = self.context.artifacts.path(spec.image_id, spec.artifact, "kernel")
        initrd = self.context.artifacts.path(spec.image_id, spec.artifact, "initrd")
        run_archive = guest.run_config_cpio(
            env=spec.env, args=spec.args, hostname=spec.hostname or None, stop_timeout=self.config.stop_timeout,
            net=dict(USER_GUEST), mounts=[(v.serial, v.mount, guest.guest_fs_type(v.fs_type)) for v in spec.volumes],
        )  # fmt: skip
        gdb_port = free_port() if spec.debug_mode else None
        domain_type = await self._domain_type(host)
        folder = self._folder(instance_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "host").write_text(host + "\n")

        def start(conn: Any) -> None:
            paths = {
                "kernel": upload(conn, self._pool(conn), f"img-{spec.image_id}-kernel", kernel),
                "initrd": upload(conn, self._pool(conn), f"img-{spec.image_id}-initrd", initrd),
                "run": upload(conn, self._pool(conn), f"run-{instance_id}", run_archive, replace=True),
            }
            # A volume's data goes to the host for as long as the instance runs there.
            disks = [disk_xml(v, upload(conn, self._pool(conn), volume_name(v), Path(v.path), replace=True), i)
                     for i, v in enumerate(spec.volumes)]  # fmt: skip
            xml = domain_xml(self.config, domain_type, self.daemon_id, instance_id, spec, paths, disks, gdb_port)
            # Paused until its console is read: the guest's first lines are not lost.
            try:
                domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
            except libvirt.libvirtError as exc:
                if "host forwarding rule" in (exc.get_error_message() or ""):
                    raise Conflict(f"a published port is already in use on {host}: {exc.get_error_message()}") from None
                raise
            self._follow_console(instance_id, conn, domain)
            if gdb_port is None:
                domain.resume()

        (folder / "volumes.json").write_text(json.dumps([v.model_dump(mode="json") for v in spec.volumes]))
        if gdb_port is not None:
            (folder / "gdb-port").write_text(str(gdb_port))
        await self._call(host, start)
        if gdb_port is not None:
            log.warning("instance %s waits for gdb: target remote %s:%s", instance_id, self.address_of(instance_id),
                        gdb_port)  # fmt: skip
        self._domains[instance_id] = (host, libvirt.VIR_DOMAIN_RUNNING, spec.memory_mb)
        self._launched[instance_id] = time.monotonic()
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
                    await self._bring_back_volumes(host, instance_id)
                    return
                await asyncio.sleep(0.2)
        log.warning("instance %s did not power off gracefully; destroying its domain", instance_id)
        await self._destroy(host, instance_id)
        await self._bring_back_volumes(host, instance_id)

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
                await self._bring_back_volumes(host, instance_id)
                await self._call(host, lambda conn: self._delete_volumes(conn, f"run-{instance_id}"))
        self._domains.pop(instance_id, None)
        if not keep_files:
            await asyncio.to_thread(shutil.rmtree, self._folder(instance_id), True)

    # -- volumes: on the instance's host while it runs, back in the daemon's file after ---------

    def _attached(self, instance_id: str) -> list[VolumeAttachment]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((self._folder(instance_id) / "volumes.json").read_text())
            return [VolumeAttachment.model_validate(v) for v in data]
        return []

    def _set_attached(self, instance_id: str, volumes: list[VolumeAttachment]) -> None:
        listed = json.dumps([v.model_dump(mode="json") for v in volumes])
        (self._folder(instance_id) / "volumes.json").write_text(listed)

    async def _bring_back_volumes(self, host: str, instance_id: str) -> None:
        volumes = self._attached(instance_id)
        if volumes:
            await self._call(host, lambda conn: [download(conn, self._pool(conn), v) for v in volumes])

    async def attach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Upload, hot-plug the disk, then have the guest mount it (unplugged if that fails)."""
        host = self._running_host(instance_id)

        def plug(conn: Any) -> None:
            domain = conn.lookupByName(f"unik-{instance_id}")
            taken = {t.get("dev") for t in ET.fromstring(domain.XMLDesc(0)).iterfind("devices/disk/target")}
            index = next(i for i in range(26) if f"vd{chr(ord('b') + i)}" not in taken)
            path = upload(conn, self._pool(conn), volume_name(volume), Path(volume.path), replace=True)
            domain.attachDeviceFlags(disk_xml(volume, path, index), libvirt.VIR_DOMAIN_AFFECT_LIVE)

        await self._call(host, plug)
        self._set_attached(instance_id, [*self._attached(instance_id), volume])
        fs_type = guest.guest_fs_type(volume.fs_type)
        try:
            await self._control(host, instance_id, f"mount {volume.serial} {volume.mount} {fs_type}")
        except BaseException:
            await self._unplug(host, instance_id, volume)
            raise

    async def detach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """The guest unmounts first (nothing written is lost), then the disk is unplugged and its
        data brought back."""
        host = self._running_host(instance_id)
        await self._control(host, instance_id, f"umount {volume.mount}")
        await self._unplug(host, instance_id, volume)

    async def _unplug(self, host: str, instance_id: str, volume: VolumeAttachment) -> None:
        def unplug(conn: Any) -> None:
            domain = conn.lookupByName(f"unik-{instance_id}")
            disk = next((d for d in ET.fromstring(domain.XMLDesc(0)).iterfind("devices/disk")
                         if d.findtext("serial") == volume.serial), None)  # fmt: skip
            if disk is not None:
                domain.detachDeviceFlags(ET.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            # The guest acknowledges the ACPI eject; until then the disk is still its.
            deadline = time.monotonic() + UNPLUG_TIMEOUT
            while f"<serial>{volume.serial}</serial>" in domain.XMLDesc(0):
                if time.monotonic() > deadline:
                    raise UnikError(f"the guest did not release the disk of volume {volume.serial} in time")
                time.sleep(0.1)
            download(conn, self._pool(conn), volume)

        await self._call(host, unplug)
        self._set_attached(instance_id, [v for v in self._attached(instance_id) if v.serial != volume.serial])

    def _running_host(self, instance_id: str) -> str:
        host = self.host_of(instance_id)
        if host is None or not self.alive(instance_id):
            raise Conflict("the instance is not running")
        return host

    async def _control(self, host: str, instance_id: str, command: str) -> None:
        """One request to the guest init over its control serial port, through the connection:
        `TAG COMMAND` out (again every second until answered), `TAG ok` or `TAG err WHY` back."""
        answer = await self._call(
            host, lambda conn: exchange(conn, conn.lookupByName(f"unik-{instance_id}"), command)
        )
        guest.check_control_answer(command, answer)

    def _follow_console(self, instance_id: str, conn: Any, domain: Any) -> None:
        path = self.console_path(instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._consoles[instance_id] = follow_console(conn, domain, path, lambda: self._consoles.pop(instance_id, None))

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
        began = time.monotonic()
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
        for instance_id, entry in self._domains.items():
            if instance_id not in seen and self._launched.get(instance_id, 0.0) > began:
                seen[instance_id] = entry  # launched while this poll listed its host
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
                    self._follow_console(instance_id, conn, domain)
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

