"""Wake a log follower the moment a console file is written to, instead of polling it.

A polling follower sees a line up to one interval late (50 ms was half of a micro-VM's whole
boot-to-first-line overhead); inotify wakes it at once and costs nothing while the VM is quiet.
Where inotify is not available (no file yet, the per-user instance limit), it falls back to polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from asyncinotify import Inotify, Mask

# Written to, closed by qemu at exit, or gone with its instance folder: worth a look.
_WAKE_ON = Mask.MODIFY | Mask.CLOSE_WRITE | Mask.DELETE_SELF | Mask.MOVE_SELF


class FileChanges:
    """`await changes.wait(timeout)` returns when the file may have new bytes, or after `timeout`.

    Create it before the first read of the file: a write between that read and `wait` is then
    still seen.
    """

    def __init__(self, path: Path, poll_interval: float) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self._inotify: Inotify | None = None
        self._watch()

    def _watch(self) -> None:
        inotify = None
        try:
            inotify = Inotify()
            inotify.add_watch(self.path, _WAKE_ON)
        except OSError:
            if inotify is not None:
                inotify.close()
            return
        self._inotify = inotify

    async def wait(self, timeout: float) -> None:
        if self._inotify is None:
            self._watch()  # the file may exist by now (qemu creates it when it starts)
            if self._inotify is None:
                await asyncio.sleep(min(self.poll_interval, timeout))
                return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._inotify.get()

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
