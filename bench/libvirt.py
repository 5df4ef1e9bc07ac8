"""The libvirt provider: boot through libvirt beside the qemu provider and the floor, and the API
with many libvirt instances.

One daemon has both providers: qemu, and libvirt on a private libvirtd reached over qemu+tcp
on loopback (unik.testing.LibvirtHost). examples/c-hello is built for each. Each round, in
turn: POST /instances/run → the app's first line through `logs?follow=true` on qemu and on
libvirt, and the floor (the qemu provider's machine and kernel with a trivial init, started
directly). Then N idle libvirt instances (64 MB) run together and GET /instances is timed,
beside GET /_ping (the API's floor).

    .venv/bin/python bench/libvirt.py [--rounds 5] [--instances 100]

Writes bench/results/libvirt.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from boot import FIRST_APP_LINE, boot_floor, boot_to_line, floor_initrd
from common import EXAMPLES, api, daemon, publish, tarball

from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel
from unik.providers.qemu import kvm_usable
from unik.testing import LibvirtHost

POOL_PATH = "/var/lib/libvirt/images/unik"
REQUESTS = 200


def build(base: str, provider: str) -> str:
    name = f"hello-{provider}"
    api(base).post(
        f"/images/{name}/create",
        params={"base": "linux", "lang": "c", "provider": provider},
        files={"tarfile": ("app.tar.gz", tarball(EXAMPLES / "c-hello"))},
    ).raise_for_status()
    return name


def latencies(base: str, path: str) -> list[float]:
    http = api(base)
    times = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        http.get(path).raise_for_status()
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instances", type=int, default=100)
    options = parser.parse_args()
    accel = "kvm" if kvm_usable()[0] else "tcg"
    kernel = load_kernel(default_kernel_root(), "micro")
    boots: dict[str, list[float]] = {"qemu": [], "libvirt": [], "floor": []}
    with tempfile.TemporaryDirectory(prefix="unik-bench-", dir="/tmp") as work_dir:
        work = Path(work_dir)
        host = LibvirtHost.start(work / "host")
        try:
            config = (f"max_running_instances: {options.instances + 10}\n"
                      f"providers:\n  qemu: [{{}}]\n  libvirt:\n    - {{hosts: ['{host.uri}'], "
                      f"pool_path: {POOL_PATH}, poll_interval: 1.0}}\n")  # fmt: skip
            with daemon(work / "data", config) as base:
                images = {provider: build(base, provider) for provider in ("qemu", "libvirt")}
                floor = floor_initrd(work)
                boot_to_line(base, images["libvirt"], "warm-up", FIRST_APP_LINE)  # the image goes to the host once
                for n in range(options.rounds):
                    order = ("qemu", "libvirt", "floor") if n % 2 == 0 else ("floor", "libvirt", "qemu")
                    for way in order:
                        if way == "floor":
                            elapsed = boot_floor(kernel.vmlinux, floor, accel, work, n, kernel.version)
                        else:
                            elapsed = boot_to_line(base, images[way], f"{way}-{n}", FIRST_APP_LINE)
                        boots[way].append(elapsed)
                        print(f"round {n + 1}: {way} {elapsed:.3f} s", file=sys.stderr)
                started = time.perf_counter()
                body = {"ImageName": images["libvirt"], "MemoryMb": 64}
                for i in range(options.instances):
                    api(base).post("/instances/run", json={"InstanceName": f"idle-{i:03d}", **body}).raise_for_status()
                    if (i + 1) % 10 == 0:
                        print(f"{i + 1} started after {time.perf_counter() - started:.0f} s", file=sys.stderr)
                spent = time.perf_counter() - started
                print(f"{options.instances} libvirt instances started in {spent:.0f} s", file=sys.stderr)
                listing = latencies(base, "/instances")
                ping = latencies(base, "/_ping")
                running = sum(1 for i in api(base).get("/instances").json() if i["State"] == "running")
                for i in range(options.instances):
                    api(base).delete(f"/instances/idle-{i:03d}", params={"force": "true"})
        finally:
            host.stop()

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"

    def p99(values: list[float]) -> float:
        return sorted(values)[int(len(values) * 0.99) - 1] * 1000

    lines = [
        "# The libvirt provider",
        "",
        f"Host {platform.node()}, accel {accel}, a private libvirtd over qemu+tcp on loopback. "
        f"{options.rounds} interleaved rounds, median (min-max).",
        "",
        "| POST /instances/run → c-hello's first line | time | / floor |",
        "|---|---|---|",
    ]
    floor_median = statistics.median(boots["floor"])
    labels = {"qemu": "qemu provider", "libvirt": "libvirt provider", "floor": "floor (qemu, trivial init)"}
    for way, label in labels.items():
        lines.append(f"| {label} | {cell(boots[way])} | {statistics.median(boots[way]) / floor_median:.2f}x |")
    lines += [
        "",
        f"{options.instances} idle 64 MB libvirt instances ({running} running), started one after the other in "
        f"{spent:.0f} s. {REQUESTS} sequential requests each:",
        "",
        "| request | median | p99 |",
        "|---|---|---|",
        f"| GET /instances | {statistics.median(listing) * 1000:.1f} ms | {p99(listing):.1f} ms |",
        f"| GET /_ping (floor) | {statistics.median(ping) * 1000:.1f} ms | {p99(ping):.1f} ms |",
    ]
    publish("\n".join(lines), "libvirt.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
