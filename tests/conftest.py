"""Shared fixtures: a short data dir (QMP socket paths are limited), an in-process app, a real daemon."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from unik.client import UnikClient
from unik.guest import CpioWriter
from unik.models import ImageMeta, InstanceMeta, LaunchSpec, VolumeMeta
from unik.providers.network import free_port
from unik.services import Services
from unik.testing import DaemonProcess as Daemon
from unik.testing import LibvirtHost, libvirt_missing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a real VM under QEMU (TCG)")


def kernel_available() -> bool:
    from unik.kernel import default_kernel_root, load
    from unik.providers.qemu.config import QemuProviderConfig

    try:
        # The kernel a default provider builds images with.
        load(default_kernel_root(), QemuProviderConfig().kernel)
    except FileNotFoundError:
        return False
    return shutil.which("qemu-system-x86_64") is not None


def micro_kernel_reads_fw_cfg() -> bool:
    """The default micro kernel has fw_cfg in sysfs: big images' instances share their initrd."""
    from unik.kernel import default_kernel_root, load

    try:
        return load(default_kernel_root(), "micro").builds_in("CONFIG_FW_CFG_SYSFS")
    except FileNotFoundError:
        return False


requires_vm = pytest.mark.skipif(not kernel_available(), reason="no kernel fetched or no qemu: run `make setup`")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="unik-", dir="/tmp"))
    yield path
    _kill_vms(path)
    shutil.rmtree(path, ignore_errors=True)


def _kill_vms(data_dir: Path) -> None:
    """No test may leave a qemu behind, whatever it asserted."""
    for pidfile in data_dir.glob("instances/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def tar_gz(files: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def folder_tar_gz(folder: Path) -> bytes:
    return tar_gz({p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()})


@pytest.fixture
def hello_tgz() -> bytes:
    return folder_tar_gz(EXAMPLES / "c-hello")


def static_init_initrd(work: Path, source: str) -> Path:
    """`work/initrd`: an initramfs whose /init is the C program `source`, built static with musl."""
    (work / "init.c").write_text(source)
    subprocess.run(["musl-gcc", "-static", "-Os", "-s", "-o", work / "init", work / "init.c"], check=True)
    initrd = work / "initrd"
    with open(initrd, "wb") as f:
        cpio = CpioWriter(f)
        cpio.add_dir("/dev")
        cpio.add_char_device("/dev/console", 5, 1)
        cpio.add_file("/init", work / "init", 0o755)
        cpio.close()
    return initrd


def wait_for_log(client: UnikClient, instance: str, text: str, timeout: float) -> str:
    """The instance's console once it shows `text`; fails at once if the app ended first."""
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        logs = client.instances.logs(instance)
        if text in logs:
            return logs
        if "unik: exit status" in logs or "unik: killed by signal" in logs:
            break
        time.sleep(0.3)
    raise AssertionError(f"{instance} did not print {text!r} within {timeout:.0f} s; console:\n{logs[-4000:]}")


def serve_probe_routes(client: UnikClient, image: str, tmp_path: Path, timeout: float) -> str:
    """Run `image` (built with the mount point /data) with env KEY, a volume holding data.txt at
    /data and its port 8080 published on loopback; once it listens, check that /ping_test,
    /env_test and /mount_test answer as the examples' servers do. Returns the console as it was
    then; the instance is deleted, the volume stays."""
    data = tmp_path / f"{image}-volume"
    data.mkdir()
    (data / "data.txt").write_text(f"data for {image}\n")
    client.volumes.create(f"{image}-data", data=data)
    port = free_port()
    instance = f"{image}-1"
    client.instances.run(
        instance,
        image,
        env={"KEY": f"value for {image}"},
        mounts={"/data": f"{image}-data"},
        ports=[{"HostPort": port, "GuestPort": 8080}],
    )
    logs = wait_for_log(client, instance, "listening on", timeout)
    base = f"http://127.0.0.1:{port}"
    ping = httpx.get(f"{base}/ping_test", timeout=30)
    assert ping.status_code == 200 and ping.json() == {"message": "pong"}
    env = httpx.get(f"{base}/env_test", timeout=30)
    assert env.status_code == 200 and env.text == f"value for {image}"
    mount = httpx.get(f"{base}/mount_test", timeout=30)
    assert mount.status_code == 200 and mount.text == f"data for {image}\n"
    client.instances.delete(instance, force=True)
    return logs


def services_of(api: TestClient) -> Services:
    """The services behind an in-process app, to read or arrange what the API cannot."""
    services: Services = api.app.state.services  # type: ignore[attr-defined]
    return services


def image_meta(provider: str = "qemu", **fields: object) -> ImageMeta:
    return ImageMeta.model_validate({"provider": provider, "digest": "sha256:" + "0" * 64, **fields})


def instance_meta(image_id: str = "i" * 32, provider: str = "qemu", **fields: object) -> InstanceMeta:
    spec = LaunchSpec(image_id=image_id, memory_mb=128)
    return InstanceMeta.model_validate({"provider": provider, "spec": spec, **fields})


def volume_meta(provider: str = "qemu", fs_type: str = "ext2", mount: str | None = None) -> VolumeMeta:
    return VolumeMeta(provider=provider, fs_type=fs_type, mount=mount)


@pytest.fixture
def api(data_dir: Path) -> Iterator[TestClient]:
    """The real app in-process (same services, providers and store as the daemon)."""
    from unik.daemon import build_app

    with TestClient(build_app(data_dir), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def daemon(data_dir: Path) -> Iterator[Daemon]:
    running = Daemon(data_dir, free_port())
    running.start()
    yield running
    running.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[UnikClient]:
    with UnikClient(daemon.host) as c:
        yield c


# -- the providers that boot VMs on this machine, for tests that run on each ------------------


@dataclass
class Backend:
    """A daemon running instances with `provider`, and where the VM of an instance is."""

    provider: str
    daemon: Daemon
    client: UnikClient
    host: LibvirtHost | None = None

    def vm_pid(self, instance_id: str) -> int:
        if self.host is None:
            return int((self.daemon.data_dir / "instances" / instance_id / "qemu.pid").read_text())
        for pid in self.host.qemu_pids():
            with contextlib.suppress(OSError):
                if f"guest=unik-{instance_id}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        raise AssertionError(f"no qemu of instance {instance_id} on {self.host.uri}")


@pytest.fixture(scope="session")
def libvirt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libvirtd probes qemu's capabilities once for all the tests' hosts."""
    return tmp_path_factory.mktemp("libvirt-cache")


@pytest.fixture(params=["qemu", "libvirt"])
def backend(
    request: pytest.FixtureRequest, data_dir: Path, libvirt_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    host = None
    config = ""
    if request.param == "libvirt":
        if (problem := libvirt_missing()) is not None:
            pytest.skip(problem)
        host = LibvirtHost.start(tmp_path_factory.mktemp("libvirt-host"), cache=libvirt_cache)
        config = (f"providers:\n  libvirt:\n    - {{hosts: ['{host.uri}'], pool_path: /var/lib/libvirt/images/unik,"
                  " poll_interval: 0.3}\n")  # fmt: skip
    running = Daemon(data_dir, free_port())
    try:
        running.start(config)
        with UnikClient(running.host) as client:
            yield Backend(request.param, running, client, host)
    finally:
        running.stop()
        if host is not None:
            host.stop()
