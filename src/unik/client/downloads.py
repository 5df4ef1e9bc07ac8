"""Download bodies: a streamed answer written to a file with progress, complete or not at all."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from unik.client.base import ProgressCallback
from unik.client.errors import UnikConnectionError

_CHUNK = 1024 * 1024

# httpx asks for gzip by default; an encoded body would make Content-Length count other
# bytes than the ones written, and progress and the completeness check rely on those.
IDENTITY = {"Accept-Encoding": "identity"}


def _partial_path(dest: Path) -> Path:
    # Beside `dest`, so the final rename stays on one filesystem and is atomic; hidden and
    # random so that neither a listing nor a second export of the same file picks it up.
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")


def _download(open_response: Callable[[], httpx.Response], dest: Path, progress: ProgressCallback | None) -> Path:
    """Write the body of `open_response()` (a streamed, already checked answer) to `dest`.

    The temporary file is made before the request is sent, so an unwritable folder fails
    before the daemon starts any work; on any failure it is removed and `dest` is untouched.
    `progress(done, total)` counts bytes written; `total` is the Content-Length, 0 when the
    daemon sent none. The request must ask for `Accept-Encoding: identity`
    (`IDENTITY`), so that the bytes written are the bytes Content-Length counts.
    """
    partial = _partial_path(dest)
    # "x": never follow or clobber something already there; the mode then follows the umask
    # like any file the user makes, unlike mkstemp's 0600.
    out = partial.open("xb")
    try:
        with out:
            response = open_response()
            try:
                _copy_body(response, out, progress)
            finally:
                response.close()
        os.replace(partial, dest)
    except BaseException:
        # BaseException: a Ctrl-C mid-download must not leave a half disk behind either.
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return dest


def _copy_body(response: httpx.Response, out: IO[bytes], progress: ProgressCallback | None) -> None:
    try:
        total = int(response.headers.get("Content-Length", "0"))
    except ValueError:
        total = 0
    if progress is not None:
        progress(0, total)
    done = 0
    try:
        for chunk in response.iter_bytes(_CHUNK):
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    except httpx.TransportError as exc:
        raise UnikConnectionError(f"download from {response.request.url} broke: {exc}") from exc
    if total and done != total:
        # A daemon that dies mid-stream may close cleanly; a short disk must not look complete.
        raise UnikConnectionError(f"download from {response.request.url} ended after {done} of {total} bytes")
