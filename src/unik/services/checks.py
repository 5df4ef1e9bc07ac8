"""Checks of user input that more than one service makes: names, mount points, env, a full disk."""

from __future__ import annotations

from pathlib import Path

from unik.errors import BadRequest, disk_full
from unik.models import is_valid_name


def require_name(name: str, kind: str) -> None:
    if not is_valid_name(name):
        raise BadRequest(f"invalid {kind} name {name!r}: use 1-64 characters of [A-Za-z0-9_.-], starting alphanumeric")


def raise_if_disk_full(exc: BaseException, data_dir: Path) -> None:
    """A full host disk is a 507 that says so, not a 500 with a traceback or a 400 blaming the upload.

    Here rather than only in the API's catch-all handler: Starlette re-raises what that handler
    answered, and the server then drops the client's connection."""
    full = disk_full(exc, data_dir)
    if full is not None:
        raise full from exc


def mount_points(mounts: list[str]) -> list[str]:
    """Normalised absolute mount points, each once; blank entries are skipped."""
    points: list[str] = []
    for raw in mounts:
        point = raw.strip()
        if not point:
            continue
        if not point.startswith("/") or point == "/" or ".." in point.split("/") or _has_space_or_nul(point):
            raise BadRequest(f"mount point {point!r} must be an absolute path below /, without spaces")
        point = "/" + "/".join(part for part in point.split("/") if part not in ("", "."))
        if point not in points:
            points.append(point)
    return points


def check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in str(value):
            raise BadRequest(f"invalid environment variable name {key!r}")
    return {str(k): str(v) for k, v in env.items()}


def _has_space_or_nul(text: str) -> bool:
    return any(c.isspace() or c == "\x00" for c in text)
