"""Console logs: what an instance's guest printed so far, or a stream of it until the VM stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from unik.filewatch import FileChanges
from unik.models import InstanceState
from unik.providers.base import Provider
from unik.services.context import Context, InstanceRecord
from unik.services.instances import InstanceService

LOG_POLL_INTERVAL = 0.05
# How often a log follower with nothing new to read checks that the VM still runs.
LOG_LIVENESS_INTERVAL = 0.25


class LogService:
    def __init__(self, ctx: Context, instances: InstanceService) -> None:
        self.ctx = ctx
        self.instances = instances
        # Deletions after a stream ended, which must outlive the request that started them.
        self._background: set[asyncio.Task[None]] = set()

    def _console(self, ref: str) -> tuple[InstanceRecord, Path, Provider]:
        record = self.ctx.store.instances.find(ref)
        provider = self.ctx.provider(record.meta.provider)
        return record, provider.console_path(record.id), provider

    async def read(self, ref: str) -> str:
        record, path, provider = self._console(ref)
        await provider.refresh_console(record.id)
        return await asyncio.to_thread(_read_text, path)

    async def follow(self, ref: str, *, delete: bool = False) -> AsyncIterator[bytes]:
        """Console output so far, then new output as it appears, until the VM stops."""
        record, path, provider = self._console(ref)
        position = 0
        changes = FileChanges(path, LOG_POLL_INTERVAL)
        try:
            while True:
                chunk = await asyncio.to_thread(_read_from, path, position)
                if chunk:
                    position += len(chunk)
                    yield chunk
                    continue
                current = self.ctx.store.instances.get(record.id)
                if current is None:
                    return
                starting = current.obj.State == InstanceState.pending.value
                await provider.refresh_console(record.id)
                if not starting and not provider.alive(record.id):
                    tail = await asyncio.to_thread(_read_from, path, position)
                    if tail:
                        yield tail
                    return
                await changes.wait(LOG_LIVENESS_INTERVAL)
        finally:
            changes.close()
            if delete:
                # The client is gone (or the VM ended): the task must outlive this generator.
                task = asyncio.get_running_loop().create_task(self.instances.delete_quietly(record.id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _read_from(path: Path, position: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(position)
            return f.read(1 << 16)
    except FileNotFoundError:
        return b""
