"""The least guest memory each language's HTTP example boots and serves in, beside the minimum
the daemon computes for it (unik.artifacts.initrd_min_memory_mb) and its default memory.

For each example: build it, then run it at decreasing MemoryMb in 16 MB steps, each run until
its first GET /ping_test answers or the VM ends (the guest out of memory: "No space left on
device" while unpacking, a signal, an OOM kill). One boot per size, from the default down. The
daemon refuses runs below the image's minimum, so the search ends there at the latest: the
minimum is right when the least size that served is the minimum itself. (The floors below it
were measured before the daemon checked, with this script: bench/REPORT.md.)

    .venv/bin/python bench/min_memory.py [--langs python,nodejs,java]

Writes bench/results/min_memory.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import EXAMPLES, daemon, publish, tarball

from unik.providers.network import free_port

STEP_MB = 16
SERVE_DEADLINE = 180.0
LANGS = ("c", "go", "python", "nodejs", "java")


def build(base: str, lang: str) -> dict[str, object]:
    response = httpx.post(
        f"{base}/images/{lang}/create",
        params={"base": "linux", "lang": lang, "provider": "qemu", "force": "true"},
        files={"tarfile": ("app.tar.gz", tarball(EXAMPLES / f"{lang}-http"))},
        timeout=600,
    )
    response.raise_for_status()
    image: dict[str, object] = response.json()
    return image


def serves(base: str, lang: str, memory_mb: int) -> bool:
    """Whether the example, run at `memory_mb`, answers /ping_test before its VM ends."""
    port = free_port()
    name = f"{lang}-{memory_mb}"
    body = {"InstanceName": name, "ImageName": lang, "MemoryMb": memory_mb,
            "Ports": [{"HostPort": port, "GuestPort": 8080}]}  # fmt: skip
    response = httpx.post(f"{base}/instances/run", json=body, timeout=120)
    if response.status_code != 201:
        return False  # refused before any VM starts (below the image's minimum)
    try:
        deadline = time.monotonic() + SERVE_DEADLINE
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping_test", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if httpx.get(f"{base}/instances/{name}", timeout=30).json()["State"] != "running":
                return False
            time.sleep(0.3)
        return False
    finally:
        httpx.delete(f"{base}/instances/{name}", params={"force": "true"}, timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--langs", default=",".join(LANGS))
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="unik-bench-", dir="/tmp") as work, daemon(Path(work) / "data") as base:
        for lang in options.langs.split(","):
            image = build(base, lang)
            run_spec = image["RunSpec"]
            assert isinstance(run_spec, dict)
            default = int(run_spec["DefaultInstanceMemory"])
            minimum = int(run_spec.get("MinInstanceMemoryMB") or 0)
            floor = None
            # The daemon refuses runs below the computed minimum, so the search stops there at the
            # latest: a "refused" just below the minimum says the minimum itself served.
            size = default
            while size > 0 and serves(base, lang, size):
                floor = size
                size -= STEP_MB
            rows.append((lang, default, minimum, floor, size))
            print(f"{lang}: default {default} MB, minimum {minimum} MB, served down to {floor} MB", file=sys.stderr)
    lines = [
        "# Least guest memory per example (16 MB steps)",
        "",
        f"Host {platform.node()}, one boot per size, from the default down until one fails or is refused.",
        "",
        "| example | default | computed minimum | least that served | first that did not (or was refused) |",
        "|---|---|---|---|---|",
    ]
    for lang, default, minimum, floor, failed in rows:
        lines.append(f"| {lang}-http | {default} MB | {minimum} MB | {floor} MB | {failed} MB |")
    publish("\n".join(lines), "min_memory.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
