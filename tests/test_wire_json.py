"""The read routes serve the stored wire JSON: the same objects the models would give, rows written
by an older daemon included, and never a stale copy after a change."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import image_meta, instance_meta, services_of
from unik.models import Image, Instance, InstanceState, now_rfc3339
from unik.store import Record, Store


def instance(name: str, state: InstanceState = InstanceState.stopped) -> Instance:
    return Instance(
        Id=uuid.uuid4().hex,
        Name=name,
        State=state.value,
        ImageId="i" * 32,
        Infrastructure="QEMU",
        Created=now_rfc3339(),
    )


def test_lists_and_lookups_match_the_models(api: TestClient) -> None:
    store = services_of(api).ctx.store
    records = [instance(f"vm{n}") for n in range(3)]
    for obj in records:
        store.instances.insert(Record(obj, instance_meta()))
    listed = api.get("/instances")
    assert listed.status_code == 200
    assert listed.headers["content-type"] == "application/json"
    assert listed.json() == [obj.model_dump(mode="json") for obj in records]
    one = api.get(f"/instances/{records[1].Id[:12]}")
    assert one.json() == records[1].model_dump(mode="json")
    assert api.get("/instances/nope").status_code == 404


def test_a_changed_record_is_served_changed(api: TestClient) -> None:
    store = services_of(api).ctx.store
    obj = instance("vm")
    store.instances.insert(Record(obj, instance_meta()))
    assert api.get("/instances/vm").json()["State"] == "stopped"
    obj.State = InstanceState.running.value
    store.instances.update(Record(obj, instance_meta()))
    assert api.get("/instances/vm").json()["State"] == "running"
    assert api.get("/instances").json()[0]["State"] == "running"


def test_rows_of_an_older_daemon_gain_the_new_fields(data_dir: Path) -> None:
    from unik.daemon import build_app

    store = Store(data_dir / "unik.db")
    image = Image(Id="a" * 32, Name="old", SizeMb=1, Infrastructure="QEMU", Created=now_rfc3339())
    store.images.insert(Record(image, image_meta()))
    wire = json.loads(image.model_dump_json())
    del wire["RunSpec"]  # as if written before the field existed
    with store.transaction() as db:
        db.execute("UPDATE images SET wire = ? WHERE id = ?", (json.dumps(wire), image.Id))
    store.close()
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        assert api.get("/images/old").json() == image.model_dump(mode="json")
        assert api.get("/images").json() == [image.model_dump(mode="json")]


def test_in_state_parses_only_the_matching_rows(api: TestClient) -> None:
    store = services_of(api).ctx.store
    running = instance("up", InstanceState.running)
    store.instances.insert(Record(running, instance_meta()))
    store.instances.insert(Record(instance("down"), instance_meta()))
    assert [r.id for r in store.instances.in_state(InstanceState.running.value)] == [running.Id]
