"""`python -m unik.kernel {fetch|build-micro} [DIR]`: get the cloud kernel or build the micro one."""

from __future__ import annotations

import sys
from pathlib import Path

from unik.kernel.cloud import fetch
from unik.kernel.layout import default_kernel_root
from unik.kernel.micro import build_micro


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("fetch", "build-micro") or len(args) > 2:
        print("usage: python -m unik.kernel {fetch|build-micro} [DIR]", file=sys.stderr)
        return 2
    root = Path(args[1]) if len(args) == 2 else default_kernel_root()
    try:
        kernel = fetch(root) if args[0] == "fetch" else build_micro(root)
    except (RuntimeError, ValueError) as e:
        print(f"unik.kernel: {e}", file=sys.stderr)
        return 1
    print(f"{kernel.version} {kernel.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
