"""Volumes without a VM: every create form of API.md, the data read back from the disk image
on the host (debugfs for ext, mtools for FAT), list/get/delete, and nothing left on failure."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Daemon, services_of, tar_gz
from tests.test_api import assert_error
from unik.client import UnikAPIError, UnikClient
from unik.errors import Conflict
from unik.models import CreateVolumeRequest, Volume, VolumeMeta
from unik.volumes import DataUsage, measure

FILES = {"hello.txt": "hello from the volume\n", "sub/dir/deep.txt": "deep\n", "bin.dat": bytes(range(256)) * 40}


def create(api: TestClient, name: str, tgz: bytes | None, query: str = "", **fields: str) -> object:
    url = f"/volumes/{name}" + (f"?{query}" if query else "")
    if tgz is None:
        return api.post(url, content=b"null", headers={"Content-Type": "application/json"})
    return api.post(url, files={"tarfile": ("data.tar.gz", tgz, "application/gzip")}, data=fields)


def disk(data_dir: Path, volume: dict[str, object]) -> Path:
    return data_dir / "volumes" / str(volume["Id"]) / "disk.img"


def ext_cat(image: Path, path: str) -> bytes:
    result = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return result.stdout


def ext_features(image: Path) -> str:
    return subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout


def fat_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["mtype", "-i", str(image), f"::{path}"], capture_output=True, check=True).stdout


def read_back(image: Path, fs_type: str, path: str) -> bytes:
    return fat_cat(image, path) if fs_type == "fat" else ext_cat(image, path)


def expected(name: str) -> bytes:
    content = FILES[name]
    return content.encode() if isinstance(content, str) else content


def nothing_left(api: TestClient, data_dir: Path) -> None:
    assert api.get("/volumes").json() == []
    assert list((data_dir / "volumes").iterdir()) == []
    assert list((data_dir / "tmp").iterdir()) == []


def random_tgz(megabytes: int) -> bytes:
    # Random bytes do not compress: the unpacked size is what the upload says.
    return tar_gz({"random.bin": os.urandom(megabytes << 20)})


# -- creating with data -----------------------------------------------------------------------


@pytest.mark.parametrize("fs_type", ["ext2", "ext4", "fat"])
def test_create_from_tar_gz_holds_the_files(api: TestClient, data_dir: Path, fs_type: str) -> None:
    response = create(api, "data", tar_gz(FILES), f"type={fs_type}&provider=qemu")
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    volume = response.json()  # type: ignore[attr-defined]
    assert volume["Name"] == "data" and volume["Attachment"] == "" and volume["Infrastructure"] == "QEMU"
    assert volume["Created"].endswith("Z") and volume["SizeMb"] == 8  # the fitted minimum
    image = disk(data_dir, volume)
    assert image.stat().st_size == 8 << 20
    for name in FILES:
        assert read_back(image, fs_type, "/" + name) == expected(name)
    if fs_type == "fat":
        assert b"FAT" in image.read_bytes()[:512]
    else:
        features = ext_features(image)
        assert ("has_journal" in features) == (fs_type == "ext4")
    record = services_of(api).ctx.store.volumes.find("data")
    assert record.meta == VolumeMeta(fs_type=fs_type, provider="qemu", mount=None)
    assert list((data_dir / "tmp").iterdir()) == []


def test_parameters_as_form_fields_and_default_type(api: TestClient, data_dir: Path) -> None:
    # The Go client puts them in the query; a browser form sends them in the body: both count.
    response = create(api, "form", tar_gz(FILES), "", provider="qemu", type="ext4")
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    assert "has_journal" in ext_features(disk(data_dir, response.json()))  # type: ignore[attr-defined]
    # No type and no provider: ext2 on the only configured provider.
    plain = create(api, "plain", tar_gz(FILES))
    assert plain.status_code == 201, plain.text  # type: ignore[attr-defined]
    assert services_of(api).ctx.store.volumes.find("plain").meta.fs_type == "ext2"


def test_fitted_size_follows_the_headroom_rule(api: TestClient, data_dir: Path, tmp_path: Path) -> None:
    payload = os.urandom(10 << 20)
    response = create(api, "big", tar_gz({"random.bin": payload}))
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    volume = response.json()  # type: ignore[attr-defined]
    (tmp_path / "random.bin").write_bytes(payload)
    assert volume["SizeMb"] == measure(tmp_path).fitted_mb() == 17  # ceil(10 MB * 1.2) + 4
    assert hashlib.sha256(ext_cat(disk(data_dir, volume), "/random.bin")).digest() == hashlib.sha256(payload).digest()


def test_many_tiny_files_get_enough_inodes(api: TestClient, data_dir: Path) -> None:
    # 3000 empty files need more inodes than mke2fs gives an 8 MB filesystem by default (2048).
    files: dict[str, bytes | str] = {f"f{i}": b"" for i in range(3000)}
    response = create(api, "tiny", tar_gz(files))
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(disk(data_dir, response.json()))],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "f2999" in listing


@pytest.mark.parametrize("fs_type", ["ext2", "fat"])
def test_explicit_size(api: TestClient, data_dir: Path, fs_type: str) -> None:
    response = create(api, "sized", tar_gz(FILES), f"size=20&type={fs_type}")
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    volume = response.json()  # type: ignore[attr-defined]
    assert volume["SizeMb"] == 20 and disk(data_dir, volume).stat().st_size == 20 << 20
    assert read_back(disk(data_dir, volume), fs_type, "/hello.txt") == expected("hello.txt")


@pytest.mark.parametrize("fs_type", ["ext2", "ext4", "fat"])
def test_size_smaller_than_the_data_is_400(api: TestClient, data_dir: Path, fs_type: str) -> None:
    assert_error(create(api, "small", random_tgz(3), f"size=2&type={fs_type}"), 400, "too small")
    nothing_left(api, data_dir)


# -- raw disk images --------------------------------------------------------------------------


def ext2_image(path: Path, size_mb: int) -> bytes:
    source = path.parent / "raw-src"
    source.mkdir()
    (source / "inside.txt").write_text("from a raw image\n")
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext2", "-q", "-F", "-d", str(source), str(path)], check=True)
    return path.read_bytes()


def create_raw(api: TestClient, name: str, content: bytes, query: str = "") -> object:
    url = f"/volumes/{name}?raw=true" + (f"&{query}" if query else "")
    return api.post(url, files={"tarfile": ("disk.img", content, "application/octet-stream")})


def test_raw_image_is_used_as_it_is(api: TestClient, data_dir: Path, tmp_path: Path) -> None:
    content = ext2_image(tmp_path / "disk.img", 3)
    response = create_raw(api, "raw", content)
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    volume = response.json()  # type: ignore[attr-defined]
    assert volume["SizeMb"] == 3
    assert disk(data_dir, volume).read_bytes() == content
    assert ext_cat(disk(data_dir, volume), "/inside.txt") == b"from a raw image\n"
    assert services_of(api).ctx.store.volumes.find("raw").meta.fs_type == "raw"


def test_raw_image_grows_to_size_and_refuses_a_smaller_one(api: TestClient, data_dir: Path, tmp_path: Path) -> None:
    content = ext2_image(tmp_path / "disk.img", 3)
    grown = create_raw(api, "grown", content, "size=5")
    assert grown.status_code == 201, grown.text  # type: ignore[attr-defined]
    image = disk(data_dir, grown.json())  # type: ignore[attr-defined]
    assert grown.json()["SizeMb"] == 5 and image.stat().st_size == 5 << 20  # type: ignore[attr-defined]
    assert image.read_bytes()[: len(content)] == content
    assert_error(create_raw(api, "shrunk", content, "size=2"), 400, "smaller")
    assert [v["Name"] for v in api.get("/volumes").json()] == ["grown"]


def test_raw_image_of_odd_length_is_padded_to_whole_sectors(api: TestClient, data_dir: Path) -> None:
    response = create_raw(api, "odd", b"x" * 1000)
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    assert response.json()["SizeMb"] == 1  # type: ignore[attr-defined]
    assert disk(data_dir, response.json()).read_bytes() == b"x" * 1000 + bytes(24)  # type: ignore[attr-defined]


# -- creating without data --------------------------------------------------------------------


def test_empty_volume_from_json_null(api: TestClient, data_dir: Path) -> None:
    response = create(api, "empty", None, "size=16&type=ext4&provider=qemu")
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    volume = response.json()  # type: ignore[attr-defined]
    assert volume["SizeMb"] == 16 and disk(data_dir, volume).stat().st_size == 16 << 20
    assert "has_journal" in ext_features(disk(data_dir, volume))


@pytest.mark.parametrize("body", [b"null", b""])
def test_empty_volume_without_content_type(api: TestClient, data_dir: Path, body: bytes) -> None:
    # What the Go client sends: the JSON `null` (or nothing) with no Content-Type at all.
    response = api.post("/volumes/bare?size=4&type=fat", content=body)
    assert response.status_code == 201, response.text
    image = disk(data_dir, response.json())
    subprocess.run(["mcopy", "-i", str(image), "-", "::/written.txt"], input=b"works", check=True)
    assert fat_cat(image, "/written.txt") == b"works"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("/volumes/v", "size"),
        ("/volumes/v?size=0", "size"),
        ("/volumes/v?size=-1", "size"),
        ("/volumes/v?size=abc", "size"),
        ("/volumes/v?size=70000", "limit"),
        ("/volumes/v?size=8&raw=true", "raw"),
        ("/volumes/v?size=8&type=ntfs", "ntfs"),
        ("/volumes/v?size=8&provider=aws", "provider"),
        ("/volumes/-v?size=8", ""),
    ],
)
def test_bad_requests_without_data(api: TestClient, data_dir: Path, url: str, fragment: str) -> None:
    assert_error(api.post(url, content=b"null"), 400, fragment)
    nothing_left(api, data_dir)


# -- refusals with data -----------------------------------------------------------------------


def symlink_tgz() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "target"
        tar.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("tgz", "query", "fragment"),
    [
        (b"this is not a tar.gz", "", "tar"),
        (tar_gz({"../escape": "x"}), "", "escapes"),
        (tar_gz(FILES), "type=xfs", "xfs"),
        (symlink_tgz(), "type=fat", "symlink"),
        (tar_gz({"Readme": "a", "README": "b"}), "type=fat", "case"),
    ],
)
def test_bad_data_is_400_and_leaves_nothing(
    api: TestClient, data_dir: Path, tgz: bytes, query: str, fragment: str
) -> None:
    assert_error(create(api, "bad", tgz, query), 400, fragment)
    nothing_left(api, data_dir)


def test_symlinks_are_kept_on_ext(api: TestClient, data_dir: Path) -> None:
    response = create(api, "links", symlink_tgz())
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    stat = subprocess.run(
        ["debugfs", "-R", "stat /link", str(disk(data_dir, response.json()))],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Type: symlink" in stat


def test_name_taken_is_409_and_bad_name_is_400(api: TestClient, data_dir: Path) -> None:
    assert create(api, "data", tar_gz(FILES)).status_code == 201  # type: ignore[attr-defined]
    assert_error(create(api, "data", tar_gz(FILES)), 409, "already exists")
    assert_error(create(api, "data", None, "size=4"), 409, "already exists")
    assert_error(create(api, "bad%20name", tar_gz(FILES)), 400)
    assert [v["Name"] for v in api.get("/volumes").json()] == ["data"]
    assert len(list((data_dir / "volumes").iterdir())) == 1
    assert list((data_dir / "tmp").iterdir()) == []


def test_no_cleanup_keeps_the_unpacked_files(api: TestClient, data_dir: Path) -> None:
    response = create(api, "kept", tar_gz(FILES), "no_cleanup=true")
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    volume_id = response.json()["Id"]  # type: ignore[attr-defined]
    assert (data_dir / "tmp" / f"volume-{volume_id}" / "files" / "hello.txt").read_text() == FILES["hello.txt"]


# -- list, get, delete ------------------------------------------------------------------------


def test_list_get_delete(api: TestClient, data_dir: Path) -> None:
    first = create(api, "one", None, "size=4").json()  # type: ignore[attr-defined]
    second = create(api, "two", tar_gz(FILES)).json()  # type: ignore[attr-defined]
    assert api.get("/volumes").json() == [first, second]
    assert api.get("/volumes/one").json() == first
    assert api.get(f"/volumes/{second['Id']}").json() == second
    assert api.get(f"/volumes/{second['Id'][:10]}").json() == second
    assert_error(api.get("/volumes/on"), 404)
    response = api.delete("/volumes/one")
    assert response.status_code == 204 and response.content == b""
    assert not disk(data_dir, first).parent.exists()
    assert_error(api.delete("/volumes/one"), 404)
    assert api.delete(f"/volumes/{second['Id']}").status_code == 204
    nothing_left(api, data_dir)


def test_delete_attached_needs_force(api: TestClient, data_dir: Path) -> None:
    volume = create(api, "busy", tar_gz(FILES)).json()  # type: ignore[attr-defined]
    store = services_of(api).ctx.store
    # No VM: an attachment to an instance that is not running (its disk is only in the record).
    record = store.volumes.find("busy")
    record.obj.Attachment = "0123456789abcdef"
    record.meta.mount = "/data"
    store.volumes.update(record)
    assert_error(api.delete("/volumes/busy"), 409, "attached")
    assert_error(api.delete("/volumes/busy?force=false"), 409, "attached")
    assert disk(data_dir, volume).exists()
    assert api.get("/volumes/busy").json()["Attachment"] == "0123456789abcdef"
    assert api.delete("/volumes/busy?force=true").status_code == 204
    nothing_left(api, data_dir)


def test_recover_removes_orphan_volume_folders(api: TestClient, data_dir: Path) -> None:
    volume = create(api, "kept", None, "size=4").json()  # type: ignore[attr-defined]
    orphan = data_dir / "volumes" / "orphan"
    orphan.mkdir()
    (orphan / "disk.img").write_bytes(b"half-built")
    services_of(api).reconciler.recover()
    assert not orphan.exists()
    assert disk(data_dir, volume).exists()


def test_openapi_describes_both_create_forms(api: TestClient) -> None:
    operation = api.get("/openapi.json").json()["paths"]["/volumes/{name}"]["post"]
    query = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    assert {"size", "provider", "raw", "type", "no_cleanup"} <= query
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert not operation["requestBody"].get("required", False)
    assert "Without data" in operation["description"]


def test_data_usage_rule() -> None:
    assert DataUsage(0, 0).fitted_mb() == 8
    assert DataUsage(100 << 20, 10).fitted_mb() == 124


# -- through the Python client and a real daemon ----------------------------------------------


def test_client_creates_volumes(daemon: Daemon, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "hello.txt").write_text("hi from the client\n")
    (folder / "sub" / "deep.txt").write_text("deep\n")
    with UnikClient(daemon.host) as client:
        filled = client.volumes.create("filled", data=folder, fs_type="ext4")
        empty = client.volumes.create("empty", size_mb=8, fs_type="fat")
        assert filled.SizeMb == 8 and empty.SizeMb == 8 and filled.Infrastructure == "QEMU"
        assert [v.Name for v in client.volumes.list()] == ["filled", "empty"]
        image = daemon.data_dir / "volumes" / filled.Id / "disk.img"
        assert ext_cat(image, "/hello.txt") == b"hi from the client\n"
        assert ext_cat(image, "/sub/deep.txt") == b"deep\n"
        assert b"FAT" in (daemon.data_dir / "volumes" / empty.Id / "disk.img").read_bytes()[:512]
        with pytest.raises(UnikAPIError) as taken:
            client.volumes.create("empty", size_mb=8)
        assert taken.value.status_code == 409
        with pytest.raises(UnikAPIError) as no_size:
            client.volumes.create("nosize")
        assert no_size.value.status_code == 400
        client.volumes.delete("filled")
        client.volumes.delete("empty")
        assert client.volumes.list() == []


def test_concurrent_creates_of_one_name_have_one_winner(api: TestClient, data_dir: Path) -> None:
    async def race() -> list[object]:
        uploads = [io.BytesIO(tar_gz(FILES)) for _ in range(3)]
        return await asyncio.gather(
            *(services_of(api).volumes.create(CreateVolumeRequest("same", upload)) for upload in uploads),
            return_exceptions=True,
        )

    results = asyncio.run(race())
    assert sum(isinstance(r, Volume) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 2
    assert len(list((data_dir / "volumes").iterdir())) == 1
    assert list((data_dir / "tmp").iterdir()) == []
