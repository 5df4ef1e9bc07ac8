"""Concurrency against a real daemon: many builds and runs at once, and races for one name.

No record may be lost or duplicated, a contested name has exactly one winner (the others get
409), and the store and the data dir agree afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from qemu.qmp import QMPClient

from tests.conftest import EXAMPLES, Daemon, requires_vm
from tests.test_e2e import _alive, wait_for
from unik.client import UnikAPIError, UnikClient

pytestmark = [pytest.mark.vm, requires_vm]

BUILD = {"base": "linux", "lang": "c", "provider": "qemu"}
T = TypeVar("T")


def all_at_once(count: int, job: Callable[[int], T]) -> list[T | UnikAPIError]:
    """Run job(0..count-1) in threads released together; a refusal is returned, not raised."""
    barrier = threading.Barrier(count)

    def one(index: int) -> T | UnikAPIError:
        barrier.wait()
        try:
            return job(index)
        except UnikAPIError as refused:
            return refused

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def assert_store_consistent(client: UnikClient, data_dir: Path) -> None:
    images, instances, volumes = client.images.list(), client.instances.list(), client.volumes.list()
    for kind in (images, instances, volumes):
        assert len({o.Id for o in kind}) == len(kind), "duplicate ids"
        assert len({o.Name for o in kind}) == len(kind), "duplicate names"
    assert {p.name for p in (data_dir / "images").iterdir()} == {i.Id for i in images}
    assert {p.name for p in (data_dir / "volumes").iterdir()} == {v.Id for v in volumes}
    instance_dirs = {p.name for p in (data_dir / "instances").iterdir()} if (data_dir / "instances").exists() else set()
    assert instance_dirs == {i.Id for i in instances}
    assert {i.ImageId for i in instances} <= {i.Id for i in images}
    assert list((data_dir / "tmp").iterdir()) == []


def running_qemus(data_dir: Path) -> int:
    count = 0
    for pidfile in data_dir.glob("instances/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            count += _alive(int(pidfile.read_text()))
    return count


def vcpu_state(qmp_socket: Path) -> str:
    """The guest's registers and run state over QMP: a RIP below 1 MiB is the firmware, one at
    0xffffffff8... the kernel, anything else the guest's user space."""

    async def ask() -> str:
        client = QMPClient("unik-test")
        await client.connect(str(qmp_socket))
        try:
            status = await client.execute("query-status")
            registers = await client.execute("human-monitor-command", {"command-line": "info registers"})
            return f"status {status}\n{registers}"
        finally:
            await client.disconnect()

    try:
        return asyncio.run(asyncio.wait_for(ask(), 10))
    except Exception as exc:  # a diagnostic must not hide the failure it explains
        return f"(no answer over QMP: {exc!r})"


# One of the twenty guests used to stay silent in about one run in ten on this 2-core TCG host:
# a vCPU starved during the kernel's IO-APIC timer check panicked ("IO-APIC + timer doesn't
# work!", caught once) or, most likely the same check, left the earlier reports' guests halted
# in the kernel with an empty console. The kernel boots with no_timer_check since: 110 runs
# clean (65 before noapictimer, 45 with it) against 1 failure in 11 before, so the test runs
# once, and its failure message carries the silent guest's console and vCPU registers.
def test_twenty_builds_and_runs_at_once(daemon: Daemon) -> None:
    count = 20
    peak = 0
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, running_qemus(daemon.data_dir))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def build_and_run(index: int) -> tuple[str, str]:
        with UnikClient(daemon.host, timeout=600) as client:
            image = client.images.build(f"app-{index}", EXAMPLES / "c-hello", **BUILD)
            instance = client.instances.run(f"vm-{index}", image.Id, env={"GREETING": f"vm {index}"})
            return image.Id, instance.Id

    started = time.monotonic()
    results = all_at_once(count, build_and_run)
    built_and_booted = time.monotonic() - started
    refusals = [r for r in results if isinstance(r, UnikAPIError)]
    assert refusals == []
    with UnikClient(daemon.host) as client:
        # Every app really runs, and prints its own greeting.
        for index in range(count):
            greeting = f"hello from unik: vm {index}"
            try:
                wait_for(f"vm-{index}'s app", lambda i=index, g=greeting: g in client.instances.logs(f"vm-{i}"))
            except AssertionError as timeout:
                # What the guest printed is what the next person needs to see.
                silent = client.instances.get(f"vm-{index}")
                tail = client.instances.logs(f"vm-{index}")[-3000:]
                cpu = vcpu_state(daemon.data_dir / "instances" / silent.Id / "qmp.sock")
                report = f"{timeout}; state {silent.State}; console:\n{tail}\nvCPU (where it is stuck):\n{cpu}"
                raise AssertionError(report) from None
        first_output = time.monotonic() - started
        sampling = False
        sampler.join()
        images, instances = client.images.list(), client.instances.list()
        assert sorted(i.Name for i in images) == sorted(f"app-{i}" for i in range(count))
        assert sorted(i.Name for i in instances) == sorted(f"vm-{i}" for i in range(count))
        assert {i.State for i in instances} == {"running"}
        assert {(i.ImageId, i.Id) for i in instances} == set(results)  # type: ignore[arg-type]
        assert_store_consistent(client, daemon.data_dir)
        print(
            f"\n{count} concurrent builds + runs: all answered in {built_and_booted:.1f} s, every app printed "
            f"in {first_output:.1f} s; peak {peak} qemu processes"
        )
        all_at_once(count, lambda i: client.instances.delete(f"vm-{i}", force=True))
        assert client.instances.list() == []
        assert running_qemus(daemon.data_dir) == 0
        assert_store_consistent(client, daemon.data_dir)


def test_ten_builds_of_one_name_have_one_winner(client: UnikClient, daemon: Daemon) -> None:
    results = all_at_once(10, lambda _: client.images.build("same", EXAMPLES / "c-hello", **BUILD))
    statuses = Counter(r.status_code if isinstance(r, UnikAPIError) else 201 for r in results)
    assert statuses == {201: 1, 409: 9}, results
    winner = next(r for r in results if not isinstance(r, UnikAPIError))
    assert [(i.Name, i.Id) for i in client.images.list()] == [("same", winner.Id)]  # type: ignore[union-attr]
    assert all("same" in r.message for r in results if isinstance(r, UnikAPIError))
    assert_store_consistent(client, daemon.data_dir)


def test_runs_of_one_instance_name_have_one_winner(client: UnikClient, daemon: Daemon) -> None:
    client.images.build("hello", EXAMPLES / "c-hello", **BUILD)
    results = all_at_once(6, lambda _: client.instances.run("dup", "hello"))
    statuses = Counter(r.status_code if isinstance(r, UnikAPIError) else 201 for r in results)
    assert statuses == {201: 1, 409: 5}, results
    winner = next(r for r in results if not isinstance(r, UnikAPIError))
    assert [(i.Name, i.Id, i.State) for i in client.instances.list()] == [("dup", winner.Id, "running")]  # type: ignore[union-attr]
    assert running_qemus(daemon.data_dir) == 1
    assert_store_consistent(client, daemon.data_dir)
    client.instances.delete("dup", force=True)
    assert_store_consistent(client, daemon.data_dir)
