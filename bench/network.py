"""Network benchmark: how soon a booted instance answers HTTP, in both network modes.

Per round (interleaved, so the machine's noise hits all alike):
  user:    POST /instances/run of examples/c-http with a published port → first successful
           GET /ping_test through 127.0.0.1:HOSTPORT; in the same run, the app's first
           console line ("c-http: listening") seen through `logs?follow=true`.
  bridge:  the same with `network: bridge`, fetching through the instance's IpAddress (only
           as root with iproute2). That daemon, its bridge and its VMs live in a network
           namespace the benchmark creates and deletes; the GETs reach the guest through a
           forward made from inside it (unik.testing.NetnsForward), never from the host's own.
  modules: what the network costs the boot itself: examples/c-hello booted directly by qemu
           (no daemon) → its first line, with no kernel modules and no NIC, with virtio_net
           (+ deps) and a user-mode NIC that init configures, and with all of BASE_MODULES.

    .venv/bin/python bench/network.py [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from boot import time_to_line
from common import api, daemon, publish, tarball

from unik import guest
from unik.kernel import Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.providers.network import USER_GUEST, free_port, mac_address
from unik.providers.qemu import boot_argv, kvm_usable
from unik.providers.qemu.config import QemuProviderConfig
from unik.providers.qemu.provider import BASE_MODULES
from unik.testing import NetnsForward, NetworkNamespace

ROOT = Path(__file__).resolve().parent.parent
HTTP_APP = ROOT / "examples" / "c-http"
HELLO_APP = ROOT / "examples" / "c-hello"
HTTP_FIRST_LINE = b"c-http: listening"
HELLO_FIRST_LINE = b"hello from unik"
DEADLINE = 120.0
ATTEMPT_TIMEOUT = 0.25


def build(base: str, name: str, app: Path) -> None:
    httpx.post(
        f"{base}/images/{name}/create",
        params={"base": "linux", "lang": "c", "provider": "qemu", "force": "true"},
        files={"tarfile": ("app.tar.gz", tarball(app))},
        timeout=DEADLINE,
    ).raise_for_status()


def run_and_ping(
    base: str, name: str, ports: list[dict[str, int]] | None, netns: str | None = None
) -> tuple[float, float]:
    """(run → first console line, run → first GET /ping_test answered 200). Without `ports` the
    GETs go to the instance's IpAddress inside network namespace `netns`."""
    first_line: list[float] = []

    def follow(started: float) -> None:
        seen = b""
        with logs.stream("GET", f"/instances/{name}/logs", params={"follow": "true"}) as s:
            for chunk in s.iter_bytes():
                seen += chunk
                if HTTP_FIRST_LINE in seen:
                    first_line.append(time.perf_counter() - started)
                    return

    # Every client is made before the timer starts: making one loads the CA bundle (~30 ms).
    http = api(base)
    with contextlib.ExitStack() as stack:
        logs = stack.enter_context(httpx.Client(base_url=base, timeout=DEADLINE))
        pings = stack.enter_context(httpx.Client(timeout=ATTEMPT_TIMEOUT))
        started = time.perf_counter()
        body: dict[str, object] = {"InstanceName": name, "ImageName": "web"}
        if ports:
            body["Ports"] = ports
        response = http.post("/instances/run", json=body)
        response.raise_for_status()
        follower = threading.Thread(target=follow, args=(started,), daemon=True)
        follower.start()
        if ports:
            url = f"http://127.0.0.1:{ports[0]['HostPort']}/ping_test"
        else:
            assert netns is not None, "an instance without published ports is reached in its namespace"
            forward = stack.enter_context(NetnsForward(netns, (response.json()["IpAddress"], 8080)))
            url = f"http://127.0.0.1:{forward.port}/ping_test"
        while time.perf_counter() - started < DEADLINE:
            # Short attempts: a request sent before the guest's interface is up is never
            # answered (slirp or the host's TCP retransmits it seconds later), so it is
            # abandoned and a fresh one sent, as an impatient client would.
            try:
                if pings.get(url).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.01)
        else:
            raise RuntimeError(f"{name} never answered on {url}")
        ping = time.perf_counter() - started
        follower.join(DEADLINE)
        http.delete(f"/instances/{name}", params={"force": "true"}).raise_for_status()
    if not first_line:
        raise RuntimeError(f"{name} never printed its first line")
    return first_line[0], ping


def hello_initrd(kernel: Kernel, work: Path, modules: list[str], label: str) -> Path:
    app_root = work / "hello-root"
    if not app_root.exists():
        (app_root / "unik").mkdir(parents=True)
        subprocess.run(
            ["musl-gcc", "-static", "-O2", "-o", str(app_root / "unik" / "app"), str(HELLO_APP / "hello.c")],
            check=True,
        )
    out = work / f"hello-{label}.initrd"
    guest.assemble_initrd(
        out,
        init_binary=guest.ensure_init_binary(work / "cache"),
        app_root=app_root,
        entrypoint=["/unik/app"],
        args=[],
        env={},
        modules=kernel.module_closure(modules),
    )
    return out


