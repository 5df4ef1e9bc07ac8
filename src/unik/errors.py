"""Domain errors; the API maps each class to one HTTP status (api/errors.py)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path


class UnikError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(UnikError):
    status = 400


class Unauthorized(UnikError):
    status = 401


class Forbidden(UnikError):
    status = 403


class NotFound(UnikError):
    status = 404


class Conflict(UnikError):
    status = 409


class TooLarge(UnikError):
    status = 413


class NotImplementedByProvider(UnikError):
    status = 501


class BadGateway(UnikError):
    status = 502


class InsufficientStorage(UnikError):
    """The daemon's own disk is full: not the client's fault, and not a bug either."""

    status = 507


# How the host says "disk full", also when a tool (mke2fs, the compiler) prints it for us.
_DISK_FULL_TEXT = "No space left on device"


def disk_full(exc: BaseException | None, where: Path | str) -> InsufficientStorage | None:
    """The 507 for an error caused (anywhere down its chain) by a full disk, else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        detail = None
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            detail = f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
        elif isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc):
            detail = str(exc)
        elif isinstance(exc, UnikError) and _DISK_FULL_TEXT in exc.message:
            detail = next(line.strip() for line in exc.message.splitlines() if _DISK_FULL_TEXT in line)
        if detail is not None:
            return InsufficientStorage(
                f"the daemon's disk is full ({where}): {detail}. Nothing was kept; free some space and try again"
            )
        exc = exc.__cause__ or exc.__context__
    return None
