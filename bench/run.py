"""The benchmark suite (`make bench`): P1-P5, each beside its floor or target, as one report.

P1 boot     POST /instances/run → the app's first console line, per language (examples/<lang>-http),
            beside the floor: the same qemu, kernel and machine booting a trivial static init,
            started directly (bench/boot.py's floor), and beside the language's hello world run
            through unik (its runtime's own start). Interleaved round by round.
P2 build    tar.gz → image: cold (a new archive each round, so no cache can answer) and
            unchanged (the same archive again, force=true), beside the compiler alone on the
            same sources with the same flags (c, cpp). Interleaved round by round.
P3 size     each language's image: kernel and initrd.
P4 API      requests/s, p50 and p99 of GET /instances and GET /images/{name} with 100 instance
            records in the store, loaded by wrk against the real daemon process.
P5 density  idle c-hello instances of 64 MB started one by one until the host's available
            memory is down to a quarter of its RAM (or --density-cap): host memory of each qemu
            beyond its guest RAM (PSS and RSS), how many stay running, their idle CPU.

Writes bench/results/report.md and PNG plots beside it.

    .venv/bin/python bench/run.py [--rounds 4] [--quick] [--only p1,p4] [--density-cap 0]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from boot import (
    FLOOR_LINE,
    boot_direct,
    boot_floor,
    boot_to_line,
    capture_vm,
    floor_initrd,
    instance_console,
    wait_for_console,
    with_console,
    with_initrd,
)
from common import EXAMPLES, RESULTS, api, tarball

from unik.models import Image, ImageMeta, ImageRunSpec, Instance, InstanceMeta, InstanceState, LaunchSpec, now_rfc3339
from unik.providers.qemu import kvm_usable
from unik.store import Record, Store
from unik.testing import DaemonProcess, qemu_memory, start_daemon

LANGS = ["c", "go", "cpp", "rust", "python", "nodejs", "java"]
FIRST_LINE = b"listening on"
HELLO_LINE = b"hello from unik"
DEADLINE = 300.0
MIB = 1 << 20
# Each language's smallest program printing HELLO_LINE (c's is examples/c-hello): its boot is
# the runtime's own start on that VM, which no image can go below.
HELLO_APPS: dict[str, dict[str, bytes]] = {
    "go": {
        "go.mod": b"module example.com/hello\n\ngo 1.19\n",
        "main.go": b'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hello from unik") }\n',
    },
    "cpp": {"main.cpp": b'#include <iostream>\nint main() { std::cout << "hello from unik" << std::endl; }\n'},
    "rust": {
        "Cargo.toml": b'[package]\nname = "hello"\nversion = "0.1.0"\nedition = "2021"\n',
        "src/main.rs": b'fn main() { println!("hello from unik"); }\n',
    },
    "python": {"main.py": b'print("hello from unik")\n'},
    "nodejs": {"index.js": b'console.log("hello from unik");\n'},
    "java": {
        "Main.java": b"public class Main {\n    public static void main(String[] args) {\n"
        b'        System.out.println("hello from unik");\n    }\n}\n'
    },
}
# P5 starts instances until the host's available memory is down to this share of its RAM.
DENSITY_RESERVE = 0.25
IDLE_CPU_WINDOW = 5.0  # seconds over which the idle instances' CPU use is read

TARGETS = {
    "p1_ratio": 1.10,
    "p2_unchanged_s": 0.100,
    "p2_cold_ratio": 1.3,
    "p4_rps": 1000.0,
    "p4_p99_ms": 20.0,
    "p5_overhead_mib": 30.0,
}


@dataclass
class Results:
    host: str = ""
    rounds: int = 0
    boot: dict[str, list[float]] = field(default_factory=dict)  # lang → seconds; "floor" too
    boot_direct: dict[str, list[float]] = field(default_factory=dict)  # lang → the same VM, started directly
    boot_vm_floor: dict[str, list[float]] = field(default_factory=dict)  # lang → that VM booting the floor's init
    boot_hello: dict[str, list[float]] = field(default_factory=dict)  # lang → its hello world, through unik
    build_cold: dict[str, list[float]] = field(default_factory=dict)
    build_unchanged: dict[str, list[float]] = field(default_factory=dict)
    build_floor: dict[str, list[float]] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # lang → kernel, initrd, memory MB
    api: dict[str, dict[str, float]] = field(default_factory=dict)  # route → rps, p50_ms, p99_ms
    density: list[dict[str, float]] = field(default_factory=list)  # per instance: pss, rss, guest MiB
    density_running: int = 0
    density_stop_reason: str = ""
    density_floor: dict[str, float] = field(default_factory=dict)  # an instance's VM idling on a trivial init
    density_started: int = 0
    density_boot_s: list[float] = field(default_factory=list)  # each instance's run → first line, in order
    density_reserve_mib: float = 0.0
    density_host_mib: float = 0.0  # the host's available memory lost per instance
    density_idle_cpu: float = 0.0  # % of one core per idle instance
    connections: int = 0
    load_seconds: int = 0
    notes: list[str] = field(default_factory=list)


# -- P1/P2/P3: builds and boots through one daemon ------------------------------------------


def build(base: str, lang: str, name: str, archive: bytes) -> tuple[float, dict[str, Any]]:
    http = api(base)
    started = time.perf_counter()
    response = http.post(
        f"/images/{name}/create",
        params={"base": "linux", "lang": lang, "provider": "qemu", "force": "true"},
        files={"tarfile": ("app.tar.gz", archive)},
    )
    elapsed = time.perf_counter() - started
    if response.status_code != 201:
        raise RuntimeError(f"building {lang} failed ({response.status_code}): {response.text[-2000:]}")
    return elapsed, response.json()


def hello_tarball(lang: str, work: Path) -> bytes:
    """The language's hello world (HELLO_APPS) as an upload."""
    if lang == "c":
        return tarball(EXAMPLES / "c-hello")
    folder = work / f"hello-{lang}"
    for name, content in HELLO_APPS[lang].items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return tarball(folder)


