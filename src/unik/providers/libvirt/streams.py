"""What goes through a libvirt connection as a stream: files into and out of a host's storage
pool, the guest's console into the daemon's console file, and the guest init's control
channel (its second serial port). Blocking streams, each in a thread of its own: without a
libvirt event loop, non-blocking ones never return data."""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt
from unik.errors import UnikError
from unik.models import VolumeAttachment
from unik.providers.libvirt.domain import volume_name

# The guest init's control channel (docs/architecture.md): its second serial port.
CONTROL_DEVICE = "serial1"
CONTROL_TIMEOUT = 30.0
CONTROL_RESEND = 1.0


def upload(conn: Any, pool: Any, name: str, source: Path | bytes, *, replace: bool = False) -> str:
    """The host-side path of volume `name` holding `source`, uploaded through the connection
    unless there (or `replace`)."""
    with contextlib.suppress(libvirt.libvirtError):
        existing = pool.storageVolLookupByName(name)
        if not replace:
            return str(existing.path())
        existing.delete(0)
    data = source if isinstance(source, bytes) else None
    size = len(data) if data is not None else Path(source).stat().st_size  # type: ignore[arg-type]
    xml = f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{max(size, 1)}</capacity></volume>"
    volume = pool.createXML(xml, 0)
    stream = conn.newStream(0)
    volume.upload(stream, 0, size, 0)
    if data is not None:
        stream.sendAll(lambda _stream, n, buf: buf.pop(0)[:n] if buf else b"", [data])
    else:
        with open(source, "rb") as f:  # type: ignore[arg-type]
            stream.sendAll(lambda _stream, n, file: file.read(n), f)
    stream.finish()
    return str(volume.path())


def download(conn: Any, pool: Any, volume: VolumeAttachment) -> None:
    """The host's copy of the volume back into the daemon's file (whole, then renamed), and
    the host's copy deleted."""
    try:
        host_copy = pool.storageVolLookupByName(volume_name(volume))
    except libvirt.libvirtError:
        return  # never uploaded, or already brought back
    target = Path(volume.path)
    partial = target.with_name(f".{target.name}.download")
    stream = conn.newStream(0)
    host_copy.download(stream, 0, 0, 0)
    with open(partial, "wb") as out:
        stream.recvAll(lambda _stream, data, f: f.write(data), out)
    stream.finish()
    os.replace(partial, target)
    host_copy.delete(0)


def follow_console(conn: Any, domain: Any, path: Path, done: Callable[[], None]) -> threading.Thread:
    """A thread copying the guest's console into `path` until the domain ends; then `done()`."""
    stream = conn.newStream(0)
    domain.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)

    def copy() -> None:
        with open(path, "ab", buffering=0) as out, contextlib.suppress(Exception):
            while data := stream.recv(4096):
                if isinstance(data, int):  # -2: would block, on a blocking stream: never
                    break
                out.write(data)
        with contextlib.suppress(Exception):
            stream.finish()
        done()

    thread = threading.Thread(target=copy, name=f"console-{domain.name()[5:13]}", daemon=True)
    thread.start()
    return thread


def exchange(conn: Any, domain: Any, command: str) -> str:
    """One request to the guest init: `TAG COMMAND` out, again every second until answered;
    returns its `ok` or `err WHY` (the protocol of providers/qemu/control.py)."""
    stream = conn.newStream(0)
    domain.openConsole(CONTROL_DEVICE, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        buffer = b""
        with contextlib.suppress(Exception):
            while data := stream.recv(1024):
                if isinstance(data, int):
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    lines.put(line.decode(errors="replace").strip())

    threading.Thread(target=read, name=f"control-{domain.name()[5:13]}", daemon=True).start()
    tag = secrets.token_hex(6)
    request = f"\n{tag} {command}\n".encode()
    deadline = time.monotonic() + CONTROL_TIMEOUT
    try:
        while time.monotonic() < deadline:
            stream.send(request)
            resend_at = time.monotonic() + CONTROL_RESEND
            while (left := resend_at - time.monotonic()) > 0:
                try:
                    head, _, rest = lines.get(timeout=left).partition(" ")
                except queue.Empty:
                    break
                if head == tag and (rest == "ok" or rest.startswith("err")):
                    return rest
        raise UnikError(f"the guest did not answer {command.split()[0]!r} in time")
    finally:
        with contextlib.suppress(Exception):
            stream.abort()  # wakes the reader thread
