"""Per-language benchmark of examples/<lang>-http through a real daemon with a fresh data dir.

For each language:
  build cold      POST /images/{name}/create with empty toolchain caches (Go's build cache,
                  Cargo's target dir and the jlink runtime live in the data dir's cache/)
  build unchanged the same sources again (force=true): what the caches save
  kernel, initrd  the image's two files, in MB (the initrd is uncompressed)
  boot memory     the image's default instance memory (the initrd is unpacked into RAM)
  first line      POST /instances/run → "listening on" seen through the logs API
  first response  POST /instances/run → the first 200 from /ping_test through a published port
Boot figures are medians over --rounds boots. Printed as Markdown and written to
bench/results/languages.md.

    .venv/bin/python bench/languages.py [--rounds N] [--langs go,cpp,...]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import daemon, publish

from unik.client import UnikClient
from unik.providers.network import free_port
from unik.providers.qemu import kvm_usable

ROOT = Path(__file__).resolve().parent.parent
LANGS = ["c", "go", "cpp", "rust", "python", "nodejs", "java"]
DEADLINE = 300.0


@dataclass
class Result:
    lang: str
    build_cold: float
    build_again: float
    kernel_mb: float
    initrd_mb: float
    memory_mb: int
    first_line: list[float]
    first_response: list[float]


def example(lang: str) -> Path:
    return ROOT / "examples" / f"{lang}-http"


def timed_build(client: UnikClient, lang: str, force: bool) -> float:
    start = time.monotonic()
    client.images.build(f"{lang}-http", example(lang), "linux", lang, "qemu", force=force)
    return time.monotonic() - start


def boot(client: UnikClient, lang: str, name: str) -> tuple[float, float]:
    port = free_port()
    start = time.monotonic()
    client.instances.run(name, f"{lang}-http", ports=[{"HostPort": port, "GuestPort": 8080, "Protocol": "tcp"}])
    first_line = first_response = 0.0
    try:
        while time.monotonic() - start < DEADLINE:
            if not first_line and "listening on" in client.instances.logs(name):
                first_line = time.monotonic() - start
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/ping_test", timeout=2).status_code == 200:
                    first_response = time.monotonic() - start
                    return first_line or first_response, first_response
            time.sleep(0.05)
        raise RuntimeError(f"{lang}: no answer within {DEADLINE:.0f} s:\n{client.instances.logs(name)[-2000:]}")
    finally:
        client.instances.delete(name, force=True)


def measure(client: UnikClient, data_dir: Path, lang: str, rounds: int) -> Result:
    cold = timed_build(client, lang, force=False)
    again = timed_build(client, lang, force=True)
    image = client.images.get(f"{lang}-http")
    folder = data_dir / "images" / image.Id
    lines, responses = [], []
    for n in range(rounds):
        line, response = boot(client, lang, f"{lang}-{n}")
        lines.append(line)
        responses.append(response)
        print(f"{lang}: boot {n + 1}: first line {line:.2f} s, first response {response:.2f} s", file=sys.stderr)
    return Result(
        lang=lang,
        build_cold=cold,
        build_again=again,
        kernel_mb=(folder / "kernel").stat().st_size / 2**20,
        initrd_mb=(folder / "initrd").stat().st_size / 2**20,
        memory_mb=image.RunSpec.DefaultInstanceMemory,
        first_line=lines,
        first_response=responses,
    )


def table(results: list[Result], accel: str, rounds: int) -> str:
    out = [
        f"Languages: examples/<lang>-http, {platform.node()}, accel {accel}, "
        f"boot medians over {rounds} boots, {time.strftime('%Y-%m-%d')}.",
        "",
        "| language | build cold | build unchanged | kernel | initrd | boot memory | first line | first response |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        out.append(
            f"| {r.lang} | {r.build_cold:.1f} s | {r.build_again:.1f} s | {r.kernel_mb:.1f} MB | {r.initrd_mb:.1f} MB "
            f"| {r.memory_mb} MB | {statistics.median(r.first_line):.2f} s "
            f"| {statistics.median(r.first_response):.2f} s |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--langs", default=",".join(LANGS))
    options = parser.parse_args()
    langs = [lang for lang in options.langs.split(",") if lang]
    accel = "kvm" if kvm_usable()[0] else "tcg"
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="unik-bench-", dir="/tmp") as tmp:
        data_dir = Path(tmp) / "data"
        with daemon(data_dir) as host, UnikClient(host, timeout=DEADLINE) as client:
            available = set(client.available_compilers())
            for lang in langs:
                if f"linux-{lang}-qemu" not in available:
                    print(f"{lang}: no toolchain on this host, skipped", file=sys.stderr)
                    continue
                results.append(measure(client, data_dir, lang, options.rounds))
    text = table(results, accel, options.rounds)
    publish(text, "languages.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