def compiler_alone(lang: str, app: Path, out: Path) -> Callable[[], float] | None:
    """The compiler on the same sources with the flags unik's compiler uses, timed; None if no floor."""
    if lang == "c":
        argv = ["musl-gcc", "-static", "-O2", "-I.", "-o", str(out), *sorted(p.name for p in app.glob("*.c")), "-lm"]
    elif lang == "cpp":
        sources = sorted(p.name for p in app.glob("*.cpp"))
        argv = ["g++", "-static", "-O2", "-std=gnu++17", "-pthread", "-I.", "-o", str(out), *sources]
    else:
        return None

    def run() -> float:
        started = time.perf_counter()
        subprocess.run(argv, cwd=app, check=True)
        return time.perf_counter() - started

    return run


def boots_and_builds(base: str, data_dir: Path, langs: list[str], rounds: int, work: Path, out: Results) -> None:
    accel = "kvm" if kvm_usable()[0] else "tcg"
    available = set(httpx.get(f"{base}/available_compilers", timeout=30).json())
    langs = [lang for lang in langs if f"linux-{lang}-qemu" in available]
    archives = {lang: tarball(EXAMPLES / f"{lang}-http") for lang in langs}
    floors = {lang: compiler_alone(lang, EXAMPLES / f"{lang}-http", work / f"floor-{lang}") for lang in langs}
    # First builds: cold for every language (empty toolchain caches, empty build cache).
    for lang in langs:
        seconds, image = build(base, lang, f"{lang}-http", archives[lang])
        out.build_cold[lang] = [seconds]
        folder = data_dir / "images" / image["Id"]
        out.sizes[lang] = (
            (folder / "kernel").stat().st_size,
            (folder / "initrd").stat().st_size,
            int(image["RunSpec"]["DefaultInstanceMemory"]),
        )
        print(f"P2 {lang}: first build {seconds:.2f} s", file=sys.stderr)
        build(base, lang, f"{lang}-hello", hello_tarball(lang, work))
    initrd = floor_initrd(work)
    # The floor boots the very kernel file the images got (the daemon chooses the flavour); a
    # link of its own, since every rebuild below replaces the image folder it came from.
    image_id = httpx.get(f"{base}/images/{langs[0]}-http", timeout=30).json()["Id"]
    kernel = work / "floor-kernel"
    os.link(data_dir / "images" / image_id / "kernel", kernel)
    out.boot = {"floor": [], **{lang: [] for lang in langs}}
    direct = {lang: capture_vm(base, data_dir, f"{lang}-http", FIRST_LINE, work) for lang in langs}
    vm_floor = {lang: with_initrd(argv, initrd) for lang, argv in direct.items()}
    out.boot_direct = {lang: [] for lang in langs}
    out.boot_vm_floor = {lang: [] for lang in langs}
    out.boot_hello = {lang: [] for lang in langs}
    for lang in langs:
        out.build_unchanged[lang] = []
    for n in range(rounds):
        out.boot["floor"].append(boot_floor(kernel, initrd, accel, work, n))
        for lang in langs:
            tag = f"{lang}-{n}"
            unik = (out.boot[lang], partial(boot_to_line, base, f"{lang}-http", tag, FIRST_LINE))
            same_vm = (out.boot_direct[lang], partial(boot_direct, direct[lang], FIRST_LINE, f"direct-{tag}", work))
            floor_vm = (out.boot_vm_floor[lang], partial(boot_direct, vm_floor[lang], FLOOR_LINE, f"floor-{tag}", work))
            # The floor first, then unik and the same VM in turn: the first big-runtime boot after
            # other work is the slow one (nodejs: 2.8 s against 2.4 s, host memory), so each side
            # gets it in every other round. Hence an even number of rounds.
            pair = (unik, same_vm) if n % 2 == 0 else (same_vm, unik)
            hello = (out.boot_hello[lang], partial(boot_to_line, base, f"{lang}-hello", f"hello-{tag}", HELLO_LINE))
            for values, boot in (floor_vm, *pair, hello):
                values.append(boot())
        # The builds after all the boots: a boot never follows a build.
        for lang in langs:
            out.build_unchanged[lang].append(build(base, lang, f"{lang}-http", archives[lang])[0])
            floor = floors[lang]
            if floor is not None:
                # A file the compiler ignores makes a new archive: a cold build, nothing cached.
                fresh = tarball(EXAMPLES / f"{lang}-http", {f"round-{n}-{uuid.uuid4().hex}.txt": b"cold\n"})
                # In turn, as the boots are: the first compile after the boots pays for them
                # (the VMs' teardown, a colder page cache): 3-6 ms here, for either side.
                for who in ("unik", "compiler") if n % 2 == 0 else ("compiler", "unik"):
                    if who == "unik":
                        out.build_cold[lang].append(build(base, lang, f"{lang}-cold", fresh)[0])
                    else:
                        out.build_floor.setdefault(lang, []).append(floor())
        print(
            f"round {n + 1}: floor {out.boot['floor'][-1]:.2f} s, "
            + ", ".join(f"{lang} {out.boot[lang][-1]:.2f} s" for lang in langs),
            file=sys.stderr,
        )
    for lang in langs:
        if lang in out.build_floor:
            # The first build was also cold, but not interleaved with a floor run: rounds only.
            out.build_cold[lang] = out.build_cold[lang][1:]


