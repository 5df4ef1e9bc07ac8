"""GET /images/{name}/disk: an image exported as a bootable disk with a baked run config, booted
under SeaBIOS and OVMF as a user's hypervisor would; bad input is a 400 that writes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import hello_tgz, requires_vm  # noqa: F401 - hello_tgz is a fixture
from tests.test_disk import OVMF_CODE, OVMF_VARS, _boot, _qemu
from unik.artifacts.disk import missing_disk_tools
from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel

pytestmark = [
    requires_vm,
    pytest.mark.skipif(missing_disk_tools() is not None, reason=f"disk tools: {missing_disk_tools()}"),
]

BAKED_LINE = b"hello from unik: baked into the disk"


def _cloud_kernel_present() -> bool:
    try:
        load_kernel(default_kernel_root(), "cloud")
    except FileNotFoundError:
        return False
    return True


needs_cloud_kernel = pytest.mark.skipif(not _cloud_kernel_present(), reason="no cloud kernel (`make kernel`)")


@pytest.fixture
def hello_api(api: TestClient, hello_tgz: bytes) -> TestClient:  # noqa: F811
    built = api.post("/images/hello/create?base=linux&lang=c&provider=qemu",
                     files={"tarfile": ("a.tgz", hello_tgz)})  # fmt: skip
    assert built.status_code == 201, built.text
    return api


def disks_of(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "images").glob("*/disks/*"))


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("format=../x", "unknown disk format"),
        ("format=iso", "unknown disk format"),
        ("format=raw&env=NOEQUALS", "not KEY=VALUE"),
        ("format=raw&env==value", "not KEY=VALUE"),
        ("format=raw&env=BIG=" + "x" * 20000, "larger than"),
        ("format=raw&args=%27unclosed", "args"),
        ("env=A=1", "format"),
    ],
)
def test_bad_exports_are_400_and_write_nothing(hello_api: TestClient, data_dir: Path, query: str, says: str) -> None:
    response = hello_api.get(f"/images/hello/disk?{query}")
    assert response.status_code == 400, response.text
    assert says in response.json()["message"]
    assert disks_of(data_dir) == [] and list((data_dir / "tmp").iterdir()) == []


def test_an_unknown_image_is_404(api: TestClient) -> None:
    assert api.get("/images/nope/disk?format=raw").status_code == 404


@needs_cloud_kernel
def test_a_disk_is_kept_for_the_same_export_and_goes_with_its_image(hello_api: TestClient, data_dir: Path) -> None:
    first = hello_api.get("/images/hello/disk?format=vmdk&env=K=1")
    assert first.status_code == 200
    assert first.headers["content-disposition"] == 'attachment; filename="hello.vmdk"'
    assert first.headers["content-type"] == "application/octet-stream"
    assert int(first.headers["content-length"]) == len(first.content)
    kept = disks_of(data_dir)
    assert sorted(p.suffix for p in kept) == [".img", ".vmdk"]  # the vmdk and the raw disk it came from
    assert hello_api.get("/images/hello/disk?format=vmdk&env=K=1").content == first.content
    assert disks_of(data_dir) == kept  # the same export again: the same disks
    assert hello_api.get("/images/hello/disk?format=qcow2&env=K=1").status_code == 200
    assert len(disks_of(data_dir)) == 3  # another format of the same run config: from the same raw disk
    assert hello_api.get("/images/hello/disk?format=vmdk&env=K=2").status_code == 200
    assert len(disks_of(data_dir)) == 5  # another run config: other disks
    assert hello_api.delete("/images/hello").status_code == 204
    assert disks_of(data_dir) == []


@pytest.mark.vm
@needs_cloud_kernel
def test_an_exported_raw_disk_boots_under_seabios_with_its_baked_env(hello_api: TestClient, tmp_path: Path) -> None:
    response = hello_api.get("/images/hello/disk?format=raw&env=GREETING=baked%20into%20the%20disk&env=TICKS=1")
    assert response.status_code == 200
    disk = tmp_path / "hello.img"
    disk.write_bytes(response.content)
    console = tmp_path / "bios.log"
    _boot(_qemu("pc", console, f"file={disk},format=raw,if=virtio"), console, "SeaBIOS, exported raw", BAKED_LINE)


@pytest.mark.vm
@needs_cloud_kernel
def test_an_exported_qcow2_disk_boots_under_ovmf_with_its_baked_env(hello_api: TestClient, tmp_path: Path) -> None:
    if not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        pytest.skip("OVMF is not installed")
    response = hello_api.get("/images/hello/disk?format=qcow2&env=GREETING=baked%20into%20the%20disk&env=TICKS=1")
    assert response.status_code == 200
    disk = tmp_path / "hello.qcow2"
    disk.write_bytes(response.content)
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)  # a fresh variable store per VM
    console = tmp_path / "uefi.log"
    drives = (
        f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        f"if=pflash,format=raw,file={vars_copy}",
        f"file={disk},format=qcow2,if=virtio",
    )
    _boot(_qemu("q35", console, *drives), console, "OVMF, exported qcow2", BAKED_LINE)
