"""The image hub against a real S3 server over HTTP (moto's server, in this process, with IAM auth on)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml
from botocore.config import Config
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

from tests.conftest import EXAMPLES, Daemon, folder_tar_gz, free_port, micro_kernel_reads_fw_cfg, requires_vm
from tests.test_e2e import wait_for
from unik.artifacts import artifact_digest
from unik.client import UnikAPIError, UnikClient
from unik.models import Artifact, HubConfig, Image, ImageMeta, ImageRunSpec, now_rfc3339
from unik.store import Record, Store

BUCKET = "unik-hub"  # the daemon's default


@dataclass
class S3Hub:
    url: str
    hub: HubConfig

    def s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.hub.user,
            aws_secret_access_key=self.hub.password,
            config=Config(s3={"addressing_style": "path"}),
        )

    def key(self, image: str) -> str:
        return f"{self.hub.user}/{image}/latest"


@pytest.fixture(scope="module")
def s3_hub() -> Iterator[S3Hub]:
    """moto's S3 server with IAM auth: only the user created here, with its secret, gets in."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    iam = boto3.client(
        "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
    )
    # moto keeps its state for the whole test process: another module's hub has its own user.
    user = f"hubuser-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="hub", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    # From here on every request must be signed by a known key with the right secret.
    httpx.post(f"{url}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        yield S3Hub(url, HubConfig(url=url, user=key["AccessKeyId"], password=key["SecretAccessKey"]))
    finally:
        httpx.post(f"{url}/moto-api/reset-auth", content=b"inf")
        server.stop()


def plant_image(data_dir: Path, name: str, initrd_bytes: int) -> Image:
    """An image record and files as a build leaves them, without compiling (no toolchain or VM needed)."""
    image_id = uuid.uuid4().hex
    folder = data_dir / "images" / image_id
    folder.mkdir(parents=True)
    (folder / "kernel").write_bytes(os.urandom(1 << 20))
    with open(folder / "initrd", "wb") as f:
        for _ in range(initrd_bytes >> 20):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(initrd_bytes % (1 << 20)))
    digest, size = artifact_digest(folder, Artifact())
    image = Image(
        Id=image_id,
        Name=name,
        SizeMb=-(-size // (1 << 20)),
        Infrastructure="QEMU",
        Created=now_rfc3339(),
        RunSpec=ImageRunSpec(Compiler="linux-c-qemu"),
    )
    meta = ImageMeta(provider="qemu", compiler="linux-c-qemu", kernel_version="test", digest=digest)
    store = Store(data_dir / "unik.db")
    try:
        store.images.insert(Record(image, meta))
    finally:
        store.close()
    return image


def image_files(data_dir: Path, image_id: str) -> dict[str, bytes]:
    return {name: (data_dir / "images" / image_id / name).read_bytes() for name in ("kernel", "initrd")}


def status_of(call: Any) -> int:
    with pytest.raises(UnikAPIError) as failure:
        call()
    return failure.value.status_code


def nothing_left(client: UnikClient, daemon: Daemon, name: str) -> None:
    assert name not in [i.Name for i in client.images.list()]
    assert list((daemon.data_dir / "tmp").iterdir()) == []
    known = {i.Id for i in client.images.list()}
    assert {p.name for p in (daemon.data_dir / "images").iterdir()} == known


def test_push_delete_pull_keeps_the_image_exactly(client: UnikClient, daemon: Daemon, s3_hub: S3Hub) -> None:
    image = plant_image(daemon.data_dir, "planted", 3 << 20)
    original = image_files(daemon.data_dir, image.Id)
    client.images.push("planted", s3_hub.hub)
    head = s3_hub.s3().head_object(Bucket=BUCKET, Key=s3_hub.key("planted"))
    assert head["Metadata"]["unik-format"] == "1" and head["Metadata"]["unik-provider"] == "qemu"
    # The hub is shared: other users' images (from other test modules) may be listed too.
    mine = [(i.Name, i.User) for i in client.hub.search(s3_hub.hub) if i.User == s3_hub.hub.user]
    assert mine == [("planted", s3_hub.hub.user)]

    client.images.delete("planted")
    client.images.pull("planted", s3_hub.hub, provider="qemu")
    pulled = client.images.get("planted")
    assert pulled.Id != image.Id
    assert pulled.model_dump(exclude={"Id"}) == image.model_dump(exclude={"Id"})
    assert image_files(daemon.data_dir, pulled.Id) == original
    assert list((daemon.data_dir / "tmp").iterdir()) == []

    # Onto an existing name only with force; the replaced image's files go.
    assert status_of(lambda: client.images.pull("planted", s3_hub.hub, provider="qemu")) == 409
    client.images.pull("planted", s3_hub.hub, provider="qemu", force=True)
    again = client.images.get("planted")
    assert again.Id != pulled.Id and not (daemon.data_dir / "images" / pulled.Id).exists()
    assert status_of(lambda: client.images.pull("other", s3_hub.hub, provider="nope")) == 400
    assert client.hub.transfers() == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_object_leaves_no_image(client: UnikClient, daemon: Daemon, s3_hub: S3Hub, damage: str) -> None:
    name = f"corrupt-{damage}"
    plant_image(daemon.data_dir, name, 2 << 20)
    client.images.push(name, s3_hub.hub)
    client.images.delete(name)
    # Tamper through the S3 API, keeping the metadata: only the content check can notice.
    s3 = s3_hub.s3()
    stored = s3.get_object(Bucket=BUCKET, Key=s3_hub.key(name))
    body = bytearray(stored["Body"].read())
    if damage == "flip":
        body[len(body) // 2] ^= 0xFF
    else:
        del body[len(body) // 2 :]
    s3.put_object(Bucket=BUCKET, Key=s3_hub.key(name), Body=bytes(body), Metadata=stored["Metadata"])

    with pytest.raises(UnikAPIError) as failure:
        client.images.pull(name, s3_hub.hub, provider="qemu")
    assert failure.value.status_code == 502
    assert "corrupt" in failure.value.message
    nothing_left(client, daemon, name)


def test_wrong_password_is_a_clear_4xx(client: UnikClient, daemon: Daemon, s3_hub: S3Hub) -> None:
    plant_image(daemon.data_dir, "secret", 1 << 20)
    client.images.push("secret", s3_hub.hub)
    wrong = s3_hub.hub.model_copy(update={"password": "not-the-secret"})
    for call in (
        lambda: client.images.push("secret", wrong),
        lambda: client.images.pull("secret-copy", wrong, provider="qemu"),
        lambda: client.images.remote_delete("secret", wrong),
        lambda: client.hub.search(wrong),
    ):
        with pytest.raises(UnikAPIError) as failure:
            call()
        assert failure.value.status_code in (401, 403), failure.value
        assert "hub" in failure.value.message and "Traceback" not in failure.value.message
    nothing_left(client, daemon, "secret-copy")
    # The image on the hub is untouched.
    s3_hub.s3().head_object(Bucket=BUCKET, Key=s3_hub.key("secret"))


def test_remote_delete_then_pull_is_404(client: UnikClient, daemon: Daemon, s3_hub: S3Hub) -> None:
    plant_image(daemon.data_dir, "doomed", 1 << 20)
    client.images.push("doomed", s3_hub.hub)
    client.images.remote_delete("doomed", s3_hub.hub)
    assert "doomed" not in [i.Name for i in client.hub.search(s3_hub.hub)]
    assert status_of(lambda: client.images.pull("doomed-copy", s3_hub.hub, provider="qemu")) == 404
    assert status_of(lambda: client.images.remote_delete("doomed", s3_hub.hub)) == 404
    assert status_of(lambda: client.images.pull("never-pushed", s3_hub.hub, provider="qemu")) == 404
    # The local image is not what remote-delete deletes.
    assert client.images.get("doomed").Name == "doomed"


def test_hub_request_errors(api: TestClient) -> None:
    def post(path: str, hub: dict[str, str]) -> httpx.Response:
        return api.post(path, content=json.dumps(hub))

    good = {"URL": "http://127.0.0.1:1", "Username": "u", "Password": "p"}
    assert post("/images/push/nope", good).status_code == 404
    assert post("/images/pull/x", good).status_code == 400  # provider is required
    assert post("/images/pull/x?provider=nope", good).status_code == 400
    for path in ("/images/pull/x?provider=qemu", "/images/remote-delete/x", "/hub/search"):
        unreachable = post(path, good)
        assert unreachable.status_code == 502, unreachable.text
        assert "127.0.0.1:1" in unreachable.json()["message"]
        for url in ("", "not a url", "ftp://hub", "http://"):
            assert post(path, {**good, "URL": url}).status_code == 400
        assert post(path, {"url": good["URL"], "user": "u"}).status_code == 400  # no password
    assert api.get("/hub/transfers").json() == []


def test_configured_bucket_region_and_key_layout(data_dir: Path, s3_hub: S3Hub) -> None:
    from unik.daemon import build_app

    layout = {"hub": {"bucket": "team-images", "region": "eu-west-1", "key": "unik/{image}.tar"}}
    (data_dir / "daemon-config.yaml").write_text(json.dumps(layout))  # YAML is a superset of JSON
    body = json.dumps({"url": s3_hub.url, "user": s3_hub.hub.user, "pass": s3_hub.hub.password})
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        plant_image(data_dir, "laid-out", 1 << 20)
        assert api.post("/images/push/laid-out", content=body).status_code == 202
        s3 = s3_hub.s3()
        assert s3.get_bucket_location(Bucket="team-images")["LocationConstraint"] == "eu-west-1"
        s3.head_object(Bucket="team-images", Key="unik/laid-out.tar")
        assert [(i["Name"], i["User"]) for i in api.post("/hub/search", content=body).json()] == [("laid-out", "")]
        pulled = api.post("/images/pull/laid-out?provider=qemu&force=true", content=body)
        assert pulled.status_code == 202 and pulled.json()["Name"] == "laid-out"


def test_hub_settings_are_validated() -> None:
    from unik.config import DaemonConfig, HubSettings

    assert DaemonConfig().hub == HubSettings(bucket="unik-hub", region="us-east-1", key="{user}/{image}/latest")
    for key in ("{user}/latest", "{user}/{image}/{tag}"):
        with pytest.raises(ValueError):
            HubSettings(key=key)


def test_cli_login_push_search_pull(daemon: Daemon, s3_hub: S3Hub, tmp_path: Path) -> None:
    plant_image(daemon.data_dir, "by-cli", 20 << 20)
    env = {**os.environ, "UNIK_HOST": daemon.host, "HOME": str(tmp_path)}

    def unik(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "unik.cli", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"unik {' '.join(args)}: {done.stderr}"
        return done.stdout

    unik("login", "--url", s3_hub.url, "--user", s3_hub.hub.user, "--pass", s3_hub.hub.password)
    saved = yaml.safe_load((tmp_path / ".unik" / "hub-config.yaml").read_text())
    assert saved == {"url": s3_hub.url, "user": s3_hub.hub.user, "pass": s3_hub.hub.password}
    pushed = unik("push", "--image", "by-cli")
    # The size and rate come from the daemon's progress reports, which a quick push may finish before.
    assert re.fullmatch(r"pushed image by-cli( \(\d+\.\d MB in [\d.]+ s, [\d.]+ MB/s\))?\n", pushed), pushed
    assert "by-cli" in unik("search")
    assert "pulled image by-cli" in unik("pull", "--image", "by-cli", "--provider", "qemu", "--force")
    assert "deleted image by-cli from the hub" in unik("remote-delete", "--image", "by-cli")


def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def test_200mb_round_trip_in_bounded_memory(client: UnikClient, daemon: Daemon, s3_hub: S3Hub) -> None:
    assert daemon.process is not None
    pid = daemon.process.pid
    # A small round trip first, so the figures measure transfers, not loading boto3.
    plant_image(daemon.data_dir, "warmup", 1 << 20)
    client.images.push("warmup", s3_hub.hub)
    client.images.pull("warmup", s3_hub.hub, provider="qemu", force=True)
    before = _memory_kb(pid)

    big = plant_image(daemon.data_dir, "big", 200 << 20)
    seen: list[int] = []
    started = time.monotonic()
    client.images.push("big", s3_hub.hub, progress=lambda t: seen.append(t.Bytes))
    pushed = time.monotonic()
    client.images.delete("big")
    client.images.pull("big", s3_hub.hub, provider="qemu", progress=lambda t: seen.append(t.Bytes))
    pulled = time.monotonic()
    after = _memory_kb(pid)
    pulled_image = client.images.get("big")

    print(
        f"\n200 MB round trip: push {pushed - started:.1f} s, pull {pulled - pushed:.1f} s; daemon RSS "
        f"before {before['VmRSS'] // 1024} MB, after {after['VmRSS'] // 1024} MB, "
        f"peak {after['VmHWM'] // 1024} MB (peak before {before['VmHWM'] // 1024} MB)"
    )
    assert pulled_image.SizeMb == big.SizeMb
    assert max(seen, default=0) > 0, "progress was reported"
    assert after["VmHWM"] - before["VmRSS"] < 64 * 1024, "the transfer must stream, not hold the image in memory"


@pytest.mark.vm
@requires_vm
def test_pulled_image_boots_like_a_built_one(client: UnikClient, s3_hub: S3Hub) -> None:
    client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", "qemu", args="a b")
    client.images.push("hello", s3_hub.hub)
    client.images.delete("hello")
    assert client.images.list() == []
    client.images.pull("hello", s3_hub.hub, provider="qemu")
    client.instances.run("pulled", "hello", env={"GREETING": "from the hub"})
    wait_for("the pulled app's output", lambda: "tick 1" in client.instances.logs("pulled"))
    logs = client.instances.logs("pulled").replace("\r\n", "\n")
    assert "hello from unik: from the hub\narg 1: a\narg 2: b\n" in logs
    client.instances.delete("pulled", force=True)


@requires_vm
@pytest.mark.vm
def test_a_pulled_image_boots_its_own_initrd_as_a_built_one_does(
    api: TestClient, data_dir: Path, s3_hub: S3Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pulled kernel identical to the provider's is linked to it, as a built image's is. One
    that is only the same build (the same release, built elsewhere: a copy here) still lets
    the instances boot the image's initrd itself, the run archive going in over fw_cfg."""
    from unik.kernel import default_kernel_root, load
    from unik.providers.qemu import staging

    if not micro_kernel_reads_fw_cfg():
        pytest.skip("no micro kernel with fw_cfg in sysfs")
    monkeypatch.setattr(staging, "SHARED_INITRD_MIN_BYTES", 0)  # c-hello's initrd is small
    hub_body = json.dumps({"URL": s3_hub.hub.url, "Username": s3_hub.hub.user, "Password": s3_hub.hub.password})
    built = api.post(
        "/images/hello/create",
        params={"base": "linux", "lang": "c", "provider": "qemu"},
        files={"tarfile": ("app.tar.gz", folder_tar_gz(EXAMPLES / "c-hello"))},
    )
    assert built.status_code == 201, built.text
    assert api.post("/images/push/hello", content=hub_body).status_code == 202
    assert api.delete("/images/hello").status_code == 204
    pulled = api.post("/images/pull/hello", params={"provider": "qemu"}, content=hub_body)
    assert pulled.status_code == 202
    kernel = data_dir / "images" / pulled.json()["Id"] / "kernel"
    assert kernel.samefile(load(default_kernel_root(), "micro").vmlinux)
    copy = kernel.with_name("copy")
    shutil.copyfile(kernel, copy)
    copy.replace(kernel)
    ran = api.post("/instances/run", json={"InstanceName": "pulled", "ImageName": "hello", "Env": {"GREETING": "fw"}})
    assert ran.status_code == 201, ran.text
    folder = data_dir / "instances" / ran.json()["Id"]
    assert not (folder / "kernel").samefile(load(default_kernel_root(), "micro").vmlinux)
    assert (folder / "run.cpio").is_file() and not (folder / "boot.initrd").exists()
    wait_for("the pulled app's output", lambda: "hello from unik: fw" in api.get("/instances/pulled/logs").text)
    assert api.delete("/instances/pulled", params={"force": "true"}).status_code == 204