# -- P4: the API under load ------------------------------------------------------------------


def seed_records(data_dir: Path, instances: int) -> str:
    """One image and `instances` stopped instances, written straight into the store."""
    store = Store(data_dir / "unik.db")
    image = Image(
        Id=uuid.uuid4().hex,
        Name="bench-image",
        SizeMb=52,
        Infrastructure="QEMU",
        Created=now_rfc3339(),
        RunSpec=ImageRunSpec(DefaultInstanceMemory=128, Compiler="linux-c-qemu"),
    )
    meta = ImageMeta(provider="qemu", compiler="linux-c-qemu", digest="sha256:" + "0" * 64)
    store.images.insert(Record(image, meta))
    for n in range(instances):
        instance = Instance(
            Id=uuid.uuid4().hex,
            Name=f"bench-{n:03d}",
            State=InstanceState.stopped.value,
            IpAddress="127.0.0.1",
            ImageId=image.Id,
            Infrastructure="QEMU",
            Created=now_rfc3339(),
        )
        spec = LaunchSpec(image_id=image.Id, memory_mb=128, env={"KEY": "value"}, args=[])
        store.instances.insert(Record(instance, InstanceMeta(provider="qemu", spec=spec)))
    store.close()
    return image.Name


_WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    proc = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    text = proc.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    latency = {p: float(v) * _UNIT[u] for p, v, u in _WRK_LATENCY.findall(text)}
    if rps is None or "50" not in latency or "99" not in latency:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses under load")
    return {"rps": float(rps.group(1)), "p50_ms": latency["50"], "p99_ms": latency["99"]}


