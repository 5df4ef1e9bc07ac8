"""SQLite (WAL) state: the only code that writes the daemon's records.

Each table holds one resource kind: the wire object as JSON (what the API returns) and
an `internal` JSON column for what only the daemon needs (file paths, run config, digests).
Names are unique per kind, enforced by the database, so concurrent writers get exactly one
winner.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from unik.errors import Conflict, NotFound
from unik.models import Image, Instance, Volume

M = TypeVar("M", Image, Instance, Volume)
# Wire texts remembered per table: a few times the records a daemon holds; past it, start over.
_CANONICAL_CACHE = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    wire TEXT NOT NULL,
    internal TEXT NOT NULL DEFAULT '{{}}'
);
"""

# Instance addresses on a bridge network: each held by one instance until it is deleted.
_ADDRESSES_SCHEMA = """
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL UNIQUE
);
"""


@dataclass
class Record(Generic[M]):
    obj: M
    internal: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.obj.Id

    @property
    def name(self) -> str:
        return self.obj.Name


class Table(Generic[M]):
    def __init__(self, store: Store, table: str, model: type[M], kind: str) -> None:
        self._store = store
        self._table = table
        self._model = model
        self.kind = kind
        self._canonical: dict[str, bytes] = {}

    def _record(self, row: sqlite3.Row) -> Record[M]:
        return Record(self._model.model_validate_json(row["wire"]), json.loads(row["internal"]))

    def insert(self, record: Record[M], *, replace_name: bool = False) -> Record[M] | None:
        """Insert; a taken name is a Conflict unless replace_name, which returns the replaced record."""
        with self._store.transaction() as db:
            old = db.execute(f"SELECT * FROM {self._table} WHERE name = ?", (record.name,)).fetchone()
            if old is not None:
                if not replace_name:
                    raise Conflict(f"{self.kind} {record.name!r} already exists")
                db.execute(f"DELETE FROM {self._table} WHERE id = ?", (old["id"],))
            db.execute(
                f"INSERT INTO {self._table} (id, name, wire, internal) VALUES (?, ?, ?, ?)",
                (record.id, record.name, _dump(record.obj), json.dumps(record.internal)),
            )
            return self._record(old) if old is not None else None

    def update(self, record: Record[M]) -> None:
        with self._store.transaction() as db:
            cur = db.execute(
                f"UPDATE {self._table} SET wire = ?, internal = ? WHERE id = ?",
                (_dump(record.obj), json.dumps(record.internal), record.id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"{self.kind} {record.name!r} not found")

    def delete(self, record_id: str) -> None:
        with self._store.transaction() as db:
            db.execute(f"DELETE FROM {self._table} WHERE id = ?", (record_id,))

    def all(self) -> list[Record[M]]:
        rows = self._store.query(f"SELECT * FROM {self._table} ORDER BY rowid")
        return [self._record(r) for r in rows]

    def in_state(self, state: str) -> list[Record[M]]:
        """Records whose wire `State` is `state`; the others are filtered by SQLite, not parsed."""
        rows = self._store.query(
            f"SELECT * FROM {self._table} WHERE json_extract(wire, '$.State') = ? ORDER BY rowid", (state,)
        )
        return [self._record(r) for r in rows]

    def all_wire_json(self) -> bytes:
        """Every record's wire object as one JSON array, for routes that return them unchanged.

        Parsing each row into a model (and its internal JSON) only for FastAPI to validate and
        serialize it again was most of a list request's time."""
        rows = self._store.query(f"SELECT wire FROM {self._table} ORDER BY rowid")
        return b"[" + b",".join(self._canonical_wire(r["wire"]) for r in rows) + b"]"

    def _canonical_wire(self, wire: str) -> bytes:
        """The stored text as the current model writes it (a row from an older daemon gains the
        fields added since), memoised by the text itself: rows are listed far more often than
        they change, and a changed row is a new key."""
        cached = self._canonical.get(wire)
        if cached is None:
            if len(self._canonical) >= _CANONICAL_CACHE:
                self._canonical.clear()
            cached = self._model.model_validate_json(wire).model_dump_json().encode()
            self._canonical[wire] = cached
        return cached

    def get(self, record_id: str) -> Record[M] | None:
        rows = self._store.query(f"SELECT * FROM {self._table} WHERE id = ?", (record_id,))
        return self._record(rows[0]) if rows else None

    def has_name(self, name: str) -> bool:
        return bool(self._store.query(f"SELECT 1 FROM {self._table} WHERE name = ?", (name,)))

    def find(self, ref: str) -> Record[M]:
        """Exact id, exact name, or an unambiguous id prefix (like Docker); never a substring."""
        return self._record(self._find_row(ref))

    def find_wire_json(self, ref: str) -> bytes:
        """find(), as the stored wire JSON (for routes that return the object unchanged)."""
        return self._canonical_wire(self._find_row(ref)["wire"])

    def _find_row(self, ref: str) -> sqlite3.Row:
        rows = self._store.query(
            f"SELECT * FROM {self._table} WHERE id = ? OR name = ? ORDER BY id = ? DESC", (ref, ref, ref)
        )
        if rows:
            return rows[0]
        if ref:
            # substr, not LIKE: a prefix match must be exact and case-sensitive.
            rows = self._store.query(
                f"SELECT * FROM {self._table} WHERE substr(id, 1, ?) = ? LIMIT 2", (len(ref), ref)
            )
            if len(rows) == 1:
                return rows[0]
            if len(rows) > 1:
                raise Conflict(f"{self.kind} id prefix {ref!r} is ambiguous")
        raise NotFound(f"{self.kind} {ref!r} not found")


def _dump(obj: BaseModel) -> str:
    return obj.model_dump_json()


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
        self.images: Table[Image] = Table(self, "images", Image, "image")
        self.instances: Table[Instance] = Table(self, "instances", Instance, "instance")
        self.volumes: Table[Volume] = Table(self, "volumes", Volume, "volume")
        with self.transaction() as db:
            for table in ("images", "instances", "volumes"):
                db.execute(_SCHEMA.format(table=table))
            db.execute(_ADDRESSES_SCHEMA)

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
            internal = json.loads(row["internal"])
            internal["mount"] = mount
            db.execute(
                "UPDATE volumes SET wire = ?, internal = ? WHERE id = ?",
                (_dump(volume), json.dumps(internal), volume_id),
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
