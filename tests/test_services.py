"""The services' rules with the in-memory fake provider: lifecycle, conflicts, cleanup of
failed runs, the monitor and recovery after a restart, all in milliseconds and without a VM.
The same rules are proven with real VMs by the end-to-end tests; these pin them cheaply."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import hello_tgz, instance_meta, services_of  # noqa: F401 - hello_tgz is a fixture
from unik.daemon import build_app
from unik.models import Instance, InstanceState, now_rfc3339
from unik.providers import registry
from unik.providers.fake import FAKE_KIND, FakeProvider
from unik.store import Record

WAIT = 10.0


@pytest.fixture(autouse=True)
def fake_kind() -> Iterator[None]:
    registry.register(FAKE_KIND)
    yield
    registry.unregister(FAKE_KIND.kind)


@contextmanager
def fake_daemon(data_dir: Path, settings: str = "{}") -> Iterator[TestClient]:
    (data_dir / "daemon-config.yaml").write_text(f"providers:\n  fake:\n    - {settings}\n")
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as client:
        yield client


def fake_of(api: TestClient) -> FakeProvider:
    provider = services_of(api).ctx.providers["fake"]
    assert isinstance(provider, FakeProvider)
    return provider


def build_hello(api: TestClient, tgz: bytes, name: str = "hello") -> dict[str, object]:
    built = api.post(f"/images/{name}/create?base=linux&lang=c&provider=fake",
                     files={"tarfile": ("app.tar.gz", tgz, "application/gzip")})  # fmt: skip
    assert built.status_code == 201, built.text
    body: dict[str, object] = built.json()
    return body


def eventually(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def state_of(api: TestClient, name: str) -> str:
    state: str = api.get(f"/instances/{name}").json()["State"]
    return state


def test_run_stop_start_delete_reach_the_provider_with_the_runs_configuration(
    data_dir: Path,
    hello_tgz: bytes,  # noqa: F811
) -> None:
    with fake_daemon(data_dir) as api:
        build_hello(api, hello_tgz)
        assert api.post("/volumes/data?size=4").status_code == 201
        ran = api.post("/instances/run", json={"InstanceName": "a", "ImageName": "hello",
                                               "Env": {"K": "v"}, "Mounts": {"/data": "data"}})  # fmt: skip
        assert ran.status_code == 201, ran.text
        fake = fake_of(api)
        instance_id = ran.json()["Id"]
        vm = fake.vms[instance_id]
        assert vm.spec.env == {"K": "v"} and [v.mount for v in vm.volumes.values()] == ["/data"]
        assert api.get("/volumes/data").json()["Attachment"] == instance_id
        assert "env=[('K', 'v')] mounts=['/data']" in api.get("/instances/a/logs").text

        assert api.post("/instances/a/stop").json()["State"] == "stopped"
        assert api.post("/instances/a/start").json()["State"] == "running"
        assert fake.vms[instance_id].spec.env == {"K": "v"}  # the same configuration again
        assert [call for call, _ in fake.calls] == ["launch", "stop", "launch"]

        assert api.delete("/instances/a").status_code == 409  # running: force needed
        assert api.delete("/instances/a?force=true").status_code == 204
        assert instance_id not in fake.instance_ids()
        assert api.get("/volumes/data").json()["Attachment"] == ""  # the volume stays, detached
        assert api.get("/instances").json() == []


def test_a_failed_launch_leaves_no_record_no_files_and_no_claimed_volume(
    data_dir: Path,
    hello_tgz: bytes,  # noqa: F811
) -> None:
    with fake_daemon(data_dir, "{fail_launch: 'the host is full'}") as api:
        build_hello(api, hello_tgz)
        api.post("/volumes/data?size=4")
        ran = api.post("/instances/run", json={"InstanceName": "a", "ImageName": "hello", "Mounts": {"/data": "data"}})
        assert ran.status_code == 409 and "the host is full" in ran.json()["message"]
        assert api.get("/instances").json() == []
        assert fake_of(api).instance_ids() == set()
        assert api.get("/volumes/data").json()["Attachment"] == ""
        assert ("remove", fake_of(api).calls[0][1]) in fake_of(api).calls


def test_names_and_resources_in_use_are_conflicts(data_dir: Path, hello_tgz: bytes) -> None:  # noqa: F811
    with fake_daemon(data_dir) as api:
        build_hello(api, hello_tgz)
        api.post("/volumes/data?size=4")
        assert api.post("/instances/run", json={"InstanceName": "a", "ImageName": "hello"}).status_code == 201
        again = api.post("/instances/run", json={"InstanceName": "a", "ImageName": "hello"})
        assert again.status_code == 409 and len(api.get("/instances").json()) == 1
        assert api.post("/volumes/data/attach/a?mount=/data").status_code == 202
        mounting = {"InstanceName": "b", "ImageName": "hello", "Mounts": {"/data": "data"}}
        taken = api.post("/instances/run", json=mounting)
        assert taken.status_code in (400, 409) and "data" in taken.json()["message"]
        assert api.delete("/volumes/data").status_code == 409  # attached
        assert api.delete("/images/hello").status_code == 409  # an instance uses it
        assert api.post("/images/hello/create?base=linux&lang=c&provider=fake",
                        files={"tarfile": ("app.tar.gz", hello_tgz)}).status_code == 409  # fmt: skip
        assert [i["Name"] for i in api.get("/instances").json()] == ["a"]
        assert len(api.get("/images").json()) == 1


def test_the_monitor_marks_an_instance_whose_app_exited_stopped(data_dir: Path, hello_tgz: bytes) -> None:  # noqa: F811
    with fake_daemon(data_dir) as api:
        build_hello(api, hello_tgz)
        instance_id = api.post("/instances/run", json={"InstanceName": "a", "ImageName": "hello"}).json()["Id"]
        fake_of(api).exit(instance_id)
        assert eventually(lambda: state_of(api, "a") == "stopped")
        assert api.post("/instances/a/start").json()["State"] == "running"


def test_a_restart_recovers_ended_vms_half_made_runs_and_strays(data_dir: Path, hello_tgz: bytes) -> None:  # noqa: F811
    with fake_daemon(data_dir) as api:
        image = build_hello(api, hello_tgz)
        ran = api.post("/instances/run", json={"InstanceName": "ended", "ImageName": "hello"})
        assert ran.status_code == 201
        store = services_of(api).ctx.store
        # The daemon dies while creating "half": its record is pending and never booted.
        half = Instance(Id=uuid.uuid4().hex, Name="half", State=InstanceState.pending.value, IpAddress="",
                        ImageId=str(image["Id"]), Infrastructure="QEMU", Created=now_rfc3339())  # fmt: skip
        store.instances.insert(Record(half, instance_meta(str(image["Id"]), provider="fake", booted=False)))
        stray_vm = data_dir / "fake" / "instances" / uuid.uuid4().hex
        stray_vm.mkdir(parents=True)
        stray_image = data_dir / "images" / uuid.uuid4().hex
        stray_image.mkdir(parents=True)

    # The fake's VMs live in memory: a new daemon finds the one of "ended" gone.
    with fake_daemon(data_dir) as api:
        assert [(i["Name"], i["State"]) for i in api.get("/instances").json()] == [("ended", "stopped")]
        assert not stray_image.exists()
        assert eventually(lambda: not stray_vm.exists())
        assert api.post("/instances/ended/start").json()["State"] == "running"


def test_what_the_provider_cannot_do_is_a_501_that_leaves_nothing(
    data_dir: Path,
    hello_tgz: bytes,  # noqa: F811
) -> None:
    with fake_daemon(data_dir, "{capabilities: []}") as api:
        build_hello(api, hello_tgz)
        for extra, says in (
            ({"Ports": [{"HostPort": 18123, "GuestPort": 80}]}, "publish host ports"),
            ({"DebugMode": True}, "debugger"),
            ({"WarmStart": True}, "start instances warm"),
        ):
            refused = api.post("/instances/run", json={"InstanceName": "x", "ImageName": "hello", **extra})
            assert refused.status_code == 501 and says in refused.json()["message"], refused.text
        assert api.get("/instances").json() == [] and fake_of(api).calls == []
        api.post("/instances/run", json={"InstanceName": "r", "ImageName": "hello"})
        api.post("/volumes/v?size=4")
        hot = api.post("/volumes/v/attach/r?mount=/data")
        assert hot.status_code == 501 and "fake cannot attach or detach volumes" in hot.json()["message"]
        assert api.get("/volumes/v").json()["Attachment"] == ""


def test_a_run_below_the_images_minimum_memory_is_a_400_that_starts_nothing(
    data_dir: Path, hello_tgz: bytes  # noqa: F811
) -> None:
    with fake_daemon(data_dir) as api:
        run_spec = build_hello(api, hello_tgz)["RunSpec"]
        assert isinstance(run_spec, dict)
        minimum = run_spec["MinInstanceMemoryMB"]
        assert 0 < minimum <= run_spec["DefaultInstanceMemory"]
        small = api.post("/instances/run", json={"InstanceName": "a", "ImageName": "hello", "MemoryMb": minimum - 1})
        assert small.status_code == 400 and f"minimum of {minimum} MB" in small.json()["message"]
        assert api.get("/instances").json() == [] and fake_of(api).calls == []
        at_minimum = api.post("/instances/run", json={"InstanceName": "a", "ImageName": "hello", "MemoryMb": minimum})
        assert at_minimum.status_code == 201
