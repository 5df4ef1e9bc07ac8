"""An image knows the least memory it boots in: a run below it is a 400 before any VM starts,
and a run at it serves (proven with the biggest runtime, Node.js, in a real VM)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, folder_tar_gz, free_port, requires_vm
from unik.artifacts import initrd_min_memory_mb
from unik.client import UnikClient
from unik.compilers import CompilerRegistry

NODE_AVAILABLE = "linux-nodejs-qemu" in CompilerRegistry(["qemu"]).available()
SERVE_DEADLINE = 180.0


def test_the_minimum_counts_the_initrd_twice_and_the_runtime() -> None:
    assert initrd_min_memory_mb(0, 0) == 48
    mib = 1 << 20
    assert initrd_min_memory_mb(88 * mib, 80) == 16 * -(-(2 * 88 + 40 + 80) // 16)
    assert initrd_min_memory_mb(10 * mib, 0) % 16 == 0


@requires_vm
@pytest.mark.skipif(not NODE_AVAILABLE, reason="no Node.js toolchain (`make setup` installs it)")
def test_too_little_memory_for_a_nodejs_image_is_a_400_and_leaves_nothing(api: TestClient, data_dir: Path) -> None:
    built = api.post("/images/node/create?base=linux&lang=nodejs&provider=qemu",
                     files={"tarfile": ("a.tgz", folder_tar_gz(EXAMPLES / "nodejs-http"))})  # fmt: skip
    assert built.status_code == 201, built.text
    minimum = built.json()["RunSpec"]["MinInstanceMemoryMB"]
    assert minimum > 128
    refused = api.post("/instances/run", json={"InstanceName": "n", "ImageName": "node", "MemoryMb": 128})
    assert refused.status_code == 400
    assert f"minimum of {minimum} MB" in refused.json()["message"]
    assert api.get("/instances").json() == []
    assert not (data_dir / "instances").exists() or list((data_dir / "instances").iterdir()) == []


@pytest.mark.vm
@requires_vm
@pytest.mark.skipif(not NODE_AVAILABLE, reason="no Node.js toolchain (`make setup` installs it)")
def test_a_nodejs_image_serves_at_its_minimum_memory(client: UnikClient) -> None:
    image = client.images.build("node", EXAMPLES / "nodejs-http", "linux", "nodejs", "qemu")
    minimum = image.RunSpec.MinInstanceMemoryMB
    port = free_port()
    client.instances.run("n", "node", memory_mb=minimum, ports=[{"HostPort": port, "GuestPort": 8080}])
    deadline = time.monotonic() + SERVE_DEADLINE
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping_test", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert client.instances.get("n").State == "running", client.instances.logs("n")[-2000:]
        time.sleep(0.5)
    else:
        raise AssertionError(f"no answer at {minimum} MB; console:\n{client.instances.logs('n')[-2000:]}")
    client.instances.delete("n", force=True)
