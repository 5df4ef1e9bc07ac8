"""Reachable instances: published ports (user-mode networking) and bridge addresses.

Traffic goes only to 127.0.0.0/8, and to guests inside a network namespace the test itself
created: every bridge, tap, bridged VM and daemon running them lives in such a namespace, and
requests to their addresses are made from inside it (see unik.testing.NetworkNamespace).
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
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, Daemon, folder_tar_gz, free_port, instance_meta, requires_vm
from unik.cli.instances import parse_publish
from unik.client import UnikAPIError, UnikClient
from unik.errors import UnikError
from unik.guest import run_config_cpio
from unik.models import Instance, InstanceState, now_rfc3339
from unik.providers import network
from unik.providers.network import HostNetwork, mac_address, tap_name
from unik.providers.qemu.config import QemuProviderConfig
from unik.store import Record, Store
from unik.testing import NetnsForward, NetworkNamespace, enter_netns, in_netns

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
    assert parse_publish(["18080:8080", "5353:53/udp"]) == [
        {"HostPort": 18080, "GuestPort": 8080, "Protocol": "tcp"},
        {"HostPort": 5353, "GuestPort": 53, "Protocol": "udp"},
    ]
    for bad in ("8080", "a:b", ":80", "80:"):
        with pytest.raises(ValueError):
            parse_publish([bad])


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
    store.instances.insert(Record(recorded, instance_meta()))
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


# -- bridge networking: each test in a network namespace of its own ---------------------------------


@pytest.fixture
def netns() -> Iterator[NetworkNamespace]:
    """A fresh namespace; at teardown whatever still runs in it is killed and it is removed,
    with the bridge and taps in it. Skips where one cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("bridge networking needs root and iproute2")
    try:
        space = NetworkNamespace.create()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a network namespace here: {getattr(exc, 'stderr', None) or exc}")
    try:
        yield space
    finally:
        space.delete()


def _bridge_config(bridge: str = "unikbr0", subnet: str = "10.213.7.0/24") -> QemuProviderConfig:
    return QemuProviderConfig(network="bridge", bridge=bridge, subnet=subnet)


def _link(netns: NetworkNamespace, name: str) -> dict[str, Any] | None:
    shown = netns.ip("-d", "-j", "addr", "show", "dev", name, check=False)
    return json.loads(shown.stdout)[0] if shown.returncode == 0 else None


def _addresses(netns: NetworkNamespace, name: str) -> list[str]:
    link = _link(netns, name) or {}
    return sorted(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a["family"] == "inet")


def _links_on(netns: NetworkNamespace, bridge: str) -> list[str]:
    shown = netns.ip("-j", "link", "show", "master", bridge, check=False)
    return sorted(link["ifname"] for link in json.loads(shown.stdout or "[]")) if shown.returncode == 0 else []