def boot_direct(kernel: Kernel, initrd: Path, accel: str, work: Path, tag: str, with_nic: bool) -> float:
    """qemu started directly → the app's first line on the console."""
    boot = work / f"{tag}.initrd"
    run_config = guest.run_config_cpio(env={"TICKS": "1"}, net=dict(USER_GUEST) if with_nic else None)
    with open(initrd, "rb") as src, open(boot, "wb") as out:
        shutil.copyfileobj(src, out)
        out.write(run_config)
    console = work / f"{tag}.log"
    argv = boot_argv(
        QemuProviderConfig(), accel, kernel=kernel.vmlinux, initrd=boot, memory_mb=128, console=console,
        kernel_version=kernel.version,  # the cloud kernel's: its firmware, as for its images
    )  # fmt: skip
    if with_nic:
        argv += ["-netdev", "user,id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={mac_address(tag)}"]
    return time_to_line(argv, console, HELLO_FIRST_LINE, f"{tag}: the VM")


def median_row(label: str, values: list[float]) -> str:
    if not values:
        return f"| {label} | n/a | n/a |"
    return f"| {label} | {statistics.median(values):.3f} s | {min(values):.3f}-{max(values):.3f} s |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()

    kernel = load_kernel(default_kernel_root())
    accel = "kvm" if kvm_usable()[0] else "tcg"
    bridge_ok = os.geteuid() == 0 and shutil.which("ip") is not None
    bridge = "unikb0"  # inside the benchmark's own namespace: no clash with the host's
    results: dict[str, list[float]] = {
        key: []
        for key in ("user_line", "user_ping", "bridge_line", "bridge_ping", "no_modules", "net_modules", "base_modules")
    }
    work = Path(tempfile.mkdtemp(prefix="unik-bench-", dir="/tmp"))
    bridge_config = f"providers:\n  qemu:\n    network: bridge\n    bridge: {bridge}\n    subnet: 10.213.250.0/24\n"
    try:
        initrds = {
            "no_modules": hello_initrd(kernel, work, [], "none"),
            "net_modules": hello_initrd(kernel, work, ["virtio_pci", "virtio_net"], "net"),
            "base_modules": hello_initrd(kernel, work, list(BASE_MODULES), "base"),
        }
        with contextlib.ExitStack() as stack:
            user = stack.enter_context(daemon(work / "user"))
            build(user, "web", HTTP_APP)
            space = stack.enter_context(NetworkNamespace.create("unikb")) if bridge_ok else None
            bridged = stack.enter_context(daemon(work / "bridge", bridge_config, space.name)) if space else None
            if bridged:
                build(bridged, "web", HTTP_APP)
            for n in range(options.rounds):
                line, ping = run_and_ping(user, f"user-{n}", [{"HostPort": free_port(), "GuestPort": 8080}])
                results["user_line"].append(line)
                results["user_ping"].append(ping)
                if bridged:
                    line, ping = run_and_ping(bridged, f"bridge-{n}", None, space.name if space else None)
                    results["bridge_line"].append(line)
                    results["bridge_ping"].append(ping)
                for key, initrd in initrds.items():
                    results[key].append(boot_direct(kernel, initrd, accel, work, f"{key}-{n}", key != "no_modules"))
                print(
                    f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in results.items() if v),
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = "\n".join(
        [
            f"# unik network benchmark ({options.rounds} interleaved rounds)",
            "",
            f"Host: {platform.node()}, {platform.machine()}, accel {accel}, kernel {kernel.version}, machine pc.",
            "",
            "| measure | median | range |",
            "|---|---|---|",
            median_row("user: POST /instances/run → first console line", results["user_line"]),
            median_row("user: POST /instances/run → first GET /ping_test (published port)", results["user_ping"]),
            median_row("bridge: POST /instances/run → first console line", results["bridge_line"]),
            median_row("bridge: POST /instances/run → first GET /ping_test (IpAddress)", results["bridge_ping"]),
            median_row("direct boot → first line: no modules, no NIC", results["no_modules"]),
            median_row("direct boot → first line: virtio_net + deps, user NIC configured", results["net_modules"]),
            median_row("direct boot → first line: all BASE_MODULES, user NIC configured", results["base_modules"]),
            "",
            "The app is examples/c-http (first line: `c-http: listening`); the direct boots use",
            "examples/c-hello and qemu without the daemon, to isolate what modules and the NIC cost.",
        ]
    )
    publish(report, "network.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
