"""Every route of API.md: success and error codes, with the request shapes the Go client sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import requires_vm, tar_gz

BUILD = "base=linux&lang=c&provider=qemu"
BROKEN_C = {"main.c": "int main(void) { return undeclared_thing; }\n"}


def build(api: TestClient, name: str, tgz: bytes, query: str = BUILD) -> object:
    return api.post(f"/images/{name}/create?{query}", files={"tarfile": ("app.tar.gz", tgz, "application/gzip")})


def assert_error(response: object, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"message"}
    assert fragment.lower() in body["message"].lower()


def nothing_left(api: TestClient, data_dir: Path) -> None:
    assert api.get("/images").json() == []
    assert list((data_dir / "images").iterdir()) == []
    assert list((data_dir / "tmp").iterdir()) == []


# -- info -------------------------------------------------------------------------------------


def test_info_routes(api: TestClient) -> None:
    assert api.get("/_ping").text == "OK"
    assert "linux-c-qemu" in api.get("/available_compilers").json()
    assert api.get("/available_providers").json() == ["qemu"]
    version = api.get("/version").json()
    assert version["providers"]["qemu"]["accel"] in ("tcg", "kvm")
    text = api.get("/describe_compiler?provider=qemu&base=linux&lang=c")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert "musl" in text.text
    # As the original daemon: an unknown compiler is a 400 that names the ones available.
    unknown = api.get("/describe_compiler?provider=qemu&base=linux&lang=cobol")
    assert unknown.status_code == 400
    assert "cobol" in unknown.json()["message"] and "linux-c-qemu" in unknown.json()["message"]
    no_provider = api.get("/describe_compiler?provider=vsphere&base=linux&lang=c")
    assert no_provider.status_code == 400 and "vsphere" in no_provider.json()["message"]
    assert_error(api.get("/describe_compiler?provider=qemu&base=linux"), 400, "lang")


def test_openapi_and_docs(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    routes = ("/images/{name}/create", "/instances/run", "/volumes/{name}/attach/{instance_id}", "/images/push/{name}")
    for path in routes:
        assert path in schema["paths"]
    assert "RunInstanceRequest" in schema["components"]["schemas"]
    assert api.get("/docs").status_code == 200


def test_unknown_route_is_json_404(api: TestClient) -> None:
    assert_error(api.get("/no/such/route"), 404)


# -- images -----------------------------------------------------------------------------------


def test_build_describe_list_delete(api: TestClient, hello_tgz: bytes, data_dir: Path) -> None:
    created = build(api, "hello", hello_tgz, BUILD + "&args=a%20b&mounts=/data,/logs")
    assert created.status_code == 201, created.text
    image = created.json()
    assert image["Name"] == "hello" and image["Infrastructure"] == "QEMU"
    assert image["SizeMb"] > 0 and image["Created"].endswith("Z")
    formats = ["raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi"]
    assert image["StageSpec"] == {"ImageFormat": "folder", "DiskFormats": formats}
    assert image["RunSpec"]["Compiler"] == "linux-c-qemu"
    assert [m["MountPoint"] for m in image["RunSpec"]["DeviceMappings"]] == ["/data", "/logs"]
    assert api.get("/images").json() == [image]
    assert api.get("/images/hello").json() == image
    assert api.get(f"/images/{image['Id']}").json() == image
    assert api.get(f"/images/{image['Id'][:8]}").json() == image
    assert_error(api.get("/images/hel"), 404)  # a name prefix is not a match
    assert api.delete("/images/hello").status_code == 204
    assert_error(api.get("/images/hello"), 404, "not found")
    assert_error(api.delete("/images/hello"), 404)
    nothing_left(api, data_dir)


def test_build_parameters_as_form_fields(api: TestClient, hello_tgz: bytes) -> None:
    response = api.post(
        "/images/formed/create",
        data={"base": "linux", "lang": "c", "provider": "qemu", "force": "TRUE"},
        files={"tarfile": ("app.tar.gz", hello_tgz, "application/gzip")},
    )
    assert response.status_code == 201, response.text


def test_build_name_taken_and_force(api: TestClient, hello_tgz: bytes) -> None:
    first = build(api, "hello", hello_tgz).json()
    assert_error(build(api, "hello", hello_tgz), 409, "already exists")
    assert_error(build(api, "hello", hello_tgz, BUILD + "&force=false"), 409)
    replaced = build(api, "hello", hello_tgz, BUILD + "&force=true")
    assert replaced.status_code == 201
    assert replaced.json()["Id"] != first["Id"]
    assert [i["Id"] for i in api.get("/images").json()] == [replaced.json()["Id"]]


@pytest.mark.parametrize(
    ("path", "query", "fragment"),
    [
        ("bad name!", BUILD, "name"),
        ("-leading-dash", BUILD, "name"),
        ("x" * 65, BUILD, "name"),
        ("ok", "lang=c&provider=qemu", "base"),
        ("ok", "base=linux&lang=cobol&provider=qemu", "no compiler"),
        ("ok", "base=linux&lang=c&provider=vsphere", "no compiler"),
        ("ok", BUILD + "&mounts=relative/path", "mount point"),
        ("ok", BUILD + "&args=%22unclosed", "args"),
    ],
)
def test_build_bad_parameters(
    api: TestClient, hello_tgz: bytes, data_dir: Path, path: str, query: str, fragment: str
) -> None:
    assert_error(build(api, path, hello_tgz, query), 400, fragment)
    nothing_left(api, data_dir)


def test_build_without_file(api: TestClient, data_dir: Path) -> None:
    assert_error(api.post(f"/images/x/create?{BUILD}"), 400, "tarfile")
    nothing_left(api, data_dir)


@pytest.mark.parametrize(
    ("upload", "fragment"),
    [
        (b"this is not a tarball", "tar"),
        (tar_gz({"../escape.c": "int main(void){return 0;}"}), "escapes"),
        (tar_gz({"/abs.c": "int main(void){return 0;}"}), "absolute"),
        (tar_gz({"README": "no sources here"}), "no c sources"),
        (tar_gz(BROKEN_C), "undeclared_thing"),
    ],
)
def test_build_bad_upload_leaves_nothing(api: TestClient, data_dir: Path, upload: bytes, fragment: str) -> None:
    assert_error(build(api, "bad", upload), 400, fragment)
    nothing_left(api, data_dir)
    assert not (data_dir.parent / "escape.c").exists()


def test_build_no_cleanup_keeps_build_folder(api: TestClient, hello_tgz: bytes, data_dir: Path) -> None:
    assert build(api, "kept", hello_tgz, BUILD + "&no_cleanup=true").status_code == 201
    kept = list((data_dir / "tmp").glob("build-*"))
    assert len(kept) == 1 and (kept[0] / "src" / "hello.c").exists()


def test_hub_routes_errors(api: TestClient, hello_tgz: bytes) -> None:
    """The hub itself is tested against a real S3 server in test_hub.py; here only the request side."""
    build(api, "hello", hello_tgz)
    hub = {"URL": "http://127.0.0.1:1", "Username": "u", "Password": "p"}
    assert_error(api.post("/images/push/hello", content=json.dumps(hub)), 502, "127.0.0.1:1")
    assert_error(api.post("/images/push/nope", content=json.dumps(hub)), 404)
    assert_error(api.post("/images/pull/hello?provider=qemu", content=json.dumps(hub)), 409, "exists")
    assert_error(api.post("/images/pull/hello", content=json.dumps(hub)), 400, "provider")
    assert_error(api.post("/images/remote-delete/hello", content=json.dumps(hub)), 502, "127.0.0.1:1")
    assert_error(api.post("/images/remote-delete/hello", content=b"{not json"), 400, "json")
    assert_error(api.post("/images/push/hello", content=b"null"), 400, "url")


# -- instances --------------------------------------------------------------------------------


def test_instances_errors_without_vm(api: TestClient, hello_tgz: bytes) -> None:
    assert api.get("/instances").json() == []
    assert_error(api.get("/instances/nope"), 404)
    assert_error(api.get("/instances/nope/logs"), 404)
    assert_error(api.get("/instances/nope/logs?follow=true"), 404)
    assert_error(api.post("/instances/nope/start"), 404)
    assert_error(api.post("/instances/nope/stop"), 404)
    assert_error(api.delete("/instances/nope"), 404)
    run = "/instances/run"
    assert_error(api.post(run, content=b"null"), 400, "RunInstanceRequest")
    assert_error(api.post(run, content=b"{broken"), 400, "json")
    assert_error(api.post(run, json={"InstanceName": "i", "ImageName": "nope"}), 404, "nope")
    build(api, "hello", hello_tgz)
    assert_error(api.post(run, json={"InstanceName": "bad name", "ImageName": "hello"}), 400, "name")
    assert_error(api.post(run, json={"InstanceName": "i", "ImageName": ""}), 400, "ImageName")
    assert_error(api.post(run, json={"InstanceName": "i", "ImageName": "hello", "MemoryMb": 10**7}), 400, "Memory")
    assert_error(api.post(run, json={"InstanceName": "i", "ImageName": "hello", "Env": {"A=B": "x"}}), 400, "A=B")
    mounts = {"InstanceName": "i", "ImageName": "hello", "Mounts": {"/data": "vol"}}
    assert_error(api.post(run, json=mounts), 404, "vol")
    bad_point = {"InstanceName": "i", "ImageName": "hello", "Mounts": {"data": "vol"}}
    assert_error(api.post(run, json=bad_point), 400, "mount point")
    assert api.get("/instances").json() == []


@requires_vm
@pytest.mark.vm
def test_run_conflicts_and_force_delete(api: TestClient, hello_tgz: bytes, data_dir: Path) -> None:
    image = build(api, "hello", hello_tgz).json()
    # The Go client sends its JSON without a Content-Type header.
    body = json.dumps({"InstanceName": "i1", "ImageName": "hello", "Env": None, "Mounts": None, "MemoryMb": 0})
    created = api.post("/instances/run", content=body, headers={"content-type": ""})
    assert created.status_code == 201, created.text
    instance = created.json()
    assert instance["State"] == "running" and instance["ImageId"] == image["Id"]
    assert set(instance) == {"Id", "Name", "State", "IpAddress", "ImageId", "Infrastructure", "Created"}
    assert_error(api.post("/instances/run", content=body), 409, "already exists")
    assert_error(api.delete("/images/hello"), 409, "i1")
    assert_error(api.delete("/instances/i1"), 409, "running")
    assert api.delete("/images/hello?force=true").status_code == 204
    assert api.get("/instances").json() == []
    assert not (data_dir / "instances" / instance["Id"]).exists()


# -- volumes ----------------------------------------------------------------------------------


def test_volume_routes_registered(api: TestClient) -> None:
    assert api.get("/volumes").json() == []
    assert_error(api.get("/volumes/v"), 404)
    assert_error(api.post("/volumes/v?size=0", content=b"null"), 400, "size")  # creating: tests/test_volumes.py
    assert_error(api.delete("/volumes/v"), 404)
    assert_error(api.post("/volumes/v/attach/i?mount=/data"), 404)
    assert_error(api.post("/volumes/v/detach"), 404)
    assert_error(api.post("/volumes/bad%20name?size=1", content=b"null"), 400)
