"""Reachable instances: published ports (user-mode networking) and bridge addresses.

Traffic goes only to 127.0.0.0/8 and to the bridge subnet these tests create themselves.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, Daemon, folder_tar_gz, free_port, requires_vm
from unik.cli import _parse_publish
from unik.client import UnikAPIError, UnikClient
from unik.config import QemuProviderConfig
from unik.guest import run_config_cpio
from unik.models import Instance, InstanceState, now_rfc3339
from unik.providers.network import mac_address, tap_name
from unik.store import Record, Store

BOOT_TIMEOUT = 90.0
RUN = "/instances/run"


def fetch(url: str, timeout: float = BOOT_TIMEOUT) -> httpx.Response:
    """GET with retries until the guest answers (it boots after the run call returns)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=5)
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered: {last!r}")


def qemu_pids(data_dir: Path) -> list[int]:
    pids = []
    for pidfile in data_dir.glob("instances/*/qemu.pid"):
        pid = int(pidfile.read_text())
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids


# -- without a VM -----------------------------------------------------------------------------


def test_run_config_net_file() -> None:
    archive = run_config_cpio(env={}, net={"address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns": "10.0.2.3"})
    assert b"unik/run/net" in archive
    assert b"address=10.0.2.15/24\ngateway=10.0.2.2\ndns=10.0.2.3\n" in archive
    assert b"etc/resolv.conf" in archive and b"nameserver 10.0.2.3\n" in archive
    assert b"resolv.conf" not in run_config_cpio(env={}, net={"address": "10.0.2.15/24"})
    assert b"unik/run/net" not in run_config_cpio(env={})
    bad_configs: list[dict[str, str]] = [
        {"address": "10.0.2.15"},
        {"address": "nonsense/24"},
        {"gateway": "10.0.2.2"},
        {"address": "10.0.2.15/24", "dns": "x\nevil=1"},
        {"address": "10.0.2.15/24", "other": "1"},
    ]
    for bad in bad_configs:
        with pytest.raises(ValueError):
            run_config_cpio(env={}, net=bad)


def test_publish_flag_parsing() -> None:
    assert _parse_publish(["18080:8080", "5353:53/udp"]) == [
        {"HostPort": 18080, "GuestPort": 8080, "Protocol": "tcp"},
        {"HostPort": 5353, "GuestPort": 53, "Protocol": "udp"},
    ]
    for bad in ("8080", "a:b", ":80", "80:"):
        with pytest.raises(ValueError):
            _parse_publish([bad])


def test_bridge_config_needs_bridge_and_subnet() -> None:
    with pytest.raises(ValueError, match="bridge"):
        QemuProviderConfig(network="bridge")
    with pytest.raises(ValueError):
        QemuProviderConfig(network="bridge", bridge="name-longer-than-15", subnet="10.1.0.0/24")
    config = QemuProviderConfig(network="bridge", bridge="unik0", subnet="10.77.0.0/24")
    assert config.subnet == IPv4Network("10.77.0.0/24") and str(config.publish_address) == "127.0.0.1"
    assert QemuProviderConfig().network == "user"


def test_mac_and_tap_are_stable_per_instance() -> None:
    instance_id = secrets.token_hex(16)
    assert mac_address(instance_id) == mac_address(instance_id) != mac_address(secrets.token_hex(16))
    # Locally administered, unicast.
    assert int(mac_address(instance_id).split(":")[0], 16) & 0b11 == 0b10
    assert len(tap_name(instance_id)) <= 15


def test_addresses_are_unique_persistent_and_released(tmp_path: Path) -> None:
    hosts = [str(ip) for ip in list(IPv4Network("10.9.0.0/29").hosts())[1:]]
    store = Store(tmp_path / "unik.db")
    first = store.allocate_address("a", iter(hosts))
    second = store.allocate_address("b", iter(hosts))
    assert first != second
    assert store.allocate_address("a", iter(hosts)) == first  # an instance keeps its address
    store.close()
    store = Store(tmp_path / "unik.db")  # a daemon restart
    assert store.allocate_address("a", iter(hosts)) == first
    store.release_address("a")
    assert store.allocate_address("c", iter(hosts)) == first  # released addresses are reused
    for n in range(len(hosts) - 2):
        store.allocate_address(f"more{n}", iter(hosts))
    with pytest.raises(Exception, match="no free address"):
        store.allocate_address("one-too-many", iter(hosts))
    store.close()


