"""unik.store.Store: the daemon's SQLite records, and the name rule they obey."""

from __future__ import annotations

import re
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unik.errors import Conflict, NotFound
from unik.models import (
    Image,
    ImageMeta,
    Instance,
    InstanceMeta,
    LaunchSpec,
    Volume,
    VolumeMeta,
    is_valid_name,
    now_rfc3339,
)
from unik.store import Record, Store, Table

# -- helpers --------------------------------------------------------------------------------


def image(name: str, id_: str | None = None, size: int = 10) -> Record[Any, Any]:
    return Record(
        Image(Id=id_ or uuid.uuid4().hex, Name=name, SizeMb=size, Infrastructure="QEMU", Created=now_rfc3339()),
        ImageMeta(provider="qemu", digest=f"sha256:{name}"),
    )


def instance(name: str, id_: str | None = None, size: int = 10) -> Record[Any, Any]:
    state = "running" if size % 2 else "stopped"
    return Record(
        Instance(
            Id=id_ or uuid.uuid4().hex,
            Name=name,
            State=state,
            ImageId="img",
            Infrastructure="QEMU",
            Created=now_rfc3339(),
        ),
        InstanceMeta(provider="qemu", spec=LaunchSpec(image_id="img", memory_mb=size)),
    )


def volume(name: str, id_: str | None = None, size: int = 10) -> Record[Any, Any]:
    return Record(
        Volume(Id=id_ or uuid.uuid4().hex, Name=name, SizeMb=size, Infrastructure="QEMU", Created=now_rfc3339()),
        VolumeMeta(provider="qemu", fs_type="ext2", mount=f"/{name}"),
    )


Factory = Callable[..., Record[Any, Any]]
KINDS: dict[str, Factory] = {"images": image, "instances": instance, "volumes": volume}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "unik.db")
    yield s
    s.close()


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest, store: Store) -> tuple[Table[Any, Any], Factory]:
    return getattr(store, request.param), KINDS[request.param]


def ids(table: Table[Any, Any]) -> list[str]:
    return [r.id for r in table.all()]


# -- CRUD per table -------------------------------------------------------------------------


def test_a_new_store_is_empty(store: Store) -> None:
    assert store.images.all() == []
    assert store.instances.all() == []
    assert store.volumes.all() == []


