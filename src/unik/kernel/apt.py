"""Host commands shared by the cloud fetch and the micro build: checked runs and apt-cache lookups."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def _run(cmd: list[str], *, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{proc.stderr.strip()}")
    return proc.stdout


def _apt_cache(query: list[str], pattern: str, missing: str) -> str:
    """Group 1 of the first match of `pattern` in what `apt-cache QUERY` prints; asked once more
    after `apt-get update` when absent (fresh machines often have empty package lists)."""

    def lookup() -> str | None:
        try:
            out = _run(["apt-cache", *query])
        except RuntimeError:
            return None
        m = re.search(pattern, out, re.MULTILINE)
        return m.group(1) if m else None

    found = lookup()
    if found is None:
        _run(["apt-get", "update"])
        found = lookup()
    if found is None:
        raise RuntimeError(missing)
    return found