def _on_the_host(name: str) -> bool:
    """Whether the host's own namespace (this thread's) has an interface `name`."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _assert_bridge_ready(netns: NetworkNamespace, bridge: str, gateway: str) -> None:
    link = _link(netns, bridge)
    assert link is not None
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in link["flags"]
    assert _addresses(netns, bridge) == [gateway]


def _at_once(netns: NetworkNamespace, calls: list[Callable[[], object]]) -> list[BaseException]:
    """Run the calls together inside the namespace, released at the same instant; their failures."""
    start = threading.Barrier(len(calls))
    failures: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            enter_netns(netns.name)
            start.wait()
            call()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def test_bridge_is_set_up_on_first_launch_and_then_reused(netns: NetworkNamespace) -> None:
    config = _bridge_config()
    first = HostNetwork(config)
    a, b, c = ("a" * 32, "b" * 32, "c" * 32)
    in_netns(netns.name, first.prepare, a)
    _assert_bridge_ready(netns, "unikbr0", "10.213.7.1/24")
    assert _links_on(netns, "unikbr0") == [tap_name(a)]
    assert not _on_the_host("unikbr0") and not _on_the_host(tap_name(a))
    # The next launch, and another daemon sharing the bridge, find it ready and leave it so.
    in_netns(netns.name, first.prepare, b)
    in_netns(netns.name, HostNetwork(config).prepare, c)
    _assert_bridge_ready(netns, "unikbr0", "10.213.7.1/24")
    assert _links_on(netns, "unikbr0") == sorted(tap_name(i) for i in (a, b, c))
    in_netns(netns.name, first.release, b)
    assert _links_on(netns, "unikbr0") == sorted(tap_name(i) for i in (a, c))
    in_netns(netns.name, first.release, b)  # twice is fine


def test_a_bridge_already_there_with_its_address_is_taken_as_it_is(netns: NetworkNamespace) -> None:
    netns.ip("link", "add", "name", "unikbr0", "type", "bridge")
    netns.ip("addr", "add", "10.213.7.1/24", "dev", "unikbr0")  # and left down
    in_netns(netns.name, HostNetwork(_bridge_config()).prepare, "a" * 32)
    _assert_bridge_ready(netns, "unikbr0", "10.213.7.1/24")
    assert _links_on(netns, "unikbr0") == [tap_name("a" * 32)]


@pytest.mark.parametrize(
    "stale",
    [None, network._Link(kind="bridge", addresses=frozenset(), up=False)],
    ids=["bridge-created-since", "address-assigned-since"],
)
def test_work_another_daemon_did_since_we_looked_is_not_an_error(
    netns: NetworkNamespace, monkeypatch: pytest.MonkeyPatch, stale: network._Link | None
) -> None:
    # Another daemon's first boot got there between our look and our step: we act on a view
    # that no longer holds, and the bridge's `link add` or the address's assignment finds it done.
    netns.ip("link", "add", "name", "unikbr0", "type", "bridge")
    netns.ip("addr", "add", "10.213.7.1/24", "dev", "unikbr0")
    looks: list[str] = []
    real = network._link_state

    def first_look_is_stale(name: str) -> network._Link | None:
        looks.append(name)
        return stale if len(looks) == 1 else real(name)

    monkeypatch.setattr(network, "_link_state", first_look_is_stale)
    in_netns(netns.name, HostNetwork(_bridge_config()).prepare, "a" * 32)
    _assert_bridge_ready(netns, "unikbr0", "10.213.7.1/24")
    assert _links_on(netns, "unikbr0") == [tap_name("a" * 32)]


def test_first_boots_of_several_daemons_at_once_share_one_bridge(netns: NetworkNamespace) -> None:
    for round_ in range(5):
        bridge = f"unikbr{round_}"
        config = _bridge_config(bridge, f"10.213.{round_}.0/24")
        # One HostNetwork per daemon: their locks do not see each other, as in separate processes.
        daemons = [HostNetwork(config) for _ in range(4)]
        ids = [secrets.token_hex(16) for _ in daemons]
        failures = _at_once(netns, [lambda d=d, i=i: d.prepare(i) for d, i in zip(daemons, ids, strict=True)])
        assert failures == []
        _assert_bridge_ready(netns, bridge, f"10.213.{round_}.1/24")
        assert _links_on(netns, bridge) == sorted(tap_name(i) for i in ids)


def test_a_name_taken_by_another_kind_of_interface_is_a_clear_error(netns: NetworkNamespace) -> None:
    netns.ip("tuntap", "add", "dev", "unikbr0", "mode", "tap")
    with pytest.raises(UnikError, match=r"bridge unikbr0 .*exists and is not a bridge \(a tun interface\)"):
        in_netns(netns.name, HostNetwork(_bridge_config()).prepare, "a" * 32)
    # Nothing half-made is left: no tap, the interface untouched.
    link = _link(netns, "unikbr0")
    assert link is not None and link["linkinfo"]["info_kind"] == "tun"
    assert _addresses(netns, "unikbr0") == []
    assert _link(netns, tap_name("a" * 32)) is None


def test_a_gateway_address_held_by_another_interface_is_a_clear_error(netns: NetworkNamespace) -> None:
    netns.ip("link", "add", "name", "other0", "type", "bridge")
    netns.ip("addr", "add", "10.213.7.1/16", "dev", "other0")
    with pytest.raises(UnikError, match=r"gateway 10.213.7.1 is already an address of other0: give this daemon"):
        in_netns(netns.name, HostNetwork(_bridge_config()).prepare, "a" * 32)
    assert _addresses(netns, "unikbr0") == [] and _addresses(netns, "other0") == ["10.213.7.1/16"]
    assert _link(netns, tap_name("a" * 32)) is None


def test_a_bridge_the_host_refuses_is_a_clear_error(netns: NetworkNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel's refusal (no CAP_NET_ADMIN, no bridge driver) as `ip` reports it.
    real = network._run_ip

    def refused(*args: str) -> subprocess.CompletedProcess[str]:
        if args[:2] == ("link", "add"):
            return subprocess.CompletedProcess(["ip", *args], 2, "", "RTNETLINK answers: Operation not permitted\n")
        return real(*args)

    monkeypatch.setattr(network, "_run_ip", refused)
    with pytest.raises(UnikError, match=r"^network: cannot set up bridge unikbr0 for 10.213.7.0/24: ip link add "
                       r"name unikbr0 type bridge failed: RTNETLINK answers: Operation not permitted$"):  # fmt: skip
        in_netns(netns.name, HostNetwork(_bridge_config()).prepare, "a" * 32)
    assert _link(netns, tap_name("a" * 32)) is None


def test_without_iproute2_bridge_mode_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UnikError, match="cannot run iproute2's `ip`"):
        network._ip("link", "show")
    with pytest.raises(ValueError, match="network: bridge needs"):
        HostNetwork(_bridge_config())


def guest_get(netns: NetworkNamespace, address: str, path: str) -> httpx.Response:
    """GET from the app of a guest on the namespace's bridge, connecting from inside the namespace."""
    with NetnsForward(netns.name, (address, 8080)) as forward:
        return fetch(f"http://127.0.0.1:{forward.port}{path}")