def api_load(work: Path, seconds: int, connections: int, out: Results) -> None:
    if shutil.which("wrk") is None:
        out.notes.append("P4 skipped: wrk is not installed (`apt-get install wrk`; `make bench` does it).")
        return
    data_dir = work / "api"
    data_dir.mkdir()
    image = seed_records(data_dir, 100)
    running: DaemonProcess = start_daemon(data_dir)
    try:
        count = len(httpx.get(f"{running.url}/instances", timeout=10).json())
        if count != 100:
            raise RuntimeError(f"expected 100 instances, the daemon lists {count}")
        for route in ("/instances", f"/images/{image}"):
            wrk(running.url + route, 2, connections)  # warm-up: imports, caches, first connections
            out.api[route] = wrk(running.url + route, seconds, connections)
            print(f"P4 GET {route}: {out.api[route]}", file=sys.stderr)
    finally:
        running.stop()


# -- P5: density -------------------------------------------------------------------------------


def meminfo_mib(key: str) -> float:
    """A /proc/meminfo figure of the host (MiB)."""
    found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(found.group(1)) / 1024 if found else float("nan")  # type: ignore[union-attr]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far (the ones that still exist)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def density(base: str, data_dir: Path, cap: int, settle: float, out: Results) -> None:
    memory = 64
    archive = tarball(EXAMPLES / "c-hello")
    build(base, "c", "hello", archive)
    started: list[str] = []
    # Instances are started until the host's available memory falls to the reserve: the count
    # is then what this machine holds with room to spare, and the run never wakes the OOM killer.
    out.density_reserve_mib = meminfo_mib("MemTotal") * DENSITY_RESERVE
    # Started first, so it has idled at least as long as any instance when all are measured
    # (qemu's memory still shrinks for a while after boot), and measured with them, so the
    # shared pages (qemu's binary and libraries, the kernel file) are split the same way.
    work = data_dir.parent
    vm = capture_vm(base, data_dir, "hello", HELLO_LINE, work, memory_mb=memory)
    with idle_floor(work, with_initrd(vm, floor_initrd(work, stay_up=True))) as floor_pid:
        try:
            available_before = meminfo_mib("MemAvailable")
            for n in itertools.count() if cap == 0 else range(cap):
                if meminfo_mib("MemAvailable") < out.density_reserve_mib:
                    out.density_stop_reason = (
                        f"the host's available memory reached the reserve, {out.density_reserve_mib / 1024:.1f} GiB "
                        f"({DENSITY_RESERVE:.0%} of its RAM)"
                    )
                    break
                name = f"dense-{n:03d}"
                try:
                    boot_started = time.perf_counter()
                    with httpx.Client(base_url=base, timeout=DEADLINE) as http:
                        response = http.post(
                            "/instances/run", json={"InstanceName": name, "ImageName": "hello", "MemoryMb": memory}
                        )
                        if response.status_code != 201:
                            out.density_stop_reason = f"instance {n + 1}: {response.status_code} {response.text[:200]}"
                            break
                        started.append(response.json()["Id"])
                        wait_for_console(instance_console(data_dir, started[-1]), HELLO_LINE, DEADLINE)
                    boot_s = time.perf_counter() - boot_started
                except RuntimeError as exc:
                    out.density_stop_reason = f"instance {n + 1}: {exc}"
                    break
                out.density_boot_s.append(boot_s)
                print(f"P5 instance {n + 1} up in {boot_s:.1f} s", file=sys.stderr)
            else:
                out.density_stop_reason = f"the cap ({cap}) was reached"
            time.sleep(settle)  # idle: the guests have booted and only tick once a second now
            out.density_floor = qemu_memory(floor_pid, memory)
            listing = {i["Id"]: i["State"] for i in httpx.get(f"{base}/instances", timeout=30).json()}
            out.density_running = sum(1 for i in started if listing.get(i) == InstanceState.running.value)
            pids = []
            for instance_id in started:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    pids.append(int((data_dir / "instances" / instance_id / "qemu.pid").read_text()))
                    out.density.append(qemu_memory(pids[-1], memory))
            out.density_started = len(started)
            if pids:
                # The host's own view, which PSS misses: page tables, slirp's sockets, the kernel's slabs.
                out.density_host_mib = (available_before - meminfo_mib("MemAvailable")) / len(started)
                used_before = cpu_seconds(pids)
                time.sleep(IDLE_CPU_WINDOW)
                out.density_idle_cpu = (cpu_seconds(pids) - used_before) / IDLE_CPU_WINDOW / len(pids) * 100
        finally:
            for instance_id in started:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.delete(f"{base}/instances/{instance_id}", params={"force": "true"}, timeout=60)