def test_a_start_frees_the_addresses_of_instances_no_record_names(tmp_path: Path) -> None:
    hosts = [str(ip) for ip in list(IPv4Network("10.9.0.0/29").hosts())[1:]]
    store = Store(tmp_path / "unik.db")
    recorded = Instance(Id="a" * 32, Name="recorded", State=InstanceState.running.value, IpAddress="",
                        ImageId="img", Infrastructure="QEMU", Created=now_rfc3339())  # fmt: skip
    store.instances.insert(Record(recorded, {}))
    kept = store.allocate_address(recorded.Id, iter(hosts))
    lost = store.allocate_address("b" * 32, iter(hosts))  # its record lost (a restore, a crash)
    store.release_unheld_addresses()
    assert store.allocate_address(recorded.Id, iter(hosts)) == kept
    assert store.allocate_address("c" * 32, iter(hosts)) == lost
    store.close()


def test_bad_ports_are_400(api: TestClient) -> None:
    assert api.post("/images/web/create?base=linux&lang=c&provider=qemu",
                    files={"tarfile": ("a.tgz", folder_tar_gz(EXAMPLES / "c-http"))}).status_code == 201  # fmt: skip
    for ports, fragment in (
        ([{"HostPort": 0, "GuestPort": 80}], "HostPort"),
        ([{"HostPort": 70000, "GuestPort": 80}], "HostPort"),
        ([{"HostPort": 18080, "GuestPort": 65536}], "GuestPort"),
        ([{"HostPort": 18080, "GuestPort": 80, "Protocol": "sctp"}], "Protocol"),
        ([{"HostPort": 18080, "GuestPort": 80}, {"HostPort": 18080, "GuestPort": 81}], "twice"),
    ):
        response = api.post(RUN, json={"InstanceName": "w", "ImageName": "web", "Ports": ports})
        assert response.status_code == 400, response.text
        assert fragment in response.json()["message"]
    assert api.get("/instances").json() == []


def test_openapi_documents_ports(api: TestClient) -> None:
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    assert "Ports" in schemas["RunInstanceRequest"]["properties"]
    assert set(schemas["PortMapping"]["properties"]) == {"HostPort", "GuestPort", "Protocol"}


def test_port_in_use_is_409_before_anything_starts(api: TestClient, data_dir: Path) -> None:
    api.post("/images/web/create?base=linux&lang=c&provider=qemu",
             files={"tarfile": ("a.tgz", folder_tar_gz(EXAMPLES / "c-http"))})  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        body = {"InstanceName": "w", "ImageName": "web", "Ports": [{"HostPort": port, "GuestPort": 8080}]}
        response = api.post(RUN, json=body)
    assert response.status_code == 409, response.text
    assert str(port) in response.json()["message"]
    assert api.get("/instances").json() == []
    assert qemu_pids(data_dir) == []


# -- user-mode networking with published ports --------------------------------------------------


@pytest.mark.vm
@requires_vm
def test_published_port_reaches_the_app(client: UnikClient, daemon: Daemon, tmp_path: Path) -> None:
    client.images.build("web", EXAMPLES / "c-http", "linux", "c", "qemu")
    port = free_port()
    # Through the CLI, as a user types it.
    env = {**os.environ, "UNIK_HOST": daemon.host, "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "unik.cli", "run", "--instanceName", "w1", "--imageName", "web",
         "--env", "KEY=open sesame", "-p", f"{port}:8080"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    instance = client.instances.get("w1")
    assert instance.State == "running"
    # User mode: IpAddress is the host address the published ports listen on.
    assert instance.IpAddress == "127.0.0.1"
    ping = fetch(f"http://127.0.0.1:{port}/ping_test")
    assert ping.status_code == 200 and ping.json() == {"message": "pong"}
    assert fetch(f"http://127.0.0.1:{port}/env_test").text == "open sesame"
    missing = fetch(f"http://127.0.0.1:{port}/mount_test")
    assert missing.status_code == 404 and "data.txt" in missing.json()["message"]

    # Stop frees the port, start takes it again.
    client.instances.stop("w1")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    client.instances.start("w1")
    assert fetch(f"http://127.0.0.1:{port}/ping_test").json() == {"message": "pong"}
    client.instances.delete("w1", force=True)


@pytest.mark.vm
@requires_vm
def test_same_host_port_twice_is_409_and_nothing_left(client: UnikClient, daemon: Daemon) -> None:
    client.images.build("web", EXAMPLES / "c-http", "linux", "c", "qemu")
    port = free_port()
    ports = [{"HostPort": port, "GuestPort": 8080}]
    first = client.instances.run("first", "web", ports=ports)
    pids = qemu_pids(daemon.data_dir)
    assert len(pids) == 1
    with pytest.raises(UnikAPIError) as refused:
        client.instances.run("second", "web", ports=ports)
    assert refused.value.status_code == 409
    assert str(port) in refused.value.message
    assert [i.Name for i in client.instances.list()] == ["first"]
    assert qemu_pids(daemon.data_dir) == pids
    assert not (daemon.data_dir / "instances").exists() or [p.name for p in
        (daemon.data_dir / "instances").iterdir()] == [first.Id]  # fmt: skip
    # The first one is untouched and still serves.
    assert fetch(f"http://127.0.0.1:{port}/ping_test").json() == {"message": "pong"}
    # Another port is fine; the stopped first one no longer holds its port.
    client.instances.stop("first")
    client.instances.run("second", "web", ports=ports)
    assert fetch(f"http://127.0.0.1:{port}/ping_test").json() == {"message": "pong"}
    with pytest.raises(UnikAPIError) as again:
        client.instances.start("first")
    assert again.value.status_code == 409
    assert client.instances.get("first").State == "stopped"


# -- bridge networking -------------------------------------------------------------------------

needs_root_and_ip = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="bridge networking needs root and iproute2"
)


