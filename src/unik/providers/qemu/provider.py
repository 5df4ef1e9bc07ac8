"""The QEMU provider: one detached qemu per instance, TCG unless KVM really works.

Each instance owns a folder `<data>/instances/<id>/` with its own hard links to the image's
kernel and initrd (so deleting or replacing the image never breaks it), the per-boot initrd
(image initrd + a small run-config cpio) or, for a big image on a kernel that reads fw_cfg, the
run-config cpio alone (`run.cpio`, handed over as a fw_cfg file while the VM boots the image's
initrd itself), the console file, the QMP socket and the pidfile.
qemu runs with `-daemonize`, so it is not the daemon's child and survives a daemon restart;
liveness is read from the pidfile and /proc, which is what makes re-adoption work.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import signal
import time
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from unik import guest
from unik.errors import BadRequest, Conflict, UnikError
from unik.kernel import BOOT_ARGS, MICRO_LOCALVERSION, Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.providers.base import LaunchSpec, Provider, VolumeAttachment
from unik.providers.network import HOSTFWD_FAILURE, HostNetwork, free_port
from unik.providers.qemu.config import QemuProviderConfig

log = logging.getLogger(__name__)

# Longest path a unix socket may have (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
LAUNCH_TIMEOUT = 60.0
KILL_WAIT = 5.0
PIDFILE = "qemu.pid"
CONTROL_TIMEOUT = 30.0
CONTROL_RESEND = 1.0
UNPLUG_TIMEOUT = 15.0
# qemu's default model plus RDRAND, which the guest kernel seeds its CRNG from at boot
# (random.trust_cpu in BOOT_ARGS). Under TCG the instruction returns the host's getrandom().
CPU_MODEL = "qemu64,+rdrand"
# From this size on, an image's initrd is not copied for each boot (see _shares_image_initrd).
SHARED_INITRD_MIN_BYTES = 8 << 20


def kvm_usable() -> tuple[bool, str]:
    """KVM only when the CPU has vmx/svm *and* /dev/kvm creates a VM (PLATFORM.md: the node alone lies)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False, "cannot read /proc/cpuinfo"
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    if not flags & {"vmx", "svm"}:
        return False, "the CPU has no vmx/svm flag"
    kvm_get_api_version, kvm_create_vm = 0xAE00, 0xAE01
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    try:
        if fcntl.ioctl(fd, kvm_get_api_version) != 12:
            return False, "unexpected KVM API version"
        vm_fd = fcntl.ioctl(fd, kvm_create_vm, 0)
        os.close(vm_fd)
    except OSError as exc:
        return False, f"KVM_CREATE_VM failed: {exc.strerror}"
    finally:
        os.close(fd)
    return True, "KVM works"


