"""Each language's examples/<lang>-http built by the real daemon, booted under QEMU, fetched over HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import EXAMPLES, Daemon, free_port, micro_kernel_reads_fw_cfg, requires_vm, wait_for_log
from unik.client import UnikClient
from unik.compilers import CompilerRegistry
from unik.providers.qemu import SHARED_INITRD_MIN_BYTES

pytestmark = [pytest.mark.vm, requires_vm]

# Boot to "listening" under TCG on a busy 2-core host; the JVM and CPython are the slow ones.
BOOT_TIMEOUT = {"go": 60.0, "cpp": 60.0, "rust": 60.0, "python": 90.0, "nodejs": 120.0, "java": 150.0}
AVAILABLE = set(CompilerRegistry(["qemu"]).available())


@pytest.mark.parametrize("lang", list(BOOT_TIMEOUT))
def test_http_example_answers_through_a_published_port(client: UnikClient, daemon: Daemon, lang: str) -> None:
    if f"linux-{lang}-qemu" not in AVAILABLE:
        pytest.skip(f"no {lang} toolchain on this host (`make setup` installs it)")
    image = client.images.build(f"{lang}-http", EXAMPLES / f"{lang}-http", "linux", lang, "qemu")
    assert image.RunSpec.Compiler == f"linux-{lang}-qemu"
    port = free_port()
    instance = client.instances.run(
        f"{lang}-1",
        f"{lang}-http",
        env={"KEY": f"value for {lang}"},
        ports=[{"HostPort": port, "GuestPort": 8080, "Protocol": "tcp"}],
    )
    folder = daemon.data_dir / "instances" / instance.Id
    if (folder / "image.initrd").stat().st_size >= SHARED_INITRD_MIN_BYTES and micro_kernel_reads_fw_cfg():
        # A big image boots its own initrd file; the run config (KEY below) came through fw_cfg.
        assert (folder / "run.cpio").is_file() and not (folder / "boot.initrd").exists()
        assert (folder / "image.initrd").samefile(daemon.data_dir / "images" / image.Id / "initrd")
    else:
        assert (folder / "boot.initrd").is_file() and not (folder / "run.cpio").exists()
    wait_for_log(client, f"{lang}-1", "listening on", BOOT_TIMEOUT[lang])
    base = f"http://127.0.0.1:{port}"
    ping = httpx.get(f"{base}/ping_test", timeout=30)
    assert ping.status_code == 200
    assert ping.json() == {"message": "pong"}
    env = httpx.get(f"{base}/env_test", timeout=30)
    assert env.status_code == 200 and env.text == f"value for {lang}"
    # No volume mounted: the example says so rather than failing the request.
    assert httpx.get(f"{base}/mount_test", timeout=30).status_code == 404
    client.instances.delete(f"{lang}-1", force=True)