def _bridge_daemon(data_dir: Path, netns: NetworkNamespace, bridge: str, subnet: IPv4Network) -> Daemon:
    """A started daemon in bridge mode inside the test's namespace (so are its bridge, taps and
    VMs), its API forwarded to 127.0.0.1 here. The netns fixture ends its VMs and the namespace."""
    config = f"providers:\n  qemu:\n    network: bridge\n    bridge: {bridge}\n    subnet: {subnet}\n"
    running = Daemon(data_dir, free_port(), netns=netns.name)
    running.start(config)
    return running


@pytest.fixture
def bridge_daemon(data_dir: Path, netns: NetworkNamespace) -> Iterator[tuple[Daemon, str, IPv4Network]]:
    bridge, subnet = "unikbr0", IPv4Network("10.213.7.0/24")
    running = _bridge_daemon(data_dir, netns, bridge, subnet)
    try:
        yield running, bridge, subnet
    finally:
        running.stop()


@requires_vm
def test_a_bridge_that_cannot_be_set_up_fails_the_run_with_its_reason(data_dir: Path, netns: NetworkNamespace) -> None:
    netns.ip("tuntap", "add", "dev", "unikbr0", "mode", "tap")
    daemon = _bridge_daemon(data_dir, netns, "unikbr0", IPv4Network("10.213.7.0/24"))
    try:
        with UnikClient(daemon.host) as client:
            client.images.build("web", EXAMPLES / "c-http", "linux", "c", "qemu")
            with pytest.raises(UnikAPIError) as failed:
                client.instances.run("a", "web")
            assert failed.value.status_code == 500
            assert failed.value.message.startswith("network: cannot set up bridge unikbr0 for 10.213.7.0/24: ")
            assert "is not a bridge" in failed.value.message
    finally:
        daemon.stop()
    assert qemu_pids(data_dir) == []
    assert "Traceback" not in (data_dir / "daemon.log").read_text()


@pytest.mark.vm
@requires_vm
def test_bridge_addresses_are_real_unique_and_survive_restart(
    bridge_daemon: tuple[Daemon, str, IPv4Network], netns: NetworkNamespace
) -> None:
    daemon, bridge, subnet = bridge_daemon
    with UnikClient(daemon.host) as client:
        client.images.build("web", EXAMPLES / "c-http", "linux", "c", "qemu")
        a = client.instances.run("a", "web", env={"KEY": "alpha"})
        b = client.instances.run("b", "web", env={"KEY": "beta"})
        assert _link(netns, bridge) is not None and not _on_the_host(bridge)
        assert _links_on(netns, bridge) == sorted([tap_name(a.Id), tap_name(b.Id)])
        addresses = {a.IpAddress, b.IpAddress}
        assert len(addresses) == 2
        assert all(IPv4Address(ip) in subnet and IPv4Address(ip) != next(subnet.hosts()) for ip in addresses)
        assert guest_get(netns, a.IpAddress, "/env_test").text == "alpha"
        assert guest_get(netns, b.IpAddress, "/ping_test").json() == {"message": "pong"}
        # Ports are a user-mode feature: a bridge provider declares it cannot publish them.
        with pytest.raises(UnikAPIError) as refused:
            client.instances.run("c", "web", ports=[{"HostPort": free_port(), "GuestPort": 8080}])
        assert refused.value.status_code == 501
        assert "publish" in str(refused.value)

    daemon.kill()  # kill -9: the VMs and their taps must outlive it
    assert _links_on(netns, bridge) == sorted([tap_name(a.Id), tap_name(b.Id)])
    daemon.start()
    with UnikClient(daemon.host) as client:
        assert client.instances.get("a").IpAddress == a.IpAddress
        assert client.instances.get("b").IpAddress == b.IpAddress
        assert guest_get(netns, a.IpAddress, "/env_test").text == "alpha"
        c = client.instances.run("c", "web")
        assert c.IpAddress not in addresses
        # Stop removes the tap but the address stays with the instance across start.
        client.instances.stop("a")
        assert tap_name(a.Id) not in _links_on(netns, bridge)
        client.instances.start("a")
        assert client.instances.get("a").IpAddress == a.IpAddress
        assert guest_get(netns, a.IpAddress, "/env_test").text == "alpha"
        # A VM that ends on its own: the monitor notices and removes its tap.
        os.kill(qemu_pids_of(daemon.data_dir, b.Id), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tap_name(b.Id) in _links_on(netns, bridge) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tap_name(b.Id) not in _links_on(netns, bridge)
        assert client.instances.get("b").State == "stopped"
        # Delete releases the address: the next instance gets it back.
        client.instances.delete("b", force=True)
        d = client.instances.run("d", "web")
        assert d.IpAddress == b.IpAddress
        for name in ("a", "c", "d"):
            client.instances.delete(name, force=True)
        assert _links_on(netns, bridge) == []


def qemu_pids_of(data_dir: Path, instance_id: str) -> int:
    return int((data_dir / "instances" / instance_id / "qemu.pid").read_text())
