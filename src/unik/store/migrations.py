"""The store's schema version (SQLite's user_version) and the steps from each older one.

Version 0 is every data dir written before the version was kept: each table had an untyped
`internal` JSON column. Version 1 stores typed metadata (models.records) in `meta`. Version 2
names, in each kernel+initrd image's StageSpec, the disk formats it exports to. A data dir
from a newer daemon is refused rather than misread.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unik.models import DISK_FORMATS, KERNEL_INITRD, ImageMeta, InstanceMeta, LaunchSpec, VolumeMeta

log = logging.getLogger(__name__)

TABLES = ("images", "instances", "volumes")

_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    wire TEXT NOT NULL,
    meta TEXT NOT NULL
)
"""

# Instance addresses on a bridge network: each held by one instance until it is deleted.
_ADDRESSES = """
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL UNIQUE
)
"""


def _image_meta_v1(old: dict[str, Any], wire: dict[str, Any]) -> str:
    # "dir" named the image's folder by absolute path; it now follows from the data dir and id.
    keep = {k: v for k, v in old.items() if k in ImageMeta.model_fields and k != "artifact"}
    keep.setdefault("provider", "qemu")
    keep.setdefault("digest", "")
    return ImageMeta.model_validate(keep).model_dump_json()


def _instance_meta_v1(old: dict[str, Any], wire: dict[str, Any]) -> str:
    spec: dict[str, Any] = dict(old.get("spec") or {})
    # The spec named the image's kernel and initrd by path; it now names the image.
    spec = {k: v for k, v in spec.items() if k in LaunchSpec.model_fields and k not in ("image_id", "artifact")}
    spec["image_id"] = wire.get("ImageId", "")
    spec.setdefault("memory_mb", 128)
    meta = {k: v for k, v in old.items() if k in InstanceMeta.model_fields and k != "spec"}
    meta.setdefault("provider", "qemu")
    return InstanceMeta.model_validate({**meta, "spec": spec}).model_dump_json()


def _volume_meta_v1(old: dict[str, Any], wire: dict[str, Any]) -> str:
    # "path" named the disk by absolute path; it now follows from the data dir and id.
    keep = {k: v for k, v in old.items() if k in VolumeMeta.model_fields}
    keep.setdefault("provider", "qemu")
    keep.setdefault("fs_type", "raw")
    return VolumeMeta.model_validate(keep).model_dump_json()


_V1_META: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]] = {
    "images": _image_meta_v1,
    "instances": _instance_meta_v1,
    "volumes": _volume_meta_v1,
}


def _to_v1(db: sqlite3.Connection) -> None:
    for table in TABLES:
        rows = db.execute(f"SELECT id, name, wire, internal FROM {table} ORDER BY rowid").fetchall()
        db.execute(f"ALTER TABLE {table} RENAME TO {table}_v0")
        db.execute(_TABLE.format(table=table))
        for row in rows:
            meta = _V1_META[table](json.loads(row["internal"] or "{}"), json.loads(row["wire"]))
            db.execute(
                f"INSERT INTO {table} (id, name, wire, meta) VALUES (?, ?, ?, ?)",
                (row["id"], row["name"], row["wire"], meta),
            )
        db.execute(f"DROP TABLE {table}_v0")


def _to_v2(db: sqlite3.Connection) -> None:
    for row in db.execute("SELECT id, wire, meta FROM images").fetchall():
        if ImageMeta.model_validate_json(row["meta"]).artifact.format != KERNEL_INITRD:
            continue
        wire = json.loads(row["wire"])
        wire.setdefault("StageSpec", {})["DiskFormats"] = list(DISK_FORMATS)
        db.execute("UPDATE images SET wire = ? WHERE id = ?", (json.dumps(wire), row["id"]))


# Index i brings version i to i + 1.
_STEPS: list[Callable[[sqlite3.Connection], None]] = [_to_v1, _to_v2]
VERSION = len(_STEPS)


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the store to VERSION inside the caller's transaction (all steps or none)."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > VERSION:
        raise RuntimeError(
            f"{path} has schema version {version}, newer than this daemon's {VERSION}: upgrade unik to open it"
        )
    fresh = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images'").fetchone() is None
    if fresh:
        for table in TABLES:
            db.execute(_TABLE.format(table=table))
    else:
        for step in range(version, VERSION):
            log.info("upgrading the store %s from schema version %d to %d", path, step, step + 1)
            _STEPS[step](db)
    db.execute(_ADDRESSES)
    db.execute(f"PRAGMA user_version = {VERSION}")
