"""Warm starts on qemu: a ready instance captured as a VM template, and a clone restored from one.

The template store (templates.py) holds the files; this is the choreography with qemu (QMP
migration with `x-ignore-shared`) and with the guest init (its control channel): when a warm
run's app is ready, how its state is taken without losing its RAM, and what a clone is told
once restored so that it is a machine of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient
from unik.errors import UnikError
from unik.models import LaunchSpec
from unik.providers.network import HostNetwork, mac_address
from unik.providers.qemu import control
from unik.providers.qemu.boot import GUEST_RAM_ID
from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.options import MemoryBackend
from unik.providers.qemu.processes import QemuInstances
from unik.providers.qemu.templates import Template, TemplateStore, copy_sparse, qemu_fingerprint, template_key

log = logging.getLogger(__name__)

# A warm run's app is ready for its template when it listens on a TCP port; an app that never
# listens is ready this long after its first console line. Past READY_TIMEOUT no template is made.
READY_SETTLE = 3.0
READY_TIMEOUT = 120.0
READY_POLL = 0.1
# Then the guest must be quiet: qemu below QUIET_CPU of a core over a QUIET_WINDOW (a runtime's
# JIT compiler still working when the snapshot is taken makes every clone finish that work,
# translating its code afresh under TCG), waiting at most QUIET_TIMEOUT.
QUIET_CPU = 0.1
QUIET_WINDOW = 0.3
QUIET_TIMEOUT = 15.0
MIGRATION_TIMEOUT = 60.0
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


class WarmStarts:
    def __init__(self, config: QemuProviderConfig, root: Path, vms: QemuInstances, network: HostNetwork) -> None:
        self.config = config
        self.vms = vms
        self.network = network
        self.templates = TemplateStore(root, max_count=config.warm_templates, max_mb=config.warm_templates_mb)
        self.fingerprint = qemu_fingerprint(config.qemu_binary, config.model_dump_json())
        self.templates.clean(self.fingerprint)
        # Captures running now, by template key: one per key at a time.
        self._captures: dict[str, asyncio.Task[None]] = {}

    def key(self, instance_id: str, spec: LaunchSpec) -> str | None:
        """The template key of a warm run, or None when it boots cold and makes no template."""
        if not spec.warm_start or self.config.warm_templates == 0:
            return None
        if spec.volumes or spec.debug_mode:
            # A template's guest has no disks and runs: volumes at boot and a halted debug
            # start cannot come from one (attaching volumes after the start can).
            why = "volumes at boot" if spec.volumes else "DebugMode"
            log.info("warm run of instance %s boots cold: it has %s", instance_id, why)
            return None
        return template_key(spec, self.fingerprint)

    def memory(
        self, instance_id: str, memory_mb: int, key: str | None, template: Template | None
    ) -> MemoryBackend | None:
        """Guest RAM of a warm run: the template's, mapped privately (shared until written), or
        a file of its own that can become the template; None for a cold run (the usual RAM)."""
        if template is not None:
            return MemoryBackend(GUEST_RAM_ID, memory_mb, "file", {"mem-path": template.ram, "share": False})
        if key is not None:
            own = self.vms.ram_file(instance_id)
            return MemoryBackend(GUEST_RAM_ID, memory_mb, "file", {"mem-path": own, "share": True})
        return None

    async def restore(self, instance_id: str, spec: LaunchSpec, template: Template) -> None:
        """The clone's qemu waits with -incoming: give it the template's state, then tell the
        guest who it is now (hostname, random seed, clock, MAC and address)."""
        async with self._qmp(instance_id) as qmp:
            await qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
            await qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(template.state))}"})
            async with asyncio.timeout(MIGRATION_TIMEOUT):
                while not (await qmp.execute("query-status")).get("running"):
                    await asyncio.sleep(0.01)
        ctl = self.vms.control(instance_id)
        hostname = spec.hostname or "unik"
        await control.guest_control(ctl, f"clone {hostname} {secrets.token_hex(32)} {time.time_ns()}")
        # Only a clone with an address of its own meets others on a link: behind user-mode
        # networking each VM has a private slirp, and the template's MAC and address do.
        net = self.network.guest_config(spec.address) if spec.address else None
        if net is not None:
            address = f"{net['address']} {net.get('gateway', '-')} {mac_address(instance_id)}"
            await control.guest_control(ctl, f"netaddr {address}")

    def capture_when_ready(self, instance_id: str, spec: LaunchSpec, key: str, console_from: int) -> None:
        """In the background: once the warm run's app is ready, it becomes the template of `key`."""
        if key in self._captures:
            return
        task = asyncio.create_task(self._capture(instance_id, spec, key, console_from))
        self._captures[key] = task
        task.add_done_callback(lambda _: self._captures.pop(key, None))

    async def _capture(self, instance_id: str, spec: LaunchSpec, key: str, console_from: int) -> None:
        try:
            if not await self._wait_ready(instance_id, console_from):
                log.info("no VM template of instance %s: its app was not ready in %.0f s", instance_id, READY_TIMEOUT)
                return
            await self._wait_quiet(instance_id)
            work = self.templates.work_dir(key)
            try:
                started = time.perf_counter()
                async with self._qmp(instance_id) as qmp:
                    await qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
                    await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(work / 'state'))}"})
                    try:
                        await _migration_done(qmp)
                        # The guest is paused from here until `cont`: its RAM file holds still.
                        await asyncio.to_thread(copy_sparse, self.vms.ram_file(instance_id), work / "ram")
                    finally:
                        with contextlib.suppress(Exception):
                            await qmp.execute("cont")
                paused = time.perf_counter() - started
                template = await asyncio.to_thread(
                    self.templates.publish, work, key, image_id=spec.image_id, fingerprint=self.fingerprint
                )
                log.info("VM template %s made of instance %s (it paused %.2f s)", template.key, instance_id, paused)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("no VM template of instance %s: %s", instance_id, exc)

    async def _wait_ready(self, instance_id: str, console_from: int) -> bool:
        """The app listens on a TCP port (the guest init reads /proc/net/tcp), or it printed a
        line READY_SETTLE s ago and still does not listen. False when the VM ended or timed out."""
        ctl, console = self.vms.control(instance_id), self.vms.console(instance_id)
        deadline = time.monotonic() + READY_TIMEOUT
        first_line_at: float | None = None
        while time.monotonic() < deadline and self.vms.pid(instance_id) is not None:
            with contextlib.suppress(UnikError):
                if await control.guest_ask(ctl, "listening"):
                    return True
            if first_line_at is None:
                with contextlib.suppress(OSError), open(console, "rb") as f:
                    f.seek(console_from)
                    if b"\n" in f.read(1 << 16):
                        first_line_at = time.monotonic()
            elif time.monotonic() - first_line_at >= READY_SETTLE:
                return True
            await asyncio.sleep(READY_POLL)
        return False

    async def _wait_quiet(self, instance_id: str) -> None:
        deadline = time.monotonic() + QUIET_TIMEOUT
        used = _cpu_seconds(self.vms.pid(instance_id))
        while time.monotonic() < deadline:
            await asyncio.sleep(QUIET_WINDOW)
            now = _cpu_seconds(self.vms.pid(instance_id))
            if now is None or used is None or now - used < QUIET_CPU * QUIET_WINDOW:
                return
            used = now
        log.info("instance %s is still busy after %.0f s: its template is taken anyway", instance_id, QUIET_TIMEOUT)

    @contextlib.asynccontextmanager
    async def _qmp(self, instance_id: str) -> AsyncIterator[QMPClient]:
        """One QMP connection for a sequence of commands (control.qmp opens one per command)."""
        client = QMPClient(self.vms.vm_name(instance_id))
        await asyncio.wait_for(client.connect(str(self.vms.qmp(instance_id))), control.QMP_CONNECT_TIMEOUT)
        try:
            yield client
        finally:
            await client.disconnect()


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time the process has used (all its threads: under TCG, the vCPU's is the guest's)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def _migration_done(qmp: QMPClient) -> None:
    """Wait for an outgoing migration to complete (raising if it failed)."""
    async with asyncio.timeout(MIGRATION_TIMEOUT):
        while True:
            info = await qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise UnikError(f"qemu's migration {status}: {info.get('error-desc', 'no reason given')}")
            await asyncio.sleep(0.01)
