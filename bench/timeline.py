"""Where an instance's boot goes, by sampling its vCPU: a timeline of kernel functions and user code.

    .venv/bin/python bench/timeline.py --example python-http --marker "listening on"

Runs the example through a real daemon, then asks the VM's QMP socket for the vCPU's registers
as fast as it answers (a sample every ~0.5 ms here) until the app's first line, and prints,
per 100 ms, the kernel functions the instruction pointer was in (names from the micro
kernel's System.map, when the build tree that made it is still there) or `user` for the
guest's programs (and, in the first milliseconds, the firmware). A wait shows as the same few
functions bucket after bucket: that is how the guest's ~1 s of jitter entropy collection
before CPython's first line was found (`try_to_generate_entropy`, `blake2s_compress_generic`,
the scheduler). Each sample pauses the vCPU, so a sampled boot is slower than an unsampled one.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLES, api, daemon, tarball

from unik.kernel import default_kernel_root, load

# The kernel's text is mapped in the top half of the address space; user code below it.
KERNEL_SPACE = 0xFFFF_0000_0000_0000
DEADLINE = 120.0


class Symbols:
    """Kernel text symbols by address, from a System.map; without one every kernel address is `kernel`."""

    def __init__(self, system_map: Path | None) -> None:
        entries: list[tuple[int, str]] = []
        if system_map is not None:
            for line in system_map.read_text().splitlines():
                address, kind, name = line.split()[:3]
                if kind in "tTwW":
                    entries.append((int(address, 16), name))
        entries.sort()
        self.addresses = [address for address, _ in entries]
        self.names = [name for _, name in entries]

    def name(self, rip: int) -> str:
        if rip < KERNEL_SPACE:
            return "user"
        at = bisect.bisect_right(self.addresses, rip) - 1
        return self.names[at] if at >= 0 else "kernel"


def micro_system_map() -> Path | None:
    """The micro kernel's System.map, if the build tree still holds the build of the kernel in use."""
    root = default_kernel_root()
    try:
        kernel = load(root, "micro")
    except FileNotFoundError:
        return None
    out = root / ".micro-build" / "out"
    system_map, config = out / "System.map", out / ".config"
    if system_map.is_file() and config.is_file() and config.read_bytes() == (kernel.root / "config").read_bytes():
        return system_map
    return None


async def sample(qmp_socket: Path, console: Path, marker: bytes, symbols: Symbols) -> list[tuple[float, str]]:
    client = QMPClient("timeline")
    await client.connect(str(qmp_socket))
    samples: list[tuple[float, str]] = []
    started = time.perf_counter()
    try:
        while marker not in console.read_bytes():
            if time.perf_counter() - started > DEADLINE:
                raise RuntimeError(f"no {marker!r} on the console within {DEADLINE:.0f} s")
            registers = await client.execute("human-monitor-command", {"command-line": "info registers"})
            found = re.search(r"\b[RE]IP=([0-9a-f]+)", str(registers))
            if found:
                samples.append((time.perf_counter() - started, symbols.name(int(found.group(1), 16))))
    finally:
        await client.disconnect()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", default="c-hello", help="a folder of examples/")
    parser.add_argument("--marker", default="hello from unik", help="the app's first line (a part of it)")
    parser.add_argument("--bucket", type=float, default=0.1, help="seconds per printed line")
    parser.add_argument("--top", type=int, default=4, help="functions shown per line")
    args = parser.parse_args()
    lang = args.example.split("-")[0]
    system_map = micro_system_map()
    symbols = Symbols(system_map)
    print(f"symbols: {system_map or 'none (kernel addresses read `kernel`)'}")
    with tempfile.TemporaryDirectory(prefix="unik-timeline-") as tmp, daemon(Path(tmp) / "data") as base:
        http = api(base)
        http.post(
            "/images/timeline/create",
            params={"base": "linux", "lang": lang, "provider": "qemu", "force": "true"},
            files={"tarfile": ("app.tar.gz", tarball(EXAMPLES / args.example))},
        ).raise_for_status()
        instance = http.post("/instances/run", json={"InstanceName": "timeline", "ImageName": "timeline"}).json()
        folder = Path(tmp) / "data" / "instances" / instance["Id"]
        try:
            samples = asyncio.run(sample(folder / "qmp.sock", folder / "console.log", args.marker.encode(), symbols))
        finally:
            http.delete("/instances/timeline", params={"force": "true"})
    buckets: defaultdict[int, Counter[str]] = defaultdict(Counter)
    for at, name in samples:
        buckets[int(at / args.bucket)][name] += 1
    for index in sorted(buckets):
        top = ", ".join(f"{name} {count}" for name, count in buckets[index].most_common(args.top))
        print(f"{index * args.bucket:5.1f} s  {top}")
    interval = samples[-1][0] / len(samples) if samples else 0.0
    print(f"{len(samples)} samples over {samples[-1][0] if samples else 0:.2f} s (one per {interval * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
