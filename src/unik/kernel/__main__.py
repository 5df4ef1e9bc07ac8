"""`python -m unik.kernel {fetch|build-micro|build-disk} [DIR]`: get the cloud kernel or build ours."""

from __future__ import annotations

import sys
from pathlib import Path

from unik.kernel.cloud import fetch
from unik.kernel.layout import default_kernel_root
from unik.kernel.micro import BUILDS, build_micro


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    builds = {f"build-{flavour}": build for flavour, build in BUILDS.items()}
    if not args or args[0] not in ("fetch", *builds) or len(args) > 2:
        print(f"usage: python -m unik.kernel {{{'|'.join(('fetch', *builds))}}} [DIR]", file=sys.stderr)
        return 2
    root = Path(args[1]) if len(args) == 2 else default_kernel_root()
    try:
        kernel = fetch(root) if args[0] == "fetch" else build_micro(root, build=builds[args[0]])
    except (RuntimeError, ValueError) as e:
        print(f"unik.kernel: {e}", file=sys.stderr)
        return 1
    print(f"{kernel.version} {kernel.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
