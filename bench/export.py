"""Disk export: GET /images/{name}/disk per format, beside its floor, for examples/c-http and
examples/nodejs-http.

Per image and format: the first export (made now: the initrd with today's init and the run
config, the GPT disk with the disk kernel, the conversion) and the second (answered from the disk kept
beside the image), both timed from the request to the last byte of the body; the file's size.
The floor is `qemu-img convert` of the same raw disk alone, run here without the daemon.

    .venv/bin/python bench/export.py [--langs c,nodejs]

Writes bench/results/export.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import EXAMPLES, daemon, publish, tarball

from unik.artifacts.disk import FORMATS

ROUNDS = 3


def export(base: str, image: str, fmt: str, dest: Path) -> float:
    started = time.perf_counter()
    with httpx.stream("GET", f"{base}/images/{image}/disk", params={"format": fmt, "env": "K=v"}, timeout=600) as r:
        r.raise_for_status()
        with open(dest, "wb") as out:
            for chunk in r.iter_bytes(1 << 20):
                out.write(chunk)
    return time.perf_counter() - started


def convert_alone(raw: Path, fmt: str, dest: Path) -> float:
    target = FORMATS[fmt]
    options = ["-o", ",".join(target.options)] if target.options else []
    started = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", target.driver, *options, raw, dest], check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--langs", default="c,nodejs")
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="unik-bench-", dir="/tmp") as work_dir, daemon(
        Path(work_dir) / "data", "disk_cache_mb: 100000\n"
    ) as base:
        work = Path(work_dir)
        for lang in options.langs.split(","):
            httpx.post(
                f"{base}/images/{lang}/create",
                params={"base": "linux", "lang": lang, "provider": "qemu"},
                files={"tarfile": ("app.tar.gz", tarball(EXAMPLES / f"{lang}-http"))},
                timeout=600,
            ).raise_for_status()
            raw = work / f"{lang}.img"
            export(base, lang, "raw", raw)
            for fmt in FORMATS:
                dest = work / f"{lang}-{fmt}"
                first = export(base, lang, fmt, dest)
                again = statistics.median(export(base, lang, fmt, dest) for _ in range(ROUNDS))
                floor = statistics.median(convert_alone(raw, fmt, work / f"floor-{fmt}") for _ in range(ROUNDS))
                rows.append((lang, fmt, first, again, floor, dest.stat().st_size))
                print(f"{lang} {fmt}: first {first:.2f} s, again {again:.2f} s, convert alone {floor:.2f} s",
                      file=sys.stderr)  # fmt: skip
    lines = [
        "# Disk export",
        "",
        f"Host {platform.node()}; first export includes making the disk; `again` is the kept disk "
        f"(median of {ROUNDS}); the floor is qemu-img convert of the same raw disk alone (median of {ROUNDS}).",
        "",
        "| image | format | first export | again | qemu-img convert alone | size |",
        "|---|---|---|---|---|---|",
    ]
    for lang, fmt, first, again, floor, size in rows:
        mib = size / (1 << 20)
        lines.append(f"| {lang}-http | {fmt} | {first:.2f} s | {again:.2f} s | {floor:.2f} s | {mib:.1f} MiB |")
    publish("\n".join(lines), "export.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
