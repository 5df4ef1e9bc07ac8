"""A table of one resource kind: rows of (id, unique name, wire JSON, typed metadata JSON).

The wire object is what the API returns; the metadata (models.records) is what only the
daemon needs. Names are unique per kind, enforced by the database, so concurrent writers get
exactly one winner.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from pydantic import BaseModel

from unik.errors import Conflict, NotFound
from unik.models import Image, ImageMeta, Instance, InstanceMeta, Volume, VolumeMeta

if TYPE_CHECKING:
    from unik.store import Store

M = TypeVar("M", Image, Instance, Volume)
D = TypeVar("D", ImageMeta, InstanceMeta, VolumeMeta)
# Wire texts remembered per table: a few times the records a daemon holds; past it, start over.
_CANONICAL_CACHE = 4096


@dataclass
class Record(Generic[M, D]):
    obj: M
    meta: D

    @property
    def id(self) -> str:
        return self.obj.Id

    @property
    def name(self) -> str:
        return self.obj.Name


class Table(Generic[M, D]):
    def __init__(self, store: Store, table: str, model: type[M], meta_model: type[D], kind: str) -> None:
        self._store = store
        self._table = table
        self._model = model
        self._meta_model = meta_model
        self.kind = kind
        self._canonical: dict[str, bytes] = {}

    def _record(self, row: sqlite3.Row) -> Record[M, D]:
        return Record(self._model.model_validate_json(row["wire"]), self._meta_model.model_validate_json(row["meta"]))

    def insert(self, record: Record[M, D], *, replace_name: bool = False) -> Record[M, D] | None:
        """Insert; a taken name is a Conflict unless replace_name, which returns the replaced record."""
        with self._store.transaction() as db:
            old = db.execute(f"SELECT * FROM {self._table} WHERE name = ?", (record.name,)).fetchone()
            if old is not None:
                if not replace_name:
                    raise Conflict(f"{self.kind} {record.name!r} already exists")
                db.execute(f"DELETE FROM {self._table} WHERE id = ?", (old["id"],))
            db.execute(
                f"INSERT INTO {self._table} (id, name, wire, meta) VALUES (?, ?, ?, ?)",
                (record.id, record.name, _dump(record.obj), _dump(record.meta)),
            )
            return self._record(old) if old is not None else None

    def update(self, record: Record[M, D]) -> None:
        with self._store.transaction() as db:
            cur = db.execute(
                f"UPDATE {self._table} SET wire = ?, meta = ? WHERE id = ?",
                (_dump(record.obj), _dump(record.meta), record.id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"{self.kind} {record.name!r} not found")

    def delete(self, record_id: str) -> None:
        with self._store.transaction() as db:
            db.execute(f"DELETE FROM {self._table} WHERE id = ?", (record_id,))

    def all(self) -> list[Record[M, D]]:
        rows = self._store.query(f"SELECT * FROM {self._table} ORDER BY rowid")
        return [self._record(r) for r in rows]

    def in_state(self, state: str) -> list[Record[M, D]]:
        """Records whose wire `State` is `state`; the others are filtered by SQLite, not parsed."""
        rows = self._store.query(
            f"SELECT * FROM {self._table} WHERE json_extract(wire, '$.State') = ? ORDER BY rowid", (state,)
        )
        return [self._record(r) for r in rows]

    def all_wire_json(self) -> bytes:
        """Every record's wire object as one JSON array, for routes that return them unchanged.

        Parsing each row into a model (and its metadata) only for FastAPI to validate and
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

    def get(self, record_id: str) -> Record[M, D] | None:
        rows = self._store.query(f"SELECT * FROM {self._table} WHERE id = ?", (record_id,))
        return self._record(rows[0]) if rows else None

    def has_name(self, name: str) -> bool:
        return bool(self._store.query(f"SELECT 1 FROM {self._table} WHERE name = ?", (name,)))

    def find(self, ref: str) -> Record[M, D]:
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
            rows = self._store.query(f"SELECT * FROM {self._table} WHERE substr(id, 1, ?) = ? LIMIT 2", (len(ref), ref))
            if len(rows) == 1:
                return rows[0]
            if len(rows) > 1:
                raise Conflict(f"{self.kind} id prefix {ref!r} is ambiguous")
        raise NotFound(f"{self.kind} {ref!r} not found")


def _dump(obj: BaseModel) -> str:
    return obj.model_dump_json()
