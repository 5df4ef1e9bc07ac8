"""Keeps the records and the host in step: recovery at start-up and the monitor of running VMs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from unik.errors import NotFound
from unik.models import InstanceState
from unik.providers.base import Provider
from unik.services.context import Context, InstanceRecord

log = logging.getLogger(__name__)

MONITOR_INTERVAL = 0.5


LIVE_OR_UNKNOWN = {InstanceState.running.value, InstanceState.pending.value, InstanceState.unknown.value}


class Reconciler:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # (provider, instance id) of runs cut short by a crash and of instances no record names:
        # recover() finds them, monitor() removes their VMs and files once the loop runs.
        self._half_made: list[tuple[Provider, str]] = []

    def recover(self) -> None:
        """After a (possibly unclean) restart: drop leftovers, re-adopt VMs that still run."""
        ctx = self.ctx
        for leftover in ctx.tmp_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        known = {r.id for r in ctx.store.images.all()}
        for image_id in ctx.artifacts.image_ids() - known:
            ctx.artifacts.remove(image_id)
        # A crash between building a volume's disk and recording it leaves an orphan folder.
        known_volumes = {r.id for r in ctx.store.volumes.all()}
        for folder in ctx.volumes_dir.iterdir():
            if folder.name not in known_volumes:
                shutil.rmtree(folder, ignore_errors=True)
        instances = ctx.store.instances.all()
        # VMs outlive the daemon by design, so one whose record is lost (a store restored from
        # a backup, a record deleted by hand) would run unseen and unreachable for good.
        known_instances = {r.id for r in instances}
        for provider in ctx.providers.values():
            for stray in sorted(provider.instance_ids() - known_instances):
                log.warning("removing instance %s: its VM or files are on this host, but no record names it", stray)
                self._half_made.append((provider, stray))
        ctx.store.release_unheld_addresses()
        for record in instances:
            if record.obj.State == InstanceState.pending.value and not self._recover_boot(record):
                continue
            self.refresh(record)

    def _recover_boot(self, record: InstanceRecord) -> bool:
        """The daemon died while booting this instance; False if the instance is gone for good."""
        provider = self.ctx.provider_of(record)
        if provider is not None and provider.alive(record.id):
            # qemu -daemonize returns only once the VM runs: the boot had in fact succeeded.
            self.ctx.set_state(record, InstanceState.running)
            return True
        if record.meta.booted:
            return True  # a start of an existing instance that did not come up: it reads stopped
        # A run that never answered: the client never got this instance, so it goes entirely
        # rather than be listed half-made. Its files go once the event loop runs (monitor).
        self.ctx.release_volumes(record.id)
        self.ctx.store.instances.delete(record.id)
        self.ctx.store.release_address(record.id)
        if provider is not None:
            self._half_made.append((provider, record.id))
        log.warning("removed instance %s: the daemon stopped while it was being created", record.name)
        return False

    def refresh(self, record: InstanceRecord) -> InstanceRecord:
        """A live record whose VM has ended reads stopped (and its host network is freed); one
        whose host does not answer reads unknown until it does."""
        if record.obj.State not in LIVE_OR_UNKNOWN:
            return record
        provider = self.ctx.provider_of(record)
        alive = provider is not None and provider.alive(record.id)
        if alive and record.obj.State == InstanceState.running.value:
            return record
        if alive and record.obj.State == InstanceState.unknown.value:
            log.info("instance %s answers again: running", record.name)
            with contextlib.suppress(NotFound):
                self.ctx.set_state(record, InstanceState.running)
            return record
        why = provider.unreachable(record.id) if provider is not None and not alive else None
        if why is not None:
            if record.obj.State != InstanceState.unknown.value:
                log.warning("instance %s reads unknown: %s", record.name, why)
                with contextlib.suppress(NotFound):
                    self.ctx.set_state(record, InstanceState.unknown)
            return record
        if not alive:
            if provider is not None:
                # The VM ended on its own: what it held on the host (its tap) goes now.
                provider.release_network(record.id)
            with contextlib.suppress(NotFound):
                self.ctx.set_state(record, InstanceState.stopped)
        return record

    async def monitor(self) -> None:
        """Notice VMs that ended on their own (app exit, crash, kill) within a second."""
        while self._half_made:
            provider, instance_id = self._half_made.pop()
            try:
                await provider.remove(instance_id)
            except Exception:
                log.exception("removing half-made instance %s failed", instance_id)
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                # Only running ones are parsed: with many stopped instances a full scan twice a
                # second held the event loop (and every request waiting on it) for milliseconds.
                for state in (InstanceState.running, InstanceState.unknown):
                    for record in self.ctx.store.instances.in_state(state.value):
                        if not self.ctx.lock(record.id).locked():
                            self.refresh(record)
            except Exception:
                log.exception("instance monitor failed")
