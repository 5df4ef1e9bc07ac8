"""GET /images/{name}/disk: an image exported as a bootable disk with a baked run config, booted
as users' hypervisors and clouds would: every format, SeaBIOS and OVMF, virtio, AHCI and NVMe
disks, virtio-net and e1000 NICs with the address by DHCP; bad input is a 400 that writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, folder_tar_gz, hello_tgz, requires_vm  # noqa: F401 - hello_tgz is a fixture
from tests.test_disk import BOOT_DEADLINE, CHECKABLE, OVMF_CODE, OVMF_VARS, _boot, _qemu_img
from unik.artifacts.disk import FORMATS, missing_disk_tools
from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel
from unik.providers.network import free_port

pytestmark = [
    requires_vm,
    pytest.mark.skipif(missing_disk_tools() is not None, reason=f"disk tools: {missing_disk_tools()}"),
]

BAKED_LINE = b"hello from unik: baked into the disk"


DHCP_LINE = b"eth0 has 10.0.2.15/24 via 10.0.2.2 by DHCP"


def _kernel_present(flavour: str) -> bool:
    try:
        load_kernel(default_kernel_root(), flavour)
    except FileNotFoundError:
        return False
    return True


needs_disk_kernel = pytest.mark.skipif(not _kernel_present("disk"), reason="no disk kernel (`make kernel-disk`)")


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


@needs_disk_kernel
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


def _vm(tmp_path: Path, disk: Path, fmt: str, firmware: str, attach: str, nic: str) -> tuple[list[str], Path]:
    """The qemu command line of a user's VM booting `disk`, and its serial console file.

    firmware: "bios" (SeaBIOS on -M pc) or "uefi" (OVMF on q35, a fresh variable store per VM);
    attach: "virtio", "ahci", "nvme", "pvscsi" or "virtio-scsi"; nic: a qemu NIC model on user-mode networking, whose
    DHCP server hands out 10.0.2.15, with a loopback port forwarded to the guest's 8080.
    """
    console = tmp_path / f"{disk.name}-{firmware}-{attach}.log"
    drive = f"file={disk},format={FORMATS[fmt].driver},snapshot=on"
    detached = ["-drive", f"{drive},if=none,id=d0"]
    attached = {
        "virtio": ["-drive", f"{drive},if=virtio"],
        "ahci": ["-device", "ahci,id=sata", *detached, "-device", "ide-hd,drive=d0,bus=sata.0"],
        "nvme": [*detached, "-device", "nvme,drive=d0,serial=unik0"],
        "pvscsi": ["-device", "pvscsi,id=scsi", *detached, "-device", "scsi-hd,drive=d0,bus=scsi.0"],
        "virtio-scsi": ["-device", "virtio-scsi-pci,id=scsi", *detached, "-device", "scsi-hd,drive=d0,bus=scsi.0"],
    }[attach]
    firmware_args: list[str] = []
    machine = "pc"
    if firmware == "uefi":
        machine = "q35"
        vars_copy = tmp_path / f"{console.stem}-VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)  # a reused store keeps a stale boot entry
        firmware_args = ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                         "-drive", f"if=pflash,format=raw,file={vars_copy}"]  # fmt: skip
    argv = [
        "qemu-system-x86_64", "-M", machine, "-accel", "tcg", "-m", "256", "-cpu", "qemu64,+rdrand",
        "-display", "none", "-serial", f"file:{console}", "-no-reboot", "-nodefaults",
        *firmware_args, *attached,
        "-nic", f"user,model={nic},hostfwd=tcp:127.0.0.1:{free_port()}-:8080",
    ]  # fmt: skip
    return argv, console


def _export(api: TestClient, image: str, fmt: str, query: str, folder: Path) -> Path:
    response = api.get(f"/images/{image}/disk?format={fmt}&{query}")
    assert response.status_code == 200, response.text
    disk = folder / f"{image}.{fmt}"
    disk.write_bytes(response.content)
    return disk


BAKED = "env=GREETING=baked%20into%20the%20disk&env=TICKS=1"


# Every format boots once; raw and qcow2 under both firmwares; the hardware of the hypervisors
# and clouds each format is for: VirtualBox (vdi: AHCI, e1000), VMware (vmdk: pvscsi, vmxnet3),
# Hyper-V (vhd, vhdx: generation 2 is UEFI), AWS Nitro (raw: UEFI, NVMe), GCE (virtio-scsi).
BOOTS = [
    ("raw", "bios", "virtio", "virtio-net-pci"),
    ("raw", "uefi", "nvme", "virtio-net-pci"),
    ("qcow2", "bios", "virtio-scsi", "virtio-net-pci"),
    ("qcow2", "uefi", "virtio", "virtio-net-pci"),
    ("vmdk", "bios", "pvscsi", "vmxnet3"),
    ("vhd", "uefi", "ahci", "e1000e"),
    ("vhdx", "uefi", "virtio", "virtio-net-pci"),
    ("vdi", "bios", "ahci", "e1000"),
]


@pytest.mark.vm
@needs_disk_kernel
@pytest.mark.parametrize(("fmt", "firmware", "attach", "nic"), BOOTS)
def test_an_exported_disk_boots_with_its_baked_env_and_dhcp(
    hello_api: TestClient, tmp_path: Path, fmt: str, firmware: str, attach: str, nic: str
) -> None:
    if firmware == "uefi" and not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        pytest.skip("OVMF is not installed")
    disk = _export(hello_api, "hello", fmt, BAKED, tmp_path)
    driver = FORMATS[fmt].driver
    if fmt in CHECKABLE:
        check = _qemu_img("check", "-f", driver, disk)
        assert check.returncode == 0, check.stdout + check.stderr
    info = _qemu_img("info", "-f", driver, "--output=json", disk)
    assert info.returncode == 0 and json.loads(info.stdout)["format"] == driver, info.stderr
    argv, console = _vm(tmp_path, disk, fmt, firmware, attach, nic)
    _boot(argv, console, f"{firmware}, {fmt} on {attach}, {nic}", BAKED_LINE)
    log = console.read_bytes()
    assert DHCP_LINE in log, log[-2000:]
    assert b"cannot" not in log, log[-2000:]  # no module, device or route init failed to set up


@pytest.mark.vm
@needs_disk_kernel
def test_a_server_on_ahci_and_e1000_answers_through_its_dhcp_address(api: TestClient, tmp_path: Path) -> None:
    """VirtualBox's default hardware: the app's port, forwarded from loopback, answers."""
    built = api.post("/images/web/create?base=linux&lang=c&provider=qemu",
                     files={"tarfile": ("a.tgz", folder_tar_gz(EXAMPLES / "c-http"))})  # fmt: skip
    assert built.status_code == 201, built.text
    disk = _export(api, "web", "vdi", "env=KEY=from%20the%20disk", tmp_path)
    argv, console = _vm(tmp_path, disk, "vdi", "bios", "ahci", "e1000")
    port = int(argv[-1].split("127.0.0.1:")[1].split("-")[0])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(console, b"listening on", proc)
        assert DHCP_LINE in console.read_bytes()
        answer = httpx.get(f"http://127.0.0.1:{port}/env_test", timeout=30)
        assert answer.status_code == 200 and answer.text == "from the disk"
    finally:
        proc.kill()
        proc.communicate()


def _wait_for(console: Path, line: bytes, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + BOOT_DEADLINE
    while time.monotonic() < deadline and proc.poll() is None:
        if console.exists() and line in console.read_bytes():
            return
        time.sleep(0.05)
    log = console.read_bytes()[-2000:] if console.exists() else b"(no console output)"
    pytest.fail(f"the VM never printed {line!r}; console: {log!r}")


@pytest.mark.vm
@pytest.mark.skipif(not _kernel_present("cloud"), reason="no cloud kernel (`make kernel`)")
def test_disk_kernel_cloud_boots_debians_kernel_with_its_modules(
    data_dir: Path, hello_tgz: bytes, tmp_path: Path  # noqa: F811
) -> None:
    from unik.daemon import build_app

    (data_dir / "daemon-config.yaml").write_text("disk_kernel: cloud\n")
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        built = api.post("/images/hello/create?base=linux&lang=c&provider=qemu",
                         files={"tarfile": ("a.tgz", hello_tgz)})  # fmt: skip
        assert built.status_code == 201, built.text
        disk = _export(api, "hello", "raw", BAKED, tmp_path)
    argv, console = _vm(tmp_path, disk, "raw", "bios", "virtio", "virtio-net-pci")
    _boot(argv, console, "bios, raw, the cloud kernel", BAKED_LINE)
    log = console.read_bytes()
    assert DHCP_LINE in log and b"cannot" not in log, log[-2000:]