def _links_on(bridge: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show", "master", bridge], capture_output=True, text=True)
    return [link["ifname"] for link in json.loads(out.stdout or "[]")] if out.returncode == 0 else []


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


@pytest.fixture
def bridge_daemon(data_dir: Path) -> Iterator[tuple[Daemon, str, IPv4Network]]:
    bridge = f"unikt{secrets.token_hex(4)}"
    subnet = IPv4Network(f"10.213.{secrets.randbelow(250) + 1}.0/24")
    (data_dir / "daemon-config.yaml").write_text(
        f"providers:\n  qemu:\n    network: bridge\n    bridge: {bridge}\n    subnet: {subnet}\n"
    )
    running = Daemon(data_dir, free_port())
    running.start()
    try:
        yield running, bridge, subnet
    finally:
        running.stop()
        for pid in qemu_pids(data_dir):
            os.kill(pid, signal.SIGKILL)
        for folder in data_dir.glob("instances/*"):
            tap = tap_name(folder.name)
            if _link_exists(tap):
                subprocess.run(["ip", "link", "del", tap], check=False)
        if _link_exists(bridge):
            subprocess.run(["ip", "link", "del", bridge], check=False)


@pytest.mark.vm
@requires_vm
@needs_root_and_ip
def test_bridge_addresses_are_real_unique_and_survive_restart(
    bridge_daemon: tuple[Daemon, str, IPv4Network],
) -> None:
    daemon, bridge, subnet = bridge_daemon
    with UnikClient(daemon.host) as client:
        client.images.build("web", EXAMPLES / "c-http", "linux", "c", "qemu")
        a = client.instances.run("a", "web", env={"KEY": "alpha"})
        b = client.instances.run("b", "web", env={"KEY": "beta"})
        assert _link_exists(bridge)
        assert sorted(_links_on(bridge)) == sorted([tap_name(a.Id), tap_name(b.Id)])
        addresses = {a.IpAddress, b.IpAddress}
        assert len(addresses) == 2
        assert all(IPv4Address(ip) in subnet and IPv4Address(ip) != next(subnet.hosts()) for ip in addresses)
        assert fetch(f"http://{a.IpAddress}:8080/env_test").text == "alpha"
        assert fetch(f"http://{b.IpAddress}:8080/ping_test").json() == {"message": "pong"}
        # Ports are a user-mode feature.
        with pytest.raises(UnikAPIError) as refused:
            client.instances.run("c", "web", ports=[{"HostPort": free_port(), "GuestPort": 8080}])
        assert refused.value.status_code == 400

    daemon.kill()  # kill -9: the VMs and their taps must outlive it
    assert sorted(_links_on(bridge)) == sorted([tap_name(a.Id), tap_name(b.Id)])
    daemon.start()
    with UnikClient(daemon.host) as client:
        assert client.instances.get("a").IpAddress == a.IpAddress
        assert client.instances.get("b").IpAddress == b.IpAddress
        assert fetch(f"http://{a.IpAddress}:8080/env_test").text == "alpha"
        c = client.instances.run("c", "web")
        assert c.IpAddress not in addresses
        # Stop removes the tap but the address stays with the instance across start.
        client.instances.stop("a")
        assert tap_name(a.Id) not in _links_on(bridge)
        client.instances.start("a")
        assert client.instances.get("a").IpAddress == a.IpAddress
        assert fetch(f"http://{a.IpAddress}:8080/env_test").text == "alpha"
        # A VM that ends on its own: the monitor notices and removes its tap.
        os.kill(qemu_pids_of(daemon.data_dir, b.Id), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tap_name(b.Id) in _links_on(bridge) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tap_name(b.Id) not in _links_on(bridge)
        assert client.instances.get("b").State == "stopped"
        # Delete releases the address: the next instance gets it back.
        client.instances.delete("b", force=True)
        d = client.instances.run("d", "web")
        assert d.IpAddress == b.IpAddress
        for name in ("a", "c", "d"):
            client.instances.delete(name, force=True)
        assert _links_on(bridge) == []


def qemu_pids_of(data_dir: Path, instance_id: str) -> int:
    return int((data_dir / "instances" / instance_id / "qemu.pid").read_text())
