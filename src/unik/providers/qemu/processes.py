"""The instances' folders under `<data>/instances/` and their qemu processes, found without
being their parent: through each folder's pidfile and, for a folder deleted under a running
VM, through /proc (every launch passes `-pidfile <folder>/qemu.pid`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

PIDFILE = "qemu.pid"
KILL_WAIT = 5.0


class QemuInstances:
    def __init__(self, instances_dir: Path) -> None:
        self.root = instances_dir

    # -- an instance's files -------------------------------------------------------------

    def folder(self, instance_id: str) -> Path:
        return self.root / instance_id

    def console(self, instance_id: str) -> Path:
        return self.folder(instance_id) / "console.log"

    def pidfile(self, instance_id: str) -> Path:
        return self.folder(instance_id) / PIDFILE

    def qmp(self, instance_id: str) -> Path:
        return self.folder(instance_id) / "qmp.sock"

    def control(self, instance_id: str) -> Path:
        return self.folder(instance_id) / "ctl.sock"

    def ram_file(self, instance_id: str) -> Path:
        """A warm run's guest RAM, shared with qemu so that it can become a VM template."""
        return self.folder(instance_id) / "ram"

    def gdb_port(self, instance_id: str) -> Path:
        return self.folder(instance_id) / "gdb.port"

    @staticmethod
    def vm_name(instance_id: str) -> str:
        return f"unik-{instance_id[:12]}"

    # -- their processes -----------------------------------------------------------------

    def pid(self, instance_id: str) -> int | None:
        try:
            pid = int(self.pidfile(instance_id).read_text().strip())
        except (OSError, ValueError):
            return None
        # A pid reused by another program is not ours.
        return pid if self.instance_of(pid) == instance_id else None

    def instance_of(self, pid: int) -> str | None:
        """The instance whose VM process `pid` is: a live qemu started with a pidfile in one of
        these folders, else None."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            pidfile = Path(os.fsdecode(argv[argv.index(b"-pidfile") + 1]))
        except (OSError, ValueError, IndexError):
            return None
        if pidfile.name != PIDFILE or pidfile.parent.parent != self.root:
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # A zombie has exited.
        return None if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X") else pidfile.parent.name

    def running(self) -> dict[str, int]:
        """The pid of every VM of these instances, found through /proc rather than the pidfiles:
        it also finds a VM whose folder was deleted under it."""
        found: dict[str, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (instance_id := self.instance_of(int(name))):
                found[instance_id] = int(name)
        return found

    def ids(self) -> set[str]:
        folders = {entry.name for entry in self.root.iterdir() if entry.is_dir()}
        return folders | set(self.running())

    async def kill(self, instance_id: str) -> None:
        pid = self.pid(instance_id)
        if pid is None and not self.folder(instance_id).exists():
            pid = self.running().get(instance_id)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await self.wait_exit(instance_id, pid, KILL_WAIT)

    async def wait_exit(self, instance_id: str, pid: int, timeout: float) -> bool:
        """Whether the instance's VM process `pid` ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.instance_of(pid) != instance_id:
                return True
            await asyncio.sleep(0.1)
        return self.instance_of(pid) != instance_id
