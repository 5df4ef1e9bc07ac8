"""Warm starts: run → first HTTP answer, cold against a clone of a VM template, and host memory.

For each HTTP example (nodejs, python, java by default): one warm run makes the template
(and is deleted), then each round runs the image cold and warm, in alternating order, timing
POST /instances/run → the first 200 from /ping_test through a published port (polled with a
short client timeout: slirp may accept a connection before the guest runs). The floor is qemu
alone: the same machine and memory started with -daemonize and -S until it is up, the least any
clone could take. Then memory: N idle clones of one template against N idle cold instances of
the nodejs example, PSS per qemu (the clones share the template's pages).

    .venv/bin/python bench/warm.py [--rounds 5] [--langs nodejs,python,java] [--instances 20]

Writes bench/results/warm.md.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import EXAMPLES, api, daemon, publish, tarball

from unik.providers.network import free_port
from unik.testing import qemu_memory

DEADLINE = 120.0
SETTLE = 10.0


def build(base: str, lang: str) -> dict[str, object]:
    response = api(base).post(
        f"/images/{lang}/create",
        params={"base": "linux", "lang": lang, "provider": "qemu"},
        files={"tarfile": ("app.tar.gz", tarball(EXAMPLES / f"{lang}-http"))},
    )
    response.raise_for_status()
    return response.json()


def run(base: str, lang: str, name: str, warm: bool) -> tuple[str, float, bool]:
    """(instance id, seconds from the run request to the first answer, whether it started warm)."""
    port = free_port()
    ports = [{"HostPort": port, "GuestPort": 8080}]
    body = {"InstanceName": name, "ImageName": lang, "WarmStart": warm, "Ports": ports}
    started = time.perf_counter()
    response = api(base).post("/instances/run", json=body)
    response.raise_for_status()
    while time.perf_counter() - started < DEADLINE:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/ping_test", timeout=0.5).status_code == 200:
                return response.json()["Id"], time.perf_counter() - started, bool(response.json().get("StartedWarm"))
        time.sleep(0.01)
    raise RuntimeError(f"{name}: no answer in {DEADLINE:.0f} s")


def delete(base: str, instance_id: str) -> None:
    api(base).delete(f"/instances/{instance_id}", params={"force": "true"}).raise_for_status()


def wait_for_template(data_dir: Path, count: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if len(list((data_dir / "templates").glob("*/meta.json"))) >= count:
            return
        time.sleep(0.1)
    raise RuntimeError("no VM template was made")


def qemu_alone(memory_mb: int, work: Path) -> float:
    pidfile = work / "floor.pid"
    pidfile.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(
        ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", str(memory_mb), "-nodefaults", "-display", "none",
         "-S", "-daemonize", "-pidfile", str(pidfile)],
        check=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    subprocess.run(["kill", pidfile.read_text().strip()], check=True)
    return elapsed


def pss_of(data_dir: Path, ids: list[str], memory_mb: int) -> list[float]:
    return [
        qemu_memory(int((data_dir / "instances" / i / "qemu.pid").read_text()), memory_mb)["pss"] for i in ids
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--langs", default="nodejs,python,java")
    parser.add_argument("--instances", type=int, default=20)
    options = parser.parse_args()
    langs = options.langs.split(",")
    times: dict[tuple[str, str], list[float]] = {}
    memory: dict[str, list[float]] = {}
    memory_mb: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="unik-bench-", dir="/tmp") as work_dir:
        work = Path(work_dir)
        data = work / "data"
        with daemon(data) as base:
            for n, lang in enumerate(langs):
                image = build(base, lang)
                memory_mb[lang] = int(image["RunSpec"]["DefaultInstanceMemory"])  # type: ignore[index]
                first, _, _ = run(base, lang, f"{lang}-template", warm=True)
                wait_for_template(data, n + 1)
                delete(base, first)
            for r in range(options.rounds):
                for lang in langs:
                    order = ("cold", "warm") if r % 2 == 0 else ("warm", "cold")
                    for way in order:
                        instance_id, elapsed, warm = run(base, lang, f"{lang}-{way}-{r}", warm=way == "warm")
                        assert warm == (way == "warm"), f"{lang} {way}: StartedWarm={warm}"
                        delete(base, instance_id)
                        times.setdefault((lang, way), []).append(elapsed)
                        print(f"round {r + 1}: {lang} {way} {elapsed:.2f} s", file=sys.stderr)
                    times.setdefault((lang, "floor"), []).append(qemu_alone(memory_mb[lang], work))
            lang = langs[0]
            for way in ("warm", "cold"):
                ids = [run(base, lang, f"idle-{way}-{i}", warm=way == "warm")[0] for i in range(options.instances)]
                time.sleep(SETTLE)
                memory[way] = pss_of(data, ids, memory_mb[lang])
                for instance_id in ids:
                    delete(base, instance_id)
                print(f"{options.instances} {way} {lang}: PSS {statistics.median(memory[way]):.1f} MiB each",
                      file=sys.stderr)  # fmt: skip

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"

    lines = [
        "# Warm starts",
        "",
        f"Host {platform.node()}, TCG. POST /instances/run → first 200 from /ping_test, median (min-max) of "
        f"{options.rounds} interleaved rounds; the floor is qemu alone (same machine and memory, -S, -daemonize).",
        "",
        "| example | memory | cold | warm clone | cold / warm | floor: qemu alone |",
        "|---|---|---|---|---|---|",
    ]
    for lang in langs:
        cold, warm = times[(lang, "cold")], times[(lang, "warm")]
        ratio = statistics.median(cold) / statistics.median(warm)
        lines.append(
            f"| {lang}-http | {memory_mb[lang]} MB | {cell(cold)} | {cell(warm)} | {ratio:.1f}x "
            f"| {cell(times[(lang, 'floor')])} |"
        )
    warm_pss, cold_pss = statistics.median(memory["warm"]), statistics.median(memory["cold"])
    lines += [
        "",
        f"{options.instances} idle {langs[0]}-http instances ({memory_mb[langs[0]]} MB each), {SETTLE:.0f} s after "
        f"the last started: host memory per qemu (PSS, median): clones {warm_pss:.1f} MiB, cold {cold_pss:.1f} MiB "
        f"({warm_pss / cold_pss:.0%} of cold).",
    ]
    publish("\n".join(lines), "warm.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
