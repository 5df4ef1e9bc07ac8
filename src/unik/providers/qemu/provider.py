"""QemuProvider: an instance's life on the host (launch, liveness, stop, removal, volumes).

Each instance owns a folder `<data>/instances/<id>/` (processes.py) with its boot files
(staging.py), the console file, the QMP socket and the pidfile. qemu runs with `-daemonize`,
so it is not the daemon's child and survives a daemon restart; liveness is read from the
pidfile and /proc, which is what makes re-adoption work. The machine itself is boot.py's,
the options' spelling options.py's, and what is said to a running VM control.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from unik import guest
from unik.errors import BadRequest, Conflict, UnikError
from unik.kernel import Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.models import ImageMeta, PortMapping
from unik.providers.base import Capability, LaunchSpec, Provider, ProviderConfig, ProviderContext, VolumeAttachment
from unik.providers.network import HOSTFWD_FAILURE, HostNetwork, free_port
from unik.providers.qemu import control
from unik.providers.qemu.accel import choose_accel
from unik.providers.qemu.boot import boot_argv
from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.options import Arg, ChardevSocket, FwCfg, MemoryBackend, Name, Option, Qmp, Serial, flatten
from unik.providers.qemu.processes import QemuInstances
from unik.providers.qemu.staging import stage_boot_files
from unik.providers.qemu.templates import Template
from unik.providers.qemu.warm import WarmStarts

log = logging.getLogger(__name__)

# Longest path a unix socket may have (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
LAUNCH_TIMEOUT = 60.0
# The guest init's control channel: the second serial port, ttyS1 in the guest.
CONTROL_CHARDEV = "ctl"
# Kernel modules every image carries (the cloud kernel has the serial ports, which carry the
# console and the control channel, ext4 and the i8042 keyboard controller built in): virtio
# disks for volumes, FAT with its code pages for `fat` volumes, and the virtio NIC (with its
# failover deps) that every network mode but `none` plugs in.
BASE_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_blk", "vfat", "nls_cp437", "nls_utf8", "nls_ascii", "virtio_net",
)  # fmt: skip


class QemuProvider(Provider):
    name = "qemu"
    infrastructure = "QEMU"

    config: QemuProviderConfig

    def __init__(self, config: ProviderConfig, context: ProviderContext) -> None:
        if not isinstance(config, QemuProviderConfig):
            raise TypeError(f"the qemu provider needs a QemuProviderConfig, not {type(config).__name__}")
        super().__init__(config, context)
        data_dir = context.data_dir
        self.instances_dir = data_dir / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        longest = self.instances_dir / ("0" * 32) / "qmp.sock"
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"data dir {data_dir} is too long for QMP unix sockets; use a path under "
                f"{MAX_SOCKET_PATH - len(str(longest)) + len(str(data_dir))} characters"
            )
        self.accel, self.accel_reason = choose_accel(config)
        self.kernel_root = config.kernel_dir or default_kernel_root()
        self.network = HostNetwork(config)
        self.vms = QemuInstances(self.instances_dir)
        self.warm = WarmStarts(config, data_dir / "templates", self.vms, self.network)

    def console_path(self, instance_id: str) -> Path:
        return self.vms.console(instance_id)

    def kernel(self) -> Kernel:
        try:
            return load_kernel(self.kernel_root, self.config.kernel)
        except FileNotFoundError as exc:
            raise UnikError(str(exc)) from exc

    def status(self) -> dict[str, Any]:
        try:
            kernel: str | None = self.kernel().version
        except UnikError:
            kernel = None
        return {
            "name": self.name,
            "infrastructure": self.infrastructure,
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "machine": self.config.machine,
            "kernel": kernel,
            "qemu": shutil.which(self.config.qemu_binary),
        }

    # -- liveness ----------------------------------------------------------------------

    def instance_ids(self) -> set[str]:
        return self.vms.ids()

    def alive(self, instance_id: str) -> bool:
        return self.vms.pid(instance_id) is not None

    # -- lifecycle ---------------------------------------------------------------------

    def _command(
        self,
        instance_id: str,
        kernel: Path,
        initrd: Path,
        spec: LaunchSpec,
        run_archive: Path | None,
        memory: MemoryBackend | None,
        template: Template | None,
    ) -> list[str]:
        argv = boot_argv(
            self.config, self.accel, kernel=kernel, initrd=initrd, memory_mb=spec.memory_mb,
            console=self.console_path(instance_id), kernel_version=spec.kernel_version, memory=memory,
        )  # fmt: skip
        # A clone waits for its template's state (migrate-incoming once qemu is up).
        options: list[Option] = [Arg("-incoming", "defer")] if template else []
        if run_archive is not None:
            options.append(FwCfg(guest.FW_CFG_RUN_ARCHIVE, run_archive))
        options += [
            Name(self.vms.vm_name(instance_id)),
            Qmp(self.vms.qmp(instance_id)),
            Arg("-pidfile", self.vms.pidfile(instance_id)),
            Arg("-daemonize"),
            # The control channel to the guest init (volume mount/unmount while running).
            ChardevSocket(CONTROL_CHARDEV, self.vms.control(instance_id)),
            Serial(CONTROL_CHARDEV),
        ]
        for volume in spec.volumes:
            options += [control.blockdev(volume), control.disk_device(volume)]
        argv += flatten(options)
        argv += self.network.qemu_args(instance_id, [port.model_dump() for port in spec.ports])
        if spec.debug_mode:
            port = self.config.debugger_port or free_port()
            self.vms.gdb_port(instance_id).write_text(str(port))
            argv += flatten([Arg("-gdb", f"tcp:127.0.0.1:{port}"), Arg("-S")])
        return argv

    def _prepare(
        self, instance_id: str, spec: LaunchSpec, warm_key: str | None, template: Template | None
    ) -> list[str]:
        """The instance's files (boot files with the run config, no stale sockets) and its host
        network; returns the qemu command line."""
        run_config = guest.run_config_cpio(
            env=spec.env,
            args=spec.args,
            hostname=spec.hostname or None,
            stop_timeout=self.config.stop_timeout,
            mounts=[(v.serial, v.mount, guest.guest_fs_type(v.fs_type)) for v in spec.volumes],
            net=self.network.guest_config(spec.address),
        )
        files = stage_boot_files(self.vms.folder(instance_id), self.context.artifacts, spec, run_config, self.kernel)
        vms = self.vms
        for stale in (vms.pidfile(instance_id), vms.qmp(instance_id), vms.control(instance_id),
                      vms.gdb_port(instance_id), vms.ram_file(instance_id)):  # fmt: skip
            stale.unlink(missing_ok=True)
        memory = self.warm.memory(instance_id, spec.memory_mb, warm_key, template)
        argv = self._command(instance_id, files.kernel, files.initrd, spec, files.run_archive, memory, template)
        self.network.prepare(instance_id)
        return argv

    async def launch(self, instance_id: str, spec: LaunchSpec) -> bool:
        if spec.memory_mb <= 0 or spec.memory_mb > self.config.max_memory_mb:
            raise BadRequest(f"memory must be between 1 and {self.config.max_memory_mb} MB")
        if self.alive(instance_id):
            return False
        warm_key = self.warm.key(instance_id, spec)
        template = self.warm.templates.find(warm_key) if warm_key else None
        console = self.console_path(instance_id)
        console_from = console.stat().st_size if console.exists() else 0
        # One worker-thread hop for all the file work: each hop is on the boot's critical path.
        argv = await asyncio.to_thread(self._prepare, instance_id, spec, warm_key, template)
        await self._start_qemu(instance_id, argv)
        if template is not None:
            try:
                await self.warm.restore(instance_id, spec, template)
            except BaseException:
                await self.vms.kill(instance_id)
                await asyncio.to_thread(self.release_network, instance_id)
                raise
            return True
        if spec.debug_mode:
            port = self.debug_port(instance_id)
            log.warning("instance %s waits for gdb: target remote 127.0.0.1:%s", instance_id, port)
        if warm_key is not None:
            self.warm.capture_when_ready(instance_id, spec, warm_key, console_from)
        return False

    async def _start_qemu(self, instance_id: str, argv: list[str]) -> None:
        # Shell-quoted: a path with a space stays one word when the line is pasted into a shell.
        log.debug("launching %s", shlex.join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), LAUNCH_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            await asyncio.to_thread(self.release_network, instance_id)
            raise UnikError(f"qemu did not start within {LAUNCH_TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            await asyncio.to_thread(self.release_network, instance_id)
            message = out.decode(errors="replace").strip()
            if HOSTFWD_FAILURE in message:
                raise Conflict(f"a published port is already in use: {message}")
            raise UnikError(f"qemu failed to start: {message}")

    def forget_image(self, image_id: str, meta: ImageMeta) -> None:
        self.warm.templates.remove_image(image_id)

    def debug_port(self, instance_id: str) -> int | None:
        try:
            return int(self.vms.gdb_port(instance_id).read_text())
        except (OSError, ValueError):
            return None

    async def stop(self, instance_id: str) -> None:
        pid = self.vms.pid(instance_id)
        if pid is None:
            return
        # Ctrl-Alt-Del reaches PID 1 as SIGINT on -M pc; the guest init stops the app,
        # syncs and powers off. Waiting gives the app its stop_timeout plus boot slack.
        with contextlib.suppress(Exception):
            status = await self._qmp(instance_id, "query-status")
            # A paused guest (DebugMode waiting for gdb) cannot react to a key press.
            if status.get("running"):
                keys = [control.qcode(key) for key in ("ctrl", "alt", "delete")]
                await self._qmp(instance_id, "send-key", {"keys": keys})
                if await self.vms.wait_exit(instance_id, pid, self.config.stop_timeout + 10.0):
                    await asyncio.to_thread(self.release_network, instance_id)
                    return
        log.warning("instance %s did not power off gracefully; killing qemu", instance_id)
        await self.vms.kill(instance_id)
        await asyncio.to_thread(self.release_network, instance_id)

    async def _qmp(self, instance_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await control.qmp(self.vms.qmp(instance_id), self.vms.vm_name(instance_id), command, arguments)

    # -- volumes -----------------------------------------------------------------------

    async def attach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Hot-plug a virtio-blk disk over QMP, then have the guest mount it."""
        qmp_path, name = self.vms.qmp(instance_id), self.vms.vm_name(instance_id)
        await control.plug_disk(qmp_path, name, volume)
        fs_type = guest.guest_fs_type(volume.fs_type)
        try:
            await self._control(instance_id, f"mount {volume.serial} {volume.mount} {fs_type}")
        except Exception:
            await control.unplug_disk(qmp_path, name, volume)
            raise

    async def detach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Unmount in the guest first (nothing written is lost), then unplug the disk."""
        await self._control(instance_id, f"umount {volume.mount}")
        await control.unplug_disk(self.vms.qmp(instance_id), self.vms.vm_name(instance_id), volume)

    async def _control(self, instance_id: str, command: str) -> None:
        if not self.alive(instance_id):
            raise Conflict("the instance is not running")
        await control.guest_control(self.vms.control(instance_id), command)

    async def remove(self, instance_id: str, *, keep_files: bool = False) -> None:
        await self.vms.kill(instance_id)
        await asyncio.to_thread(self.release_network, instance_id)
        if not keep_files:
            await asyncio.to_thread(shutil.rmtree, self.vms.folder(instance_id), True)

    # -- networking (providers/network.py does the work) ---------------------------------

    def instance_subnet(self) -> IPv4Network | None:
        return self.network.subnet()

    def publish_address(self) -> str | None:
        return self.network.publish_address()

    def check_ports_free(self, ports: list[PortMapping]) -> None:
        self.network.check_ports_free([port.model_dump() for port in ports])

    # -- what it can do and what its images carry ------------------------------------------

    def capabilities(self) -> frozenset[Capability]:
        network = {
            "user": {Capability.PUBLISHED_PORTS},
            "bridge": {Capability.OWN_ADDRESSES},
            "none": set(),
        }[self.config.network]
        return frozenset({Capability.HOT_PLUG, Capability.DEBUG_PORT, Capability.WARM_START, *network})

    def image_modules(self) -> list[str]:
        return list(BASE_MODULES)

    def release_network(self, instance_id: str) -> None:
        # A VM that is still running keeps its tap (the monitor may race a restart).
        if not self.alive(instance_id):
            self.network.release(instance_id)

