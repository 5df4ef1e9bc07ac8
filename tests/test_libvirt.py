"""The libvirt provider on two private libvirtd "hosts" reached over qemu+tcp on loopback:
build → images staged on each host through the connection → instances spread by free memory
→ logs read through the connection → stop/start → a restarted daemon re-adopts → a host that
dies: its instance reads unknown, the API still answers, placement skips it → deletion."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, folder_tar_gz, hello_tgz, requires_vm, services_of  # noqa: F401 - hello_tgz is a fixture
from unik.daemon import build_app
from unik.providers.network import free_port
from unik.testing import LibvirtHost, libvirt_missing

# Inside a host's mount namespace /var/lib/libvirt is that host's own folder.
POOL_PATH = "/var/lib/libvirt/images/unik"

pytestmark = [pytest.mark.vm, requires_vm]


@pytest.fixture
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LibvirtHost]]:
    if (problem := libvirt_missing()) is not None:
        pytest.skip(problem)
    cache = tmp_path_factory.mktemp("libvirt-cache")
    started: list[LibvirtHost] = []
    try:
        for name in ("host-a", "host-b"):
            started.append(LibvirtHost.start(tmp_path_factory.mktemp(name), cache=cache))
        yield started
    finally:
        for host in started:
            host.stop()


@contextlib.contextmanager
def libvirt_daemon(data_dir: Path, hosts: list[LibvirtHost]) -> Iterator[TestClient]:
    uris = ", ".join(f"'{h.uri}'" for h in hosts)
    settings = f"hosts: [{uris}], pool_path: {POOL_PATH}, call_timeout: 10, poll_interval: 0.3"
    (data_dir / "daemon-config.yaml").write_text(f"providers:\n  libvirt:\n    - {{{settings}}}\n")
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        yield api


def eventually(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def pool_volumes(host: LibvirtHost) -> set[str]:
    conn = libvirt.open(host.uri)
    try:
        return {v.name() for v in conn.storagePoolLookupByName("unik").listAllVolumes(0)}
    finally:
        conn.close()


def logs(api: TestClient, name: str) -> str:
    return str(api.get(f"/instances/{name}/logs").text)


def test_instances_spread_over_two_hosts_and_survive_what_hosts_do(
    hosts: list[LibvirtHost],
    data_dir: Path,
    hello_tgz: bytes,  # noqa: F811
) -> None:
    with libvirt_daemon(data_dir, hosts) as api:
        built = api.post("/images/hello/create?base=linux&lang=c&provider=libvirt",
                         files={"tarfile": ("a.tgz", hello_tgz)})  # fmt: skip
        assert built.status_code == 201, built.text
        placed = {}
        for name in ("a", "b"):
            body = {"InstanceName": name, "ImageName": "hello", "Env": {"GREETING": name}}
            ran = api.post("/instances/run", json=body)
            assert ran.status_code == 201, ran.text
            placed[name] = ran.json()["Host"]
        assert sorted(placed.values()) == sorted(h.uri for h in hosts)  # one on each: spread by free memory
        for name in ("a", "b"):
            eventually(lambda name=name: f"hello from unik: {name}" in logs(api, name))
        image_id = built.json()["Id"]
        for host in hosts:  # staged on each host through its connection, once
            assert {f"img-{image_id}-kernel", f"img-{image_id}-initrd"} <= pool_volumes(host)

        assert api.post("/instances/a/stop").status_code == 200
        assert api.get("/instances/a").json()["State"] == "stopped"
        assert api.post("/instances/a/start").status_code == 200
        eventually(lambda: logs(api, "a").count("hello from unik: a") == 2)

    # A new daemon finds both domains by their metadata, and reads their consoles again.
    with libvirt_daemon(data_dir, hosts) as api:
        assert sorted((i["Name"], i["State"]) for i in api.get("/instances").json()) == [
            ("a", "running"), ("b", "running")
        ]  # fmt: skip
        eventually(lambda: "tick" in logs(api, "b").rsplit("hello from unik: b", 1)[-1])

        down = next(h for h in hosts if h.uri == placed["b"])
        down.kill()
        started = time.monotonic()
        # It may run or not: nobody can tell while its host does not answer.
        eventually(lambda: api.get("/instances/b").json()["State"] == "unknown", timeout=30)
        assert time.monotonic() - started < 30  # no API call waits on the dead host
        refused = api.post("/instances/b/start")
        assert refused.status_code == 409 and "does not answer" in refused.json()["message"]
        # The next run goes where a host still answers.
        ran = api.post("/instances/run", json={"InstanceName": "c", "ImageName": "hello"})
        assert ran.status_code == 201, ran.text
        assert ran.json()["Host"] == placed["a"]

        for name in ("a", "c"):
            assert api.delete(f"/instances/{name}?force=true").status_code == 204
        assert api.delete("/instances/b?force=true").status_code == 204
        assert api.delete("/images/hello").status_code == 204
        alive = next(h for h in hosts if h.uri == placed["a"])
        assert pool_volumes(alive) == set()  # the image's files and the runs' archives are gone


def test_published_ports_and_volumes_at_boot_and_hot_plugged(
    hosts: list[LibvirtHost], data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "data.txt").write_text("on a libvirt host\n")
    with libvirt_daemon(data_dir, hosts[:1]) as api:
        built = api.post("/images/web/create?base=linux&lang=c&provider=libvirt&mounts=/data",
                         files={"tarfile": ("a.tgz", folder_tar_gz(EXAMPLES / "c-http"))})  # fmt: skip
        assert built.status_code == 201, built.text
        made = api.post("/volumes/data?provider=libvirt", files={"tarfile": ("d.tgz", folder_tar_gz(folder))})
        assert made.status_code == 201, made.text
        port = free_port()
        body = {"InstanceName": "w", "ImageName": "web", "Mounts": {"/data": "data"},
                "Ports": [{"HostPort": port, "GuestPort": 8080}]}  # fmt: skip
        ran = api.post("/instances/run", json=body)
        assert ran.status_code == 201, ran.text
        assert ran.json()["IpAddress"] == "127.0.0.1"
        url = f"http://127.0.0.1:{port}/mount_test"
        eventually(lambda: fetch(url) == (200, "on a libvirt host\n"))

        # Hot: the guest unmounts, the disk goes (its data back to the daemon), and comes again.
        assert api.post("/volumes/data/detach").status_code == 202
        assert fetch(url)[0] == 404
        assert api.post("/volumes/data/attach/w?mount=/data").status_code == 202
        assert fetch(url) == (200, "on a libvirt host\n")
        assert api.post("/instances/w/stop").status_code == 200
        assert api.delete("/instances/w").status_code == 204

        # Debug mode: the domain waits, halted, for gdb on the host.
        ran = api.post("/instances/run", json={"InstanceName": "d", "ImageName": "web", "DebugMode": True,
                                               "Mounts": {"/data": "data"}})  # fmt: skip
        assert ran.status_code == 201, ran.text
        provider = services_of(api).ctx.providers["libvirt"]
        gdb_port = provider.debug_port(ran.json()["Id"])
        assert gdb_port is not None
        with socket.create_connection(("127.0.0.1", gdb_port), timeout=5):
            pass
        assert api.delete("/instances/d?force=true").status_code == 204
        assert api.delete("/volumes/data").status_code == 204
        assert api.delete("/images/web").status_code == 204
        assert pool_volumes(hosts[0]) == set()


def fetch(url: str) -> tuple[int, str]:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return 0, ""
    return response.status_code, response.text


def test_domain_type_auto_probes_kvm_and_falls_back_to_qemu(
    hosts: list[LibvirtHost],
    data_dir: Path,
    hello_tgz: bytes,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """This machine has no usable KVM (a host may still advertise it): the probe domain does
    not boot under kvm, so the host runs qemu (TCG) domains."""
    caplog.set_level("INFO", logger="unik.providers.libvirt.provider")
    uri = hosts[0].uri
    settings = f"hosts: ['{uri}'], pool_path: {POOL_PATH}, domain_type: auto, probe_timeout: 5"
    (data_dir / "daemon-config.yaml").write_text(f"providers:\n  libvirt:\n    - {{{settings}}}\n")
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        built = api.post("/images/hello/create?base=linux&lang=c&provider=libvirt",
                         files={"tarfile": ("a.tgz", hello_tgz)})  # fmt: skip
        assert built.status_code == 201, built.text
        body = {"InstanceName": "t", "ImageName": "hello", "Env": {"GREETING": "tcg"}}
        assert api.post("/instances/run", json=body).status_code == 201
        assert f"libvirt host {uri} runs domains of type qemu" in caplog.text
        eventually(lambda: "hello from unik: tcg" in logs(api, "t"))
        assert api.delete("/instances/t?force=true").status_code == 204


def test_a_domain_no_record_names_is_removed_at_start(
    hosts: list[LibvirtHost],
    data_dir: Path,
    hello_tgz: bytes,  # noqa: F811
) -> None:
    """As on qemu: a record lost (a store restored from a backup) must not leave its domain
    running unseen on a host for good."""
    with libvirt_daemon(data_dir, hosts[:1]) as api:
        built = api.post("/images/hello/create?base=linux&lang=c&provider=libvirt",
                         files={"tarfile": ("a.tgz", hello_tgz)})  # fmt: skip
        assert built.status_code == 201, built.text
        kept = api.post("/instances/run", json={"InstanceName": "kept", "ImageName": "hello"}).json()
        lost = api.post("/instances/run", json={"InstanceName": "lost", "ImageName": "hello"}).json()
        services_of(api).ctx.store.instances.delete(lost["Id"])  # the record goes, the domain runs on

    with libvirt_daemon(data_dir, hosts[:1]) as api:
        assert [i["Name"] for i in api.get("/instances").json()] == ["kept"]
        eventually(lambda: domain_names(hosts[0]) == {f"unik-{kept['Id']}"})
        assert api.delete("/instances/kept?force=true").status_code == 204


def domain_names(host: LibvirtHost) -> set[str]:
    conn = libvirt.open(host.uri)
    try:
        return {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()
