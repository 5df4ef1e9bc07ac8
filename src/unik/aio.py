"""Set-up of the daemon's event loop."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any


class _PidfdChildWatcher(asyncio.PidfdChildWatcher):
    """Python 3.12's PidfdChildWatcher on 3.11: it serves whichever loop starts the process
    (3.11's is bound to one loop), so it can be installed once, before the loop exists."""

    def is_active(self) -> bool:
        return True

    def attach_loop(self, loop: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def add_child_handler(self, pid: int, callback: Any, *args: Any) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        loop._add_reader(pidfd, self._wait, pid, pidfd, callback, args)  # type: ignore[attr-defined]

    def remove_child_handler(self, pid: int) -> bool:
        return False  # as in 3.12: the pidfd reader stays until the process is gone

    def _wait(self, pid: int, pidfd: int, callback: Any, args: tuple[Any, ...]) -> None:
        asyncio.get_running_loop()._remove_reader(pidfd)  # type: ignore[attr-defined]
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            returncode = 255  # reaped elsewhere: its status is lost, which is no success
        else:
            returncode = os.waitstatus_to_exitcode(status)
        os.close(pidfd)
        callback(pid, returncode, *args)


def use_pidfd_child_watcher() -> None:
    """Have asyncio see child processes exit through pidfds, process-wide.

    Python 3.11's asyncio waits for every child process (each qemu, each build tool) in a thread
    of its own: 1-3 ms on a boot's or a build's critical path. Python 3.12 uses pidfds by itself
    (and deprecates the watchers).
    """
    if sys.version_info >= (3, 12):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return  # an old kernel, or a seccomp filter: the threads stay
    asyncio.set_child_watcher(_PidfdChildWatcher())