def test_insert_get_and_list_round_trip(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    first, second = make("first", "id-1"), make("second", "id-2", size=11)

    assert table.insert(first) is None
    assert table.insert(second) is None

    got = table.get("id-1")
    assert got is not None
    assert got.obj == first.obj
    assert got.meta == first.meta
    assert [r.obj for r in table.all()] == [first.obj, second.obj]  # insertion order
    assert table.get("id-3") is None
    assert table.has_name("second")
    assert not table.has_name("third")


def test_tables_are_separate(store: Store) -> None:
    store.images.insert(image("same", "id-1"))
    store.volumes.insert(volume("same", "id-1"))  # same name and id in another kind: fine

    assert ids(store.images) == ["id-1"]
    assert ids(store.volumes) == ["id-1"]
    assert store.instances.all() == []


def test_update_replaces_wire_and_meta(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("x", "id-1"))
    changed = make("x", "id-1", size=99)
    changed.meta = changed.meta.model_copy(update={"provider": "elsewhere"})

    table.update(changed)

    got = table.get("id-1")
    assert got is not None
    assert got.obj == changed.obj
    assert got.meta == changed.meta


def test_update_of_an_unknown_record_is_not_found(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    with pytest.raises(NotFound) as info:
        table.update(make("ghost", "nope"))
    assert "ghost" in info.value.message
    assert table.all() == []


def test_delete_removes_only_that_record(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("a", "id-a"))
    table.insert(make("b", "id-b"))

    table.delete("id-a")
    table.delete("id-unknown")  # deleting what is not there is a no-op

    assert ids(table) == ["id-b"]
    assert not table.has_name("a")
    table.insert(make("a", "id-a2"))  # the name is free again
    assert table.find("a").id == "id-a2"


# -- names ----------------------------------------------------------------------------------


def test_a_taken_name_is_a_conflict(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("app", "id-1"))

    with pytest.raises(Conflict) as info:
        table.insert(make("app", "id-2"))

    assert "'app'" in info.value.message
    assert table.kind in info.value.message
    assert ids(table) == ["id-1"]


def test_names_are_case_sensitive(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("app", "id-1"))
    table.insert(make("App", "id-2"))
    assert table.find("App").id == "id-2"


def test_replace_name_returns_the_replaced_record(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    old = make("app", "id-old")
    table.insert(old)
    table.insert(make("other", "id-other"))

    replaced = table.insert(make("app", "id-new", size=21), replace_name=True)

    assert replaced is not None
    assert replaced.id == "id-old"
    assert replaced.obj == old.obj
    assert replaced.meta == old.meta
    assert table.get("id-old") is None
    assert table.find("app").id == "id-new"
    assert sorted(ids(table)) == ["id-new", "id-other"]


def test_replace_name_without_an_old_record_returns_none(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    assert table.insert(make("app", "id-1"), replace_name=True) is None
    assert ids(table) == ["id-1"]


def test_a_duplicate_id_is_refused_and_nothing_changes(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("a", "id-1"))
    with pytest.raises((sqlite3.IntegrityError, Conflict)):
        table.insert(make("b", "id-1"))
    assert [r.name for r in table.all()] == ["a"]


def test_concurrent_inserts_of_one_name_have_exactly_one_winner(store: Store) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.images.insert(image("race", f"id-{i}"))
            outcomes.append("won")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    assert len(store.images.all()) == 1


# -- find -----------------------------------------------------------------------------------


@pytest.fixture
def found(kind: tuple[Table[Any, Any], Factory]) -> Table[Any, Any]:
    table, make = kind
    table.insert(make("web", "abc123"))
    table.insert(make("db", "abd456"))
    table.insert(make("abc", "fff000"))  # a name that is also a prefix of another record's id
    return table


def test_find_by_exact_id(found: Table[Any, Any]) -> None:
    assert found.find("abd456").name == "db"


def test_find_by_exact_name(found: Table[Any, Any]) -> None:
    assert found.find("web").id == "abc123"


def test_an_exact_name_wins_over_an_id_prefix(found: Table[Any, Any]) -> None:
    assert found.find("abc").id == "fff000"


def test_an_exact_id_wins_over_an_exact_name(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("zzz", "target"))
    table.insert(make("target", "other-id"))
    assert table.find("target").id == "target"


@pytest.mark.parametrize(("ref", "name"), [("abc1", "web"), ("abd", "db"), ("f", "abc"), ("fff00", "abc")])
def test_find_by_unique_id_prefix(found: Table[Any, Any], ref: str, name: str) -> None:
    assert found.find(ref).name == name


@pytest.mark.parametrize("ref", ["a", "ab"])
def test_an_ambiguous_prefix_is_a_conflict(found: Table[Any, Any], ref: str) -> None:
    with pytest.raises(Conflict) as info:
        found.find(ref)
    assert "ambiguous" in info.value.message
    assert repr(ref) in info.value.message


@pytest.mark.parametrize("ref", ["nope", "abc1234", "zz", "", "123", "bc123", "e", "eb", "b", "WEB"])
def test_unknown_refs_are_not_found(found: Table[Any, Any], ref: str) -> None:
    with pytest.raises(NotFound) as info:
        found.find(ref)
    assert repr(ref) in info.value.message
    assert found.kind in info.value.message


def test_a_substring_of_a_name_never_matches(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("my-web-server", "0123"))
    for ref in ("my-web", "web", "server", "web-server", "my-web-serve"):
        with pytest.raises(NotFound):
            table.find(ref)


@pytest.mark.parametrize("ref", ["%", "_", "%1", "_b", "a%", "a_", "\\", "a\\"])
def test_like_wildcards_in_a_ref_are_literal(kind: tuple[Table[Any, Any], Factory], ref: str) -> None:
    table, make = kind
    table.insert(make("one", "ab1"))
    with pytest.raises(NotFound):
        table.find(ref)


def test_underscore_and_percent_prefixes_match_only_themselves(kind: tuple[Table[Any, Any], Factory]) -> None:
    table, make = kind
    table.insert(make("one", "a_1"))
    table.insert(make("two", "ax2"))
    table.insert(make("three", "b%3"))
    table.insert(make("four", "bx4"))
    table.insert(make("five", "c\\5"))
    table.insert(make("six", "cx6"))

    assert table.find("a_").name == "one"
    assert table.find("b%").name == "three"
    assert table.find("c\\").name == "five"


# -- transactions and durability ------------------------------------------------------------


def test_a_failing_transaction_rolls_back(store: Store) -> None:
    store.images.insert(image("kept", "id-kept"))

    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("DELETE FROM images")
        v = volume("v", "v")
        db.execute(
            "INSERT INTO volumes (id, name, wire, meta) VALUES (?, ?, ?, ?)",
            ("v", "v", v.obj.model_dump_json(), v.meta.model_dump_json()),
        )
        raise RuntimeError("boom")

    assert ids(store.images) == ["id-kept"]
    assert store.volumes.all() == []
    # The store still works after the rollback.
    store.images.insert(image("next", "id-next"))
    assert ids(store.images) == ["id-kept", "id-next"]


def test_a_conflict_leaves_no_transaction_open(store: Store) -> None:
    store.images.insert(image("a", "id-1"))
    with pytest.raises(Conflict):
        store.images.insert(image("a", "id-2"))
    with store.transaction():  # BEGIN IMMEDIATE would fail inside a dangling transaction
        pass
    store.images.insert(image("b", "id-3"))
    assert ids(store.images) == ["id-1", "id-3"]


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "unik.db"
    first = Store(path)
    img, inst, vol = image("img", "i1"), instance("inst", "n1"), volume("vol", "v1")
    first.images.insert(img)
    first.instances.insert(inst)
    first.volumes.insert(vol)
    first.volumes.delete("v1")
    first.volumes.insert(volume("vol2", "v2"))
    first.close()

    second = Store(path)
    try:
        assert [r.obj for r in second.images.all()] == [img.obj]
        assert [r.obj for r in second.instances.all()] == [inst.obj]
        assert [r.name for r in second.volumes.all()] == ["vol2"]
        got = second.images.find("img")
        assert got.meta == img.meta
        assert second.images.get("i1") is not None
        mode = second.query("PRAGMA journal_mode")[0][0]
        assert mode.lower() == "wal"
    finally:
        second.close()


def test_a_second_store_on_the_same_file_sees_committed_writes(tmp_path: Path) -> None:
    path = tmp_path / "unik.db"
    writer, reader = Store(path), Store(path)
    try:
        writer.images.insert(image("shared", "s1"))
        assert reader.images.find("shared").id == "s1"
        with pytest.raises(Conflict):
            reader.images.insert(image("shared", "s2"))
    finally:
        writer.close()
        reader.close()


# -- name rule (API.md: 1-64 characters of [A-Za-z0-9][A-Za-z0-9_.-]*) ----------------------

API_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_CHARS = "abcXYZ019_.-"


def spec_says_valid(name: str) -> bool:
    return 1 <= len(name) <= 64 and API_NAME.fullmatch(name) is not None


@given(st.text(max_size=80))
def test_is_valid_name_matches_the_api_rule_on_any_text(name: str) -> None:
    assert is_valid_name(name) == spec_says_valid(name)


@given(st.text(alphabet=NAME_CHARS + " /\n\t\x00é٣", max_size=70))
def test_is_valid_name_matches_the_api_rule_near_the_boundary(name: str) -> None:
    assert is_valid_name(name) == spec_says_valid(name)


@given(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"))
def test_every_name_the_rule_allows_is_valid(name: str) -> None:
    assert is_valid_name(name)


@given(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"), st.sampled_from(["\n", " ", "/", "é", "\x00"]))
def test_a_trailing_stray_character_makes_a_name_invalid(name: str, extra: str) -> None:
    assert not is_valid_name(name + extra)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("a", True),
        ("A" * 64, True),
        ("A" * 65, False),
        ("", False),
        ("my-app_1.0", True),
        ("9lives", True),
        ("-x", False),
        ("_x", False),
        (".x", False),
        ("..", False),
        ("a b", False),
        ("a/b", False),
        ("app\n", False),
        ("١٢٣", False),  # Arabic-Indic digits are not [0-9]
        ("ǅx", False),
    ],
)
def test_is_valid_name_examples(name: str, valid: bool) -> None:
    assert is_valid_name(name) is valid


def test_an_id_prefix_is_case_sensitive(found: Table[Any, Any]) -> None:
    with pytest.raises(NotFound):
        found.find("ABC1")
