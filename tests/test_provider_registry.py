"""A provider kind added through the registry alone: a config model and a class, no other edit,
and the whole API (build, run, logs, stop, start, delete) works with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import hello_tgz  # noqa: F401 - a fixture
from unik.kernel import Kernel
from unik.models import LaunchSpec
from unik.providers import registry
from unik.providers.base import Provider, ProviderConfig


class ToyConfig(ProviderConfig):
    greeting: str = "hello"


class ToyProvider(Provider):
    """Its "VMs" are lines in a console file: just enough to be a provider."""

    name = "toy"
    infrastructure = "TOY"

    def __init__(self, config: ProviderConfig, context: Any) -> None:
        super().__init__(config, context)
        self.running: set[str] = set()

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "running": len(self.running)}

    def kernel(self) -> Kernel:
        kernel = Kernel("0.0.0-toy", self.context.data_dir / "toy-kernel")
        kernel.modules_dir.mkdir(parents=True, exist_ok=True)
        (kernel.modules_dir / "modules.dep").write_text("")
        kernel.vmlinux.write_bytes(b"toy\n")
        return kernel

    def console_path(self, instance_id: str) -> Path:
        return self.context.data_dir / "toy" / f"{instance_id}.log"

    async def launch(self, instance_id: str, spec: LaunchSpec) -> bool:
        initrd = self.context.artifacts.path(spec.image_id, spec.artifact, "initrd")
        assert isinstance(self.config, ToyConfig)
        path = self.console_path(instance_id)
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as console:
            console.write(f"{self.config.greeting} {spec.env.get('WHO', '')}: {initrd.stat().st_size} bytes\n")
        self.running.add(instance_id)
        return False

    async def stop(self, instance_id: str) -> None:
        self.running.discard(instance_id)

    def alive(self, instance_id: str) -> bool:
        return instance_id in self.running

    async def remove(self, instance_id: str, *, keep_files: bool = False) -> None:
        self.running.discard(instance_id)
        self.console_path(instance_id).unlink(missing_ok=True)


@pytest.fixture
def toy_api(data_dir: Path) -> Iterator[TestClient]:
    from unik.daemon import build_app

    registry.register(registry.ProviderKind("toy", ToyConfig, ToyProvider))
    (data_dir / "daemon-config.yaml").write_text("providers:\n  toy:\n    - greeting: ahoy\n")
    try:
        with TestClient(build_app(data_dir), raise_server_exceptions=False) as client:
            yield client
    finally:
        registry.unregister("toy")


def test_a_toy_provider_added_through_the_registry_runs_the_whole_lifecycle(
    toy_api: TestClient, hello_tgz: bytes  # noqa: F811
) -> None:
    assert toy_api.get("/available_providers").json() == ["toy"]
    assert "linux-c-toy" in toy_api.get("/available_compilers").json()
    assert toy_api.get("/version").json()["providers"]["toy"] == {"name": "toy", "running": 0}
    built = toy_api.post(
        "/images/hello/create?base=linux&lang=c&provider=toy",
        files={"tarfile": ("app.tar.gz", hello_tgz, "application/gzip")},
    )
    assert built.status_code == 201, built.text
    assert built.json()["Infrastructure"] == "TOY"

    ran = toy_api.post("/instances/run", json={"InstanceName": "t1", "ImageName": "hello", "Env": {"WHO": "me"}})
    assert ran.status_code == 201, ran.text
    assert ran.json()["State"] == "running"
    assert toy_api.get("/instances/t1/logs").text.startswith("ahoy me: ")

    assert toy_api.post("/instances/t1/stop").json()["State"] == "stopped"
    assert toy_api.post("/instances/t1/start").json()["State"] == "running"
    assert toy_api.get("/instances/t1/logs").text.count("ahoy me") == 2
    assert toy_api.delete("/instances/t1").status_code == 409  # running: needs force
    assert toy_api.delete("/instances/t1?force=true").status_code == 204
    assert toy_api.delete("/images/hello").status_code == 204
    assert toy_api.get("/instances").json() == [] and toy_api.get("/images").json() == []


def test_what_a_provider_does_not_declare_is_a_501(toy_api: TestClient, hello_tgz: bytes) -> None:  # noqa: F811
    toy_api.post(
        "/images/hello/create?base=linux&lang=c&provider=toy",
        files={"tarfile": ("app.tar.gz", hello_tgz, "application/gzip")},
    )
    ports = {"InstanceName": "p", "ImageName": "hello", "Ports": [{"HostPort": 18123, "GuestPort": 80}]}
    published = toy_api.post("/instances/run", json=ports)
    assert published.status_code == 501
    assert "toy cannot publish host ports" in published.json()["message"]
    debug = toy_api.post("/instances/run", json={"InstanceName": "d", "ImageName": "hello", "DebugMode": True})
    assert debug.status_code == 501 and "debugger" in debug.json()["message"]
    assert toy_api.get("/instances").json() == []

    assert toy_api.post("/instances/run", json={"InstanceName": "r", "ImageName": "hello"}).status_code == 201
    assert toy_api.post("/volumes/v?size=8").status_code == 201
    hot = toy_api.post("/volumes/v/attach/r?mount=/data")
    assert hot.status_code == 501 and "while an instance runs" in hot.json()["message"]
    assert toy_api.get("/volumes/v").json()["Attachment"] == ""
    # Stopped, the volume is only recorded, to be given at the next boot: no hot-plug needed.
    toy_api.post("/instances/r/stop")
    assert toy_api.post("/volumes/v/attach/r?mount=/data").status_code == 202


def test_an_unknown_provider_kind_in_the_config_is_skipped(data_dir: Path) -> None:
    from unik.daemon import build_app

    (data_dir / "daemon-config.yaml").write_text("providers:\n  qemu: [{}]\n  virtualbox: [{name: vb}]\n")
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        assert api.get("/available_providers").json() == ["qemu"]