class QemuProvider(Provider):
    name = "qemu"
    infrastructure = "QEMU"

    def __init__(self, config: QemuProviderConfig, data_dir: Path) -> None:
        self.config = config
        self.instances_dir = data_dir / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        longest = self.instances_dir / ("0" * 32) / "qmp.sock"
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"data dir {data_dir} is too long for QMP unix sockets; use a path under "
                f"{MAX_SOCKET_PATH - len(str(longest)) + len(str(data_dir))} characters"
            )
        if config.accel == "auto":
            use_kvm, self.accel_reason = kvm_usable()
            self.accel = "kvm" if use_kvm else "tcg"
        else:
            self.accel, self.accel_reason = config.accel, "set in the daemon config"
        self.kernel_root = config.kernel_dir or default_kernel_root()
        self.network = HostNetwork(config)

    # -- files -------------------------------------------------------------------------

    def _dir(self, instance_id: str) -> Path:
        return self.instances_dir / instance_id

    def console_path(self, instance_id: str) -> Path:
        return self._dir(instance_id) / "console.log"

    def _pidfile(self, instance_id: str) -> Path:
        return self._dir(instance_id) / PIDFILE

    def _qmp_path(self, instance_id: str) -> Path:
        return self._dir(instance_id) / "qmp.sock"

    def _ctl_path(self, instance_id: str) -> Path:
        return self._dir(instance_id) / "ctl.sock"

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

    def _pid(self, instance_id: str) -> int | None:
        try:
            pid = int(self._pidfile(instance_id).read_text().strip())
        except (OSError, ValueError):
            return None
        # A pid reused by another program is not ours.
        return pid if self._instance_of(pid) == instance_id else None

    def _instance_of(self, pid: int) -> str | None:
        """The instance whose VM process `pid` is: a live qemu started with a pidfile in one of
        this provider's instance folders (what every launch passes), else None."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            pidfile = Path(os.fsdecode(argv[argv.index(b"-pidfile") + 1]))
        except (OSError, ValueError, IndexError):
            return None
        if pidfile.name != PIDFILE or pidfile.parent.parent != self.instances_dir:
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # A zombie has exited.
        return None if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X") else pidfile.parent.name

    def _running_vms(self) -> dict[str, int]:
        """The pid of every VM of this provider's instances, found through /proc rather than the
        pidfiles: it also finds a VM whose folder was deleted under it."""
        found: dict[str, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (instance_id := self._instance_of(int(name))):
                found[instance_id] = int(name)
        return found

    def instance_ids(self) -> set[str]:
        folders = {entry.name for entry in self.instances_dir.iterdir() if entry.is_dir()}
        return folders | set(self._running_vms())

    def alive(self, instance_id: str) -> bool:
        return self._pid(instance_id) is not None

    # -- lifecycle ---------------------------------------------------------------------

    def _command(
        self, instance_id: str, kernel: Path, initrd: Path, spec: LaunchSpec, run_archive: Path | None
    ) -> list[str]:
        argv = boot_argv(
            self.config, self.accel, kernel=kernel, initrd=initrd, memory_mb=spec.memory_mb,
            console=self.console_path(instance_id), kernel_version=spec.kernel_version,
        )  # fmt: skip
        if run_archive is not None:
            argv += ["-fw_cfg", f"name={guest.FW_CFG_RUN_ARCHIVE},file={_escape(run_archive)}"]
        argv += [
            "-name", f"unik-{instance_id[:12]}",
            "-qmp", f"unix:{self._qmp_path(instance_id)},server=on,wait=off",
            "-pidfile", str(self._pidfile(instance_id)),
            "-daemonize",
            # The control channel to the guest init (volume mount/unmount while running): the
            # second serial port, ttyS1 in the guest (the console is the first).
            "-chardev", f"socket,id=ctl,path={_escape(self._ctl_path(instance_id))},server=on,wait=off",
            "-serial", "chardev:ctl",
        ]  # fmt: skip
        for volume in spec.volumes:
            argv += ["-blockdev", _blockdev(volume), "-device", _disk_device(volume)]
        argv += self.network.qemu_args(instance_id, spec.ports)
        if spec.debug_mode:
            port = self.config.debugger_port or free_port()
            (self._dir(instance_id) / "gdb.port").write_text(str(port))
            argv += ["-gdb", f"tcp:127.0.0.1:{port}", "-S"]
        return argv

    def _prepare(self, instance_id: str, spec: LaunchSpec) -> list[str]:
        """The instance's files (kernel, boot initrd with the run config, no stale sockets) and
        its host network; returns the qemu command line."""
        folder = self._dir(instance_id)
        folder.mkdir(parents=True, exist_ok=True)
        kernel = folder / "kernel"
        image_initrd = folder / "image.initrd"
        _link_or_copy(Path(spec.kernel), kernel)
        _link_or_copy(Path(spec.initrd), image_initrd)
        boot_initrd, run_archive = folder / "boot.initrd", folder / "run.cpio"
        run_config = guest.run_config_cpio(
            env=spec.env,
            args=spec.args,
            hostname=spec.hostname or None,
            stop_timeout=self.config.stop_timeout,
            mounts=[(v.serial, v.mount, _guest_fs_type(v.fs_type)) for v in spec.volumes],
            net=self.network.guest_config(spec.address),
        )
        fw_cfg_archive: Path | None = None
        if self._shares_image_initrd(spec, image_initrd):
            _write_new(run_archive, run_config)
            boot_initrd.unlink(missing_ok=True)
            initrd, fw_cfg_archive = image_initrd, run_archive
        else:
            _concat(image_initrd, run_config, boot_initrd)
            run_archive.unlink(missing_ok=True)
            initrd = boot_initrd
        for stale in (self._pidfile(instance_id), self._qmp_path(instance_id), self._ctl_path(instance_id),
                      folder / "gdb.port"):  # fmt: skip
            stale.unlink(missing_ok=True)
        argv = self._command(instance_id, kernel, initrd, spec, fw_cfg_archive)
        self.network.prepare(instance_id)
        return argv

    def _shares_image_initrd(self, spec: LaunchSpec, image_initrd: Path) -> bool:
        """Whether a boot can use the image's initrd file itself, its run archive going through
        fw_cfg. Worth it for big initrds: a copy per instance costs disk, page cache, ~35 ms per
        88 MB and a writeback while other VMs boot, where init's unpacking costs ~2 ms. The
        image's kernel must be a build of the provider's own, whose config says fw_cfg is in
        sysfs (the micro kernel; Debian's has it as a module): the same release, whose name
        carries the build key of its config, so a pulled image qualifies as a built one does.
        For any other kernel, the copy."""
        if image_initrd.stat().st_size < SHARED_INITRD_MIN_BYTES:
            return False
        try:
            kernel = self.kernel()
            if spec.kernel_version:
                same_build = spec.kernel_version == kernel.version
            else:  # an instance recorded before the kernel's release was
                same_build = Path(spec.kernel).samefile(kernel.vmlinux)
            return same_build and kernel.builds_in("CONFIG_FW_CFG_SYSFS")
        except (UnikError, OSError):
            return False

    async def launch(self, instance_id: str, spec: LaunchSpec) -> None:
        if spec.memory_mb <= 0 or spec.memory_mb > self.config.max_memory_mb:
            raise BadRequest(f"memory must be between 1 and {self.config.max_memory_mb} MB")
        if self.alive(instance_id):
            return
        # One worker-thread hop for all the file work: each hop is on the boot's critical path.
        argv = await asyncio.to_thread(self._prepare, instance_id, spec)
        log.debug("launching %s", " ".join(argv))
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
        if spec.debug_mode:
            port = self.debug_port(instance_id)
            log.warning("instance %s waits for gdb: target remote 127.0.0.1:%s", instance_id, port)

    def debug_port(self, instance_id: str) -> int | None:
        try:
            return int((self._dir(instance_id) / "gdb.port").read_text())
        except (OSError, ValueError):
            return None

    async def stop(self, instance_id: str) -> None:
        pid = self._pid(instance_id)
        if pid is None:
            return
        # Ctrl-Alt-Del reaches PID 1 as SIGINT on -M pc; the guest init stops the app,
        # syncs and powers off. Waiting gives the app its stop_timeout plus boot slack.
        with contextlib.suppress(Exception):
            status = await self._qmp(instance_id, "query-status")
            # A paused guest (DebugMode waiting for gdb) cannot react to a key press.
            if status.get("running"):
                keys = [_qcode("ctrl"), _qcode("alt"), _qcode("delete")]
                await self._qmp(instance_id, "send-key", {"keys": keys})
                if await self._wait_exit(instance_id, pid, self.config.stop_timeout + 10.0):
                    await asyncio.to_thread(self.release_network, instance_id)
                    return
        log.warning("instance %s did not power off gracefully; killing qemu", instance_id)
        await self._kill(instance_id)
        await asyncio.to_thread(self.release_network, instance_id)

    async def _kill(self, instance_id: str) -> None:
        pid = self._pid(instance_id)
        if pid is None and not self._dir(instance_id).exists():
            # Its folder was deleted under it: the VM, if it still runs, is found through /proc.
            pid = self._running_vms().get(instance_id)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await self._wait_exit(instance_id, pid, KILL_WAIT)

    async def _wait_exit(self, instance_id: str, pid: int, timeout: float) -> bool:
        """Whether the instance's VM process `pid` ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._instance_of(pid) != instance_id:
                return True
            await asyncio.sleep(0.1)
        return self._instance_of(pid) != instance_id

    async def _qmp(self, instance_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        client = QMPClient(f"unik-{instance_id[:12]}")
        await asyncio.wait_for(client.connect(str(self._qmp_path(instance_id))), 5.0)
        try:
            return await asyncio.wait_for(client.execute(command, arguments), 10.0)
        finally:
            await client.disconnect()

    # -- volumes -----------------------------------------------------------------------

    async def attach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Hot-plug a virtio-blk disk over QMP, then have the guest mount it."""
        node, device = _node_name(volume), _device_id(volume)
        await self._qmp(
            instance_id,
            "blockdev-add",
            {"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": volume.path}},
        )
        try:
            await self._qmp(
                instance_id, "device_add", {"driver": "virtio-blk-pci", "drive": node, "id": device,
                                            "serial": volume.serial},
            )  # fmt: skip
        except Exception:
            await self._qmp(instance_id, "blockdev-del", {"node-name": node})
            raise
        try:
            await self._control(instance_id, f"mount {volume.serial} {volume.mount} {_guest_fs_type(volume.fs_type)}")
        except Exception:
            await self._unplug(instance_id, volume)
            raise

    async def detach_volume(self, instance_id: str, volume: VolumeAttachment) -> None:
        """Unmount in the guest first (nothing written is lost), then unplug the disk."""
        await self._control(instance_id, f"umount {volume.mount}")
        await self._unplug(instance_id, volume)

    async def _unplug(self, instance_id: str, volume: VolumeAttachment) -> None:
        client = QMPClient(f"unik-{instance_id[:12]}")
        await asyncio.wait_for(client.connect(str(self._qmp_path(instance_id))), 5.0)
        try:
            # The guest acknowledges the ACPI eject; only then is the disk gone for the guest.
            with client.listener("DEVICE_DELETED") as listener:
                await client.execute("device_del", {"id": _device_id(volume)})
                async with asyncio.timeout(UNPLUG_TIMEOUT):
                    async for event in listener:
                        if event.get("data", {}).get("device") == _device_id(volume):
                            break
            await client.execute("blockdev-del", {"node-name": _node_name(volume)})
        except TimeoutError:
            raise UnikError(f"the guest did not release the disk of volume {volume.serial} in time") from None
        finally:
            await client.disconnect()

    async def _control(self, instance_id: str, command: str) -> None:
        """One request to the guest init over its control serial port: `TAG COMMAND` out,
        `TAG ok` or `TAG err WHY` back (lines with another tag are leftovers: skipped)."""
        if not self.alive(instance_id):
            raise Conflict("the instance is not running")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self._ctl_path(instance_id))), 5.0
            )
        except (OSError, TimeoutError) as exc:
            raise UnikError(f"cannot reach the guest's control channel: {exc}") from exc
        tag = secrets.token_hex(6)  # 12 hex digits: the guest ignores lines without such a tag
        # The leading newline ends whatever fragment an interrupted earlier request left.
        request = f"\n{tag} {command}\n".encode()
        answer, closed = "", False
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                while not answer and not closed:
                    # Repeated until answered: what reaches the guest before its port is open is
                    # lost, and the guest answers a repeated tag without running it again.
                    writer.write(request)
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CONTROL_RESEND):
                            while not answer:
                                line = await reader.readline()
                                if not line:
                                    closed = True
                                    break
                                head, _, rest = line.decode(errors="replace").strip().partition(" ")
                                # Only an answer counts: a tty echo of the request carries the tag too.
                                if head == tag and (rest == "ok" or rest.startswith("err")):
                                    answer = rest
        except TimeoutError:
            raise UnikError(f"the guest did not answer {command.split()[0]!r} in time") from None
        finally:
            writer.close()
        if answer == "ok":
            return
        why = answer.removeprefix("err ").strip() or "no answer (is the guest still booting?)"
        if why.startswith("busy"):
            raise Conflict(f"the guest cannot unmount {command.split()[-1]}: {why}")
        raise BadRequest(f"the guest refused {command.split()[0]!r}: {why}")

    async def remove(self, instance_id: str, *, keep_files: bool = False) -> None:
        await self._kill(instance_id)
        await asyncio.to_thread(self.release_network, instance_id)
        if not keep_files:
            await asyncio.to_thread(shutil.rmtree, self._dir(instance_id), True)

    # -- networking (providers/network.py does the work) ---------------------------------

    def instance_subnet(self) -> IPv4Network | None:
        return self.network.subnet()

    def publish_address(self) -> str | None:
        return self.network.publish_address()

    def check_ports_free(self, ports: list[dict[str, Any]]) -> None:
        self.network.check_ports_free(ports)

    def release_network(self, instance_id: str) -> None:
        # A VM that is still running keeps its tap (the monitor may race a restart).
        if not self.alive(instance_id):
            self.network.release(instance_id)


def boot_argv(
    config: QemuProviderConfig,
    accel: str,
    *,
    kernel: Path,
    initrd: Path,
    memory_mb: int,
    console: Path,
    kernel_version: str = "",
) -> list[str]:
    """The machine every instance boots on (the benchmark boots its floor on the same one)."""
    return [
        config.qemu_binary,
        *_machine(config, memory_mb),
        "-accel", _accel_option(config, accel, memory_mb),
        "-m", str(memory_mb),
        "-cpu", CPU_MODEL,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *(["-bios", "qboot.rom"] if _firmware(config, kernel_version) == "qboot" else []),
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", " ".join([*BOOT_ARGS, *_tcg_boot_args(accel), config.kernel_cmdline]).strip(),
        "-chardev", f"file,id=console,path={console},append=on",
        "-serial", "chardev:console",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        *(["-device", "virtio-balloon-pci,free-page-reporting=on"] if _is_micro(config, kernel_version) else []),
    ]  # fmt: skip


def _machine(config: QemuProviderConfig, memory_mb: int) -> list[str]:
    """The machine and where its RAM comes from. A memfd (shmem) rather than anonymous memory:
    qemu asks for transparent huge pages on anonymous guest RAM, and each 2 MiB the guest
    touches at all becomes resident (c-hello idle at 64 MB: 28 MiB resident, 19.6 MiB from a
    memfd, same boot). Unless the host runs KSM, which merges only anonymous memory: there,
    identical guest pages (the kernel, zeroes) are shared by all instances (2.1 MiB each)."""
    memfd = config.guest_memory == "memfd" or (config.guest_memory == "auto" and not ksm_running())
    if not memfd:
        return ["-machine", config.machine]
    return [
        "-machine", f"{config.machine},memory-backend=guest-ram",
        "-object", f"memory-backend-memfd,id=guest-ram,size={memory_mb}M",
    ]  # fmt: skip


KSM_RUN = Path("/sys/kernel/mm/ksm/run")


def ksm_running() -> bool:
    """Whether the host's ksmd merges pages now (1; 0 is stopped, 2 stopped and unmerged)."""
    try:
        return KSM_RUN.read_text().strip() == "1"
    except OSError:
        return False


def _firmware(config: QemuProviderConfig, kernel_version: str) -> str:
    """qboot reaches the micro kernel sooner but never Debian's cloud kernel: under "auto", the
    kernel decides, by its release when known (an image keeps the kernel it was built with),
    else by the config's choice."""
    if config.firmware != "auto":
        return config.firmware
    return "qboot" if _is_micro(config, kernel_version) else "seabios"


def _is_micro(config: QemuProviderConfig, kernel_version: str) -> bool:
    """Whether the instance boots a micro kernel: by its release when known (an image keeps the
    kernel it was built with), else by the config's choice."""
    return MICRO_LOCALVERSION in kernel_version if kernel_version else config.kernel == "micro"


def _accel_option(config: QemuProviderConfig, accel: str, memory_mb: int) -> str:
    if accel != "tcg":
        return accel
    cache_mb = max(16, memory_mb // 8) if config.tcg_cache_mb is None else config.tcg_cache_mb
    return f"tcg,tb-size={cache_mb}" if cache_mb else accel


@functools.cache
def _host_tsc_khz() -> int | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def _tcg_boot_args(accel: str) -> list[str]:
    """Kernel arguments for a guest under TCG, which emulates no TSC-deadline timer.

    - The guest's TSC is the host's: telling the kernel its rate skips the early calibration,
      which on a loaded host sometimes goes wrong and hangs the boot (PLATFORM.md).
    - Without a TSC-deadline timer the kernel calibrates the local APIC timer by waiting
      100 ms of wall time, a fifth of a micro-kernel boot. `noapictimer` skips it: the
      guest (one vCPU, so no broadcast is needed) ticks on the HPET instead. Under KVM the
      deadline timer makes the calibration free, and the APIC timer does not exit to qemu.
    - The ACPI PM timer is a clocksource the guest never picks over the TSC, and checking it
      busy-waits 4.5 ms (udelay 0, 100, ... 900 us). `pmtmr=0` leaves it out; the HPET
      remains for the TSC's refined calibration and the clocksource watchdog."""
    if accel != "tcg":
        return []
    khz = _host_tsc_khz()
    return [*([f"tsc_early_khz={khz}"] if khz else []), "noapictimer", "pmtmr=0"]


def _escape(value: str | Path) -> str:
    """QEMU option values double their commas."""
    return str(value).replace(",", ",,")


def _node_name(volume: VolumeAttachment) -> str:
    return f"vol-{volume.serial}"


def _device_id(volume: VolumeAttachment) -> str:
    return f"disk-{volume.serial}"


def _blockdev(volume: VolumeAttachment) -> str:
    return f"driver=raw,node-name={_node_name(volume)},file.driver=file,file.filename={_escape(volume.path)}"


def _disk_device(volume: VolumeAttachment) -> str:
    return f"virtio-blk-pci,drive={_node_name(volume)},id={_device_id(volume)},serial={volume.serial}"


def _guest_fs_type(fs_type: str) -> str:
    """The guest's name for a volume's filesystem; raw disks are probed."""
    return {"fat": "vfat", "raw": "auto"}.get(fs_type, fs_type)


def _qcode(key: str) -> dict[str, str]:
    return {"type": "qcode", "data": key}


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.rename(target)


def _write_new(target: Path, data: bytes) -> None:
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(target)


def _concat(first: Path, tail: bytes, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    # copyfile copies in the kernel (sendfile): an 88 MB Node.js initrd in ~35 ms, not ~55.
    shutil.copyfile(first, tmp)
    with open(tmp, "ab") as out:
        out.write(tail)
    tmp.rename(target)