@contextlib.contextmanager
def idle_floor(work: Path, argv: list[str]) -> Iterator[int]:
    """P5's floor, running for the duration of the block (yields its pid): an instance's own VM
    (captured by `capture_vm`, its initrd replaced by the floor's) idling on a trivial init. Its
    kernel is a link to the image's own file, so its pages are shared as the instances' are, and
    it daemonizes as they do (a daemonized qemu keeps ~10 MiB less resident than one started in
    the foreground)."""
    console, pidfile = work / "floor-idle.log", work / "floor-idle.pid"
    daemonized = [*with_console(argv, console), "-daemonize", "-pidfile", str(pidfile)]
    subprocess.run(daemonized, stdin=subprocess.DEVNULL, check=True)
    pid = int(pidfile.read_text())
    try:
        wait_for_console(console, FLOOR_LINE, DEADLINE)
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the report --------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def report(out: Results, plots: list[str]) -> str:
    lines = [
        "# unik benchmark report",
        "",
        f"{out.host}. {out.rounds} interleaved rounds; figures are medians.",
        "",
        "## Targets",
        "",
        "| measure | measured | target | |",
        "|---|---|---|---|",
    ]
    floor = med(out.boot.get("floor", []))
    for lang, values in out.boot.items():
        if lang == "floor" or not out.boot_vm_floor.get(lang):
            continue
        vm_floor = med(out.boot_vm_floor[lang])
        ratio = med(values) / vm_floor
        lines.append(
            f"| P1 boot {lang}: run → first line / floor | {med(values):.2f} s / {vm_floor:.2f} s = {ratio:.2f}x "
            f"| ≤ {TARGETS['p1_ratio']:.2f}x | {verdict(ratio <= TARGETS['p1_ratio'])} |"
        )
    for lang, values in out.build_unchanged.items():
        value = med(values)
        lines.append(
            f"| P2 build {lang}: unchanged source | {value * 1000:.0f} ms "
            f"| ≤ {TARGETS['p2_unchanged_s'] * 1000:.0f} ms | {verdict(value <= TARGETS['p2_unchanged_s'])} |"
        )
    for lang, floors in out.build_floor.items():
        cold, base = med(out.build_cold[lang]), med(floors)
        ok = cold / base <= TARGETS["p2_cold_ratio"]
        lines.append(
            f"| P2 build {lang}: cold / compiler alone | {cold * 1000:.0f} ms / {base * 1000:.0f} ms = "
            f"{cold / base:.2f}x | ≤ {TARGETS['p2_cold_ratio']:.1f}x | {verdict(ok)} |"
        )
    for route, figures in out.api.items():
        lines.append(
            f"| P4 GET {route}: requests/s | {figures['rps']:.0f} | ≥ {TARGETS['p4_rps']:.0f} "
            f"| {verdict(figures['rps'] >= TARGETS['p4_rps'])} |"
        )
        lines.append(
            f"| P4 GET {route}: p99 latency | {figures['p99_ms']:.1f} ms | ≤ {TARGETS['p4_p99_ms']:.0f} ms "
            f"| {verdict(figures['p99_ms'] <= TARGETS['p4_p99_ms'])} |"
        )
    if out.density:
        overhead = med([d["pss"] - d["guest_pss"] for d in out.density])
        floor_note = ""
        if out.density_floor:
            floor_note = f" (floor {out.density_floor['pss'] - out.density_floor['guest_pss']:.1f} MiB)"
        lines.append(
            f"| P5 host memory per idle 64 MB instance beyond its resident guest RAM (PSS) | {overhead:.1f} MiB"
            f"{floor_note} | ≤ {TARGETS['p5_overhead_mib']:.0f} MiB "
            f"| {verdict(overhead <= TARGETS['p5_overhead_mib'])} |"
        )
        beyond_64 = med([d["pss"] for d in out.density]) - 64
        lines.append(
            f"| P5 host memory per idle 64 MB instance beyond its 64 MB of guest RAM (PSS) | {beyond_64:.1f} MiB "
            f"| ≤ {TARGETS['p5_overhead_mib']:.0f} MiB | {verdict(beyond_64 <= TARGETS['p5_overhead_mib'])} |"
        )
        together = f"{out.density_running} of {out.density_started} started"
        lines.append(f"| P5 64 MB instances running together | {together} ({out.density_stop_reason}) | — | |")
    if out.boot:
        lines += [
            "",
            "## P1 boot: POST /instances/run → the app's first console line",
            "",
            "The floor is the instance's own qemu command line (machine, kernel, memory, the virtio",
            "NIC and the control port) booting a trivial static init (one line, then power-off) in",
            "place of the image, started directly with no daemon: what the hypervisor and the kernel",
            "need for that VM. The bare machine's floor is the same qemu and kernel with no devices.",
            "Each round boots every one of them once. The interpreted runtimes' rows include their",
            "own start-up under TCG (the floor has no runtime), so only the compiled languages can",
            "approach 1.0x.",
            "",
            "The columns split the gap: the daemon's exact qemu command line (initrd with the run",
            "config) started directly, without the API and `-daemonize`. unik / direct is what the",
            "daemon adds; direct / floor is what the image adds (the guest init and its network",
            "set-up, the runtime); floor / bare is what the VM's devices cost the kernel. The",
            "language's hello world (print one line, exit), run through unik as the app is, is its",
            "runtime's own start on that VM: hello / floor is the least any image of that language",
            "reaches, and unik / hello is what the app's own start-up adds.",
            "",
            "| | unik: median (range) | same VM started directly | floor on that VM | its hello world "
            "| unik / direct | unik / floor | hello / floor | unik / bare machine's floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for lang, values in out.boot.items():
            if lang == "floor":
                lines.append(
                    f"| bare machine's floor | {med(values):.2f} s ({min(values):.2f}-{max(values):.2f}) "
                    "| — | — | — | — | — | — | 1.00x |"
                )
                continue
            direct = out.boot_direct.get(lang, [])
            own = f"{med(direct):.2f} s" if direct else "—"
            added = f"{med(values) / med(direct):.2f}x" if direct else "—"
            vm_floor = out.boot_vm_floor.get(lang, [])
            on_vm = f"{med(vm_floor):.2f} s" if vm_floor else "—"
            over_vm = f"{med(values) / med(vm_floor):.2f}x" if vm_floor else "—"
            hello = out.boot_hello.get(lang, [])
            runtime = f"{med(hello):.2f} s" if hello else "—"
            runtime_over_vm = f"{med(hello) / med(vm_floor):.2f}x" if hello and vm_floor else "—"
            lines.append(
                f"| {lang} | {med(values):.2f} s ({min(values):.2f}-{max(values):.2f}) | {own} | {on_vm} | {runtime} "
                f"| {added} | {over_vm} | {runtime_over_vm} | {med(values) / floor:.2f}x |"
            )
    if out.build_cold:
        lines += [
            "",
            "## P2 build: tar.gz → image",
            "",
            "Cold: a new archive (a file the compiler ignores added), so neither unik's build cache nor",
            "a toolchain cache can answer for the app (first build of each language: empty caches).",
            "Unchanged: the same archive again with force=true (answered by the build cache).",
            "Compiler alone: the same compiler and flags on the same sources, no daemon.",
            "",
            "| language | cold | unchanged | compiler alone | cold / compiler |",
            "|---|---|---|---|---|",
        ]
        for lang in out.build_cold:
            cold, again = med(out.build_cold[lang]), med(out.build_unchanged.get(lang, []))
            floors = out.build_floor.get(lang)
            alone = f"{med(floors) * 1000:.0f} ms" if floors else "—"
            ratio = f"{cold / med(floors):.2f}x" if floors else "—"
            lines.append(f"| {lang} | {cold * 1000:.0f} ms | {again * 1000:.0f} ms | {alone} | {ratio} |")
    if out.sizes:
        lines += [
            "",
            "## P3 image size",
            "",
            "| language | kernel | initrd (uncompressed) | default memory |",
            "|---|---|---|---|",
        ]
        for lang, (kernel, initrd, memory) in out.sizes.items():
            lines.append(f"| {lang} | {kernel / MIB:.1f} MiB | {initrd / MIB:.1f} MiB | {memory} MB |")
    if out.api:
        lines += [
            "",
            "## P4 API under load",
            "",
            "100 stopped instance records and one image written straight into the store; the real",
            f"daemon process; `wrk -t1 -c{out.connections} -d{out.load_seconds}s`, after a 2 s warm-up,",
            "on the same 2 cores as the daemon.",
            "",
            "| route | requests/s | p50 | p99 |",
            "|---|---|---|---|",
        ]
        for route, figures in out.api.items():
            lines.append(
                f"| GET {route} | {figures['rps']:.0f} | {figures['p50_ms']:.2f} ms | {figures['p99_ms']:.2f} ms |"
            )
    if out.density:
        pss = [d["pss"] for d in out.density]
        rss = [d["rss"] for d in out.density]
        beyond_pss = [d["pss"] - d["guest_pss"] for d in out.density]
        beyond_rss = [d["rss"] - d["guest_rss"] for d in out.density]
        lines += [
            "",
            "## P5 density: idle 64 MB c-hello instances",
            "",
            f"Started one by one until one failed, the cap (--density-cap; 0, the default, is none) or the "
            f"host's available memory fell to a reserve; {out.density_running} of {out.density_started} "
            f"started were `running` after they idled (stopped: {out.density_stop_reason}).",
            "",
            f"- run → first line: {med(out.density_boot_s[:10]):.2f} s for the first ten, "
            f"{med(out.density_boot_s[-10:]):.2f} s for the last ten (median).",
            f"- the host's available memory fell by {out.density_host_mib:.1f} MiB per instance (qemu, "
            "its guest's RAM, and what the host kernel keeps for them).",
            f"- once idle, each instance used {out.density_idle_cpu:.2f}% of one core (its qemu's CPU "
            f"time over {IDLE_CPU_WINDOW:.0f} s).",
            "",
            "| per instance (MiB, median) | PSS | RSS |",
            "|---|---|---|",
            f"| whole qemu process | {med(pss):.1f} | {med(rss):.1f} |",
            f"| beyond the guest RAM actually resident | {med(beyond_pss):.1f} | {med(beyond_rss):.1f} |",
            f"| minus the full 64 MiB of guest RAM | {med(pss) - 64:.1f} | {med(rss) - 64:.1f} |",
            *floor_rows(out.density_floor),
            "",
            "An idle guest touches only part of its 64 MiB; the overhead is qemu minus the resident",
            "part of its guest-RAM mapping (read from /proc/PID/smaps).",
        ]
    elif out.density_stop_reason:
        lines += ["", "## P5 density", "", f"No instance was measured: {out.density_stop_reason}."]
    if out.notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in out.notes]]
    if plots:
        lines += ["", "## Plots", "", *[f"![{name}]({name})" for name in plots]]
    return "\n".join(lines) + "\n"


