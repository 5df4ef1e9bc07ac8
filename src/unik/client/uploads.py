"""Upload bodies: a source folder packed as tar.gz and streamed as multipart/form-data with progress."""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from unik.client.base import ProgressCallback

_CHUNK = 64 * 1024


def _pack_folder(folder: Path, out: IO[bytes]) -> None:
    """Write `folder` as tar.gz with member names relative to it (no leading ./)."""
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(str(child), arcname=child.name)


def _open_upload(stack: contextlib.ExitStack, source: Path) -> tuple[IO[bytes], str]:
    """An open binary file holding the upload and the file name to announce for it."""
    source = Path(source).expanduser()
    if source.is_dir():
        # A temp file rather than memory: application folders can be large.
        tmp = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (the stack closes it)
        _pack_folder(source, tmp)
        tmp.seek(0)
        return tmp, f"{source.resolve().name or 'sources'}.tar.gz"
    if not source.is_file():
        raise FileNotFoundError(f"no such file or folder: {source}")
    return stack.enter_context(source.open("rb")), source.name


class _MultipartBody:
    """A multipart/form-data body streamed from a file, reporting progress.

    httpx's own `files=` encoder gives no progress hook, so the (simple) framing is
    written here; the length is known up front so the body is not sent chunked.
    """

    def __init__(
        self,
        fields: Mapping[str, str],
        file_field: str,
        filename: str,
        fileobj: IO[bytes],
        progress: ProgressCallback | None,
    ) -> None:
        self.boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields.items()
        )
        safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head += (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{file_field}"; filename="{safe_name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._head = head
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        fileobj.seek(0, os.SEEK_END)
        self._file_size = fileobj.tell()
        fileobj.seek(0)
        self._file = fileobj
        self._progress = progress
        self.length = len(self._head) + self._file_size + len(self._tail)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.length),
        }

    def __iter__(self) -> Iterator[bytes]:
        sent = 0

        def report(n: int) -> None:
            nonlocal sent
            sent += n
            if self._progress is not None:
                self._progress(sent, self.length)

        if self._progress is not None:
            self._progress(0, self.length)
        yield self._head
        report(len(self._head))
        self._file.seek(0)
        while chunk := self._file.read(_CHUNK):
            yield chunk
            report(len(chunk))
        yield self._tail
        report(len(self._tail))
