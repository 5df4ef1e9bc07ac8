"""SQLite (WAL) state: the only code that writes the daemon's records (store.tables holds the
per-kind tables, store.migrations brings older data dirs up to the current schema)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unik.errors import Conflict, NotFound
from unik.models import Image, ImageMeta, Instance, InstanceMeta, Volume, VolumeMeta
from unik.store.migrations import migrate
from unik.store.tables import Record, Table

__all__ = ["Record", "Store", "Table"]


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared under a lock: statements take microseconds, and one writer
        # at a time is what SQLite does anyway.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self.images: Table[Image, ImageMeta] = Table(self, "images", Image, ImageMeta, "image")
        self.instances: Table[Instance, InstanceMeta] = Table(self, "instances", Instance, InstanceMeta, "instance")
        self.volumes: Table[Volume, VolumeMeta] = Table(self, "volumes", Volume, VolumeMeta, "volume")
        with self.transaction() as db:
            migrate(db, path)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    def set_volume_attachment(self, volume_id: str, instance_id: str, mount: str | None, *, expect: str) -> bool:
        """Attach (or detach, with instance_id "") only if the attachment is still `expect`:
        two instances racing for one volume get exactly one winner."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM volumes WHERE id = ?", (volume_id,)).fetchone()
            if row is None:
                raise NotFound(f"volume {volume_id!r} not found")
            volume = Volume.model_validate_json(row["wire"])
            if volume.Attachment != expect:
                return False
            volume.Attachment = instance_id
            meta = VolumeMeta.model_validate_json(row["meta"]).model_copy(update={"mount": mount})
            db.execute(
                "UPDATE volumes SET wire = ?, meta = ? WHERE id = ?",
                (volume.model_dump_json(), meta.model_dump_json(), volume_id),
            )
            return True

    def allocate_address(self, instance_id: str, candidates: Iterable[str]) -> str:
        """The instance's address: the one it already holds, else the first candidate nobody holds.

        One transaction, and the address is the primary key: two daemons or two requests
        can never hand out the same one.
        """
        with self.transaction() as db:
            row = db.execute("SELECT address FROM addresses WHERE instance_id = ?", (instance_id,)).fetchone()
            if row is not None:
                return str(row["address"])
            taken = {r["address"] for r in db.execute("SELECT address FROM addresses")}
            for address in candidates:
                if address not in taken:
                    db.execute("INSERT INTO addresses (address, instance_id) VALUES (?, ?)", (address, instance_id))
                    return address
        raise Conflict("no free address left in the instance subnet")

    def release_address(self, instance_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM addresses WHERE instance_id = ?", (instance_id,))

    def release_unheld_addresses(self) -> None:
        """Frees the addresses of instances no record names (a record lost to a crash or a restore)."""
        with self.transaction() as db:
            db.execute("DELETE FROM addresses WHERE instance_id NOT IN (SELECT id FROM instances)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