def floor_rows(floor: dict[str, float]) -> list[str]:
    if not floor:
        return []
    return [
        f"| floor, whole qemu process (an instance's VM on a trivial init) | {floor['pss']:.1f} | {floor['rss']:.1f} |",
        f"| floor, beyond its resident guest RAM | {floor['pss'] - floor['guest_pss']:.1f} "
        f"| {floor['rss'] - floor['guest_rss']:.1f} |",
    ]


def plot(out: Results, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if out.boot:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [lang for lang in out.boot if out.boot_vm_floor.get(lang)]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [med(out.boot[k]) / med(out.boot_vm_floor[k]) for k in labels], 0.4, label="app")
        hellos = [med(out.boot_hello.get(k, [])) / med(out.boot_vm_floor[k]) for k in labels]
        ax.bar([x + 0.2 for x in xs], hellos, 0.4, label="its hello world")
        ax.set_xticks(list(xs), labels)
        ax.axhline(TARGETS["p1_ratio"], color="red", linestyle="--", label=f"target {TARGETS['p1_ratio']:.2f}x")
        ax.set_yscale("log")
        ax.set_ylabel("unik / floor (log)")
        ax.set_title("P1 boot: run → first console line, over the floor on the same VM (medians)")
        ax.legend()
        save(fig, "p1_boot.png")
    if out.build_cold:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        langs = list(out.build_cold)
        xs = range(len(langs))
        width = 0.27
        ax.bar([x - width for x in xs], [med(out.build_cold[k]) for k in langs], width, label="cold")
        ax.bar(xs, [med(out.build_unchanged.get(k, [])) for k in langs], width, label="unchanged")
        ax.bar([x + width for x in xs], [med(out.build_floor.get(k, [])) for k in langs], width, label="compiler alone")
        ax.set_xticks(list(xs), langs)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title("P2 build: tar.gz → image")
        ax.legend()
        save(fig, "p2_build.png")
    if out.sizes:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        langs = list(out.sizes)
        kernels = [out.sizes[k][0] / MIB for k in langs]
        initrds = [out.sizes[k][1] / MIB for k in langs]
        ax.bar(langs, kernels, label="kernel")
        ax.bar(langs, initrds, bottom=kernels, label="initrd")
        ax.set_ylabel("MiB")
        ax.set_title("P3 image size")
        ax.legend()
        save(fig, "p3_size.png")
    if out.api:
        fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
        routes = list(out.api)
        left.bar(routes, [out.api[r]["rps"] for r in routes])
        left.axhline(TARGETS["p4_rps"], color="red", linestyle="--")
        left.set_title("P4 requests/s")
        right.bar([f"{r}\np50" for r in routes], [out.api[r]["p50_ms"] for r in routes])
        right.bar([f"{r}\np99" for r in routes], [out.api[r]["p99_ms"] for r in routes])
        right.axhline(TARGETS["p4_p99_ms"], color="red", linestyle="--")
        right.set_title("P4 latency (ms)")
        right.tick_params(axis="x", labelsize=7)
        save(fig, "p4_api.png")
    if out.density:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        xs = list(range(1, len(out.density) + 1))
        ax.plot(xs, [d["pss"] for d in out.density], marker="o", label="qemu PSS")
        ax.plot(xs, [d["pss"] - d["guest_pss"] for d in out.density], marker="o", label="PSS beyond guest RAM")
        ax.axhline(TARGETS["p5_overhead_mib"], color="red", linestyle="--", label="30 MiB target")
        ax.set_xlabel("instance (in start order)")
        ax.set_ylabel("MiB")
        ax.set_title("P5 host memory per idle 64 MB instance")
        ax.legend()
        save(fig, "p5_density.png")
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="c only, one round, a small density cap")
    parser.add_argument("--langs", default=",".join(LANGS))
    parser.add_argument("--only", default="p1,p2,p3,p4,p5", help="which parts (p1-p3 share one run)")
    parser.add_argument(
        "--density-cap", type=int, default=0, help="most P5 instances (0: until the host's memory reserve)"
    )
    parser.add_argument("--load-seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    langs = ["c"] if options.quick else [lang for lang in options.langs.split(",") if lang]
    rounds = 1 if options.quick else options.rounds
    cap = min(options.density_cap or 4, 4) if options.quick else options.density_cap
    parts = set(options.only.split(","))

    accel = "kvm" if kvm_usable()[0] else "tcg"
    out = Results(
        host=f"Host {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, accel {accel}, "
        f"machine pc, {time.strftime('%Y-%m-%d')}",
        rounds=rounds,
    )
    work = Path(tempfile.mkdtemp(prefix="unik-bench-", dir="/tmp"))
    try:
        if parts & {"p1", "p2", "p3", "p5"}:
            data_dir = work / "data"
            # The default max_running_instances (64) would end P5 long before the host's memory.
            running = start_daemon(data_dir, "max_running_instances: 100000\n")
            try:
                kernel = httpx.get(f"{running.url}/version", timeout=30).json()["providers"]["qemu"]["kernel"]
                out.host += f", guest kernel {kernel}"
                if parts & {"p1", "p2", "p3"}:
                    boots_and_builds(running.url, data_dir, langs, rounds, work, out)
                if "p5" in parts:
                    density(running.url, data_dir, cap, 10.0, out)
            finally:
                running.stop()
        if "p4" in parts:
            out.connections, out.load_seconds = options.connections, options.load_seconds
            api_load(work, options.load_seconds, options.connections, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    options.out.mkdir(parents=True, exist_ok=True)
    text = report(out, plot(out, options.out))
    (options.out / "report.md").write_text(text)
    (options.out / "results.json").write_text(json.dumps(out.__dict__, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
