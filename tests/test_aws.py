"""The AWS provider against a real moto server over HTTP on loopback: build → snapshot blocks
checked one by one against the disk → AMI → run → describe → logs → stop → start → re-adoption
→ delete, and AWS's errors. moto checks almost nothing, so what the daemon sent (register_image's
and run_instances' parameters, the user-data) is asserted here."""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient

from tests.conftest import hello_tgz, services_of  # noqa: F401 - hello_tgz is a fixture
from unik.artifacts.disk import missing_disk_tools
from unik.daemon import build_app
from unik.kernel import default_kernel_root
from unik.kernel import load as load_kernel
from unik.providers.aws.errors import translate
from unik.providers.aws.provider import TAG_DAEMON, TAG_INSTANCE, AwsProvider
from unik.providers.network import free_port

REGION = "us-east-1"
BLOCK = 512 * 1024


def _disk_kernel_present() -> bool:
    try:
        load_kernel(default_kernel_root(), "disk")
    except FileNotFoundError:
        return False
    return True


needs_disks = pytest.mark.skipif(
    missing_disk_tools() is not None or not _disk_kernel_present(), reason="needs the disk tools and `make kernel-disk`"
)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    binary = shutil.which("moto_server") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "moto_server")
    port = free_port()
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("moto_server did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials for moto from the environment (boto3's chain), and nothing that could reach
    a real AWS: no shared files, no instance metadata service."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _config(data_dir: Path, moto_url: str) -> None:
    (data_dir / "daemon-config.yaml").write_text(
        "providers:\n  aws:\n"
        f"    - {{endpoint_url: '{moto_url}', region: {REGION}, describe_interval: 0.2, console_interval: 0.0,\n"
        "        instance_type: t3.small, tags: {team: unik-tests}}\n"
    )


@contextlib.contextmanager
def aws_daemon(data_dir: Path, moto_url: str) -> Iterator[TestClient]:
    _config(data_dir, moto_url)
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as api:
        yield api


def aws_of(api: TestClient) -> AwsProvider:
    provider = services_of(api).ctx.providers["aws"]
    assert isinstance(provider, AwsProvider)
    return provider


def client(service: str, moto_url: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=moto_url)


def snapshot_blocks(ebs: Any, snapshot_id: str) -> dict[int, bytes]:
    blocks: dict[int, bytes] = {}
    token: dict[str, str] = {}
    while True:
        page = ebs.list_snapshot_blocks(SnapshotId=snapshot_id, **token)
        for block in page["Blocks"]:
            data = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=block["BlockIndex"],
                                          BlockToken=block["BlockToken"])["BlockData"].read()  # fmt: skip
            blocks[block["BlockIndex"]] = data
        if not page.get("NextToken"):
            return blocks
        token = {"NextToken": page["NextToken"]}


def ec2_instance(ec2: Any, unik_id: str) -> dict[str, Any]:
    found = [
        i
        for r in ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_INSTANCE}", "Values": [unik_id]}])["Reservations"]
        for i in r["Instances"]
    ]
    assert len(found) == 1, found
    return found[0]


def eventually(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@needs_disks
def test_the_whole_flow_on_ec2(
    caplog: pytest.LogCaptureFixture,
    aws_env: None,
    moto_url: str,
    data_dir: Path,
    tmp_path: Path,
    hello_tgz: bytes,  # noqa: F811
) -> None:
    caplog.set_level("INFO", logger="unik.providers.aws.provider")
    ec2, ebs = client("ec2", moto_url), client("ebs", moto_url)
    sent: dict[str, dict[str, Any]] = {}
    with aws_daemon(data_dir, moto_url) as api:
        provider = aws_of(api)

        def keep_params(params: dict[str, Any], model: Any, **_: Any) -> None:
            sent[model.name] = dict(params)

        def keep_disk(**_: Any) -> None:
            (disk,) = (data_dir / "aws").glob("publish-*/disk.img")
            shutil.copyfile(disk, tmp_path / "uploaded.img")

        for event in ("RegisterImage", "RunInstances"):
            provider.ec2.meta.events.register(f"provide-client-params.ec2.{event}", keep_params)
        provider.ebs.meta.events.register("before-call.ebs.CompleteSnapshot", keep_disk)

        built = api.post("/images/hello/create?base=linux&lang=c&provider=aws", files={"tarfile": ("a.tgz", hello_tgz)})
        assert built.status_code == 201, built.text
        assert built.json()["Infrastructure"] == "AWS"
        meta = services_of(api).ctx.store.images.find("hello").meta
        ami, snapshot = meta.provider_data["ami"], meta.provider_data["snapshot"]
        assert not list((data_dir / "aws").glob("publish-*"))  # the disk went after its upload

        # Every block of the disk that is not zeroes is in the snapshot, byte for byte; no other is.
        disk = (tmp_path / "uploaded.img").read_bytes()
        expected = {
            i // BLOCK: disk[i : i + BLOCK].ljust(BLOCK, b"\0")
            for i in range(0, len(disk), BLOCK)
            if disk[i : i + BLOCK].strip(b"\0")
        }
        assert snapshot_blocks(ebs, snapshot) == expected
        assert len(expected) >= 4  # the GPT, the FAT, syslinux, the kernel at least

        registered = sent["RegisterImage"]
        assert registered["BootMode"] == "uefi-preferred" and registered["EnaSupport"] is True
        root = {"SnapshotId": snapshot, "VolumeType": "gp3", "DeleteOnTermination": True}
        assert registered["BlockDeviceMappings"] == [{"DeviceName": "/dev/xvda", "Ebs": root}]
        assert ec2.describe_images(ImageIds=[ami])["Images"][0]["ImageId"] == ami

        body = {"InstanceName": "web1", "ImageName": "hello", "Env": {"GREETING": "aws"}}
        ran = api.post("/instances/run", json=body)
        assert ran.status_code == 201, ran.text
        instance = ran.json()
        launched = ec2_instance(ec2, instance["Id"])
        assert instance["IpAddress"] in (launched.get("PublicIpAddress"), launched["PrivateIpAddress"])
        params = sent["RunInstances"]
        assert params["ImageId"] == ami and params["InstanceType"] == "t3.small"
        assert b"GREETING=aws" in params["UserData"] and b"unik/run/hostname" in params["UserData"]
        tags = {t["Key"]: t["Value"] for t in launched["Tags"]}
        assert tags[TAG_INSTANCE] == instance["Id"] and tags[TAG_DAEMON] == provider.daemon_id
        assert tags["team"] == "unik-tests" and tags["Name"] == "web1"
        assert api.get("/instances/web1").json()["State"] == "running"
        assert api.get("/instances/web1/logs").text  # EC2's console (moto's is canned)

        assert api.post("/instances/web1/stop").status_code == 200
        assert api.get("/instances/web1").json()["State"] == "stopped"
        assert ec2_instance(ec2, instance["Id"])["State"]["Name"] == "stopped"
        started = api.post("/instances/web1/start")
        assert started.status_code == 200, started.text
        assert ec2_instance(ec2, instance["Id"])["State"]["Name"] == "running"
        assert ec2_instance(ec2, instance["Id"])["InstanceId"] == launched["InstanceId"]  # the same instance

    # A new daemon finds its instance through the tags.
    with aws_daemon(data_dir, moto_url) as api:
        assert [(i["Name"], i["State"]) for i in api.get("/instances").json()] == [("web1", "running")]
        # Terminated behind the daemon's back: the instance reads stopped.
        ec2.terminate_instances(InstanceIds=[launched["InstanceId"]])
        eventually(lambda: api.get("/instances/web1").json()["State"] == "stopped")
        assert f"EC2 instance {launched['InstanceId']} of {instance['Id']} is terminated" in caplog.text
        assert api.delete("/instances/web1").status_code == 204
        assert api.delete("/images/hello").status_code == 204
        assert ec2.describe_images(ImageIds=[ami]).get("Images", []) == [] or pytest.fail("AMI kept")


def test_no_credentials_is_a_401_naming_boto3s_chain(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, moto_url: str, data_dir: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with aws_daemon(data_dir, moto_url) as api:
        provider = aws_of(api)
        with pytest.raises(Exception) as failed:
            provider._stop("nothing")
        assert getattr(failed.value, "status", None) == 401
        assert "boto3's chain" in str(failed.value)


def test_aws_is_a_provider_with_its_compilers(aws_env: None, moto_url: str, data_dir: Path) -> None:
    with aws_daemon(data_dir, moto_url) as api:
        assert api.get("/available_providers").json() == ["aws"]
        assert "linux-c-aws" in api.get("/available_compilers").json()


@needs_disks
def test_volumes_are_ebs_volumes_attached_at_boot_and_while_stopped(
    aws_env: None,
    moto_url: str,
    data_dir: Path,
    hello_tgz: bytes,  # noqa: F811
) -> None:
    ec2 = client("ec2", moto_url)
    sent: list[dict[str, Any]] = []
    with aws_daemon(data_dir, moto_url) as api:
        provider = aws_of(api)
        provider.ec2.meta.events.register(
            "provide-client-params.ec2.ModifyInstanceAttribute", lambda params, **_: sent.append(dict(params))
        )
        built = api.post("/images/web/create?base=linux&lang=c&provider=aws&mounts=/data",
                         files={"tarfile": ("a.tgz", hello_tgz)})  # fmt: skip
        assert built.status_code == 201, built.text
        for name in ("data", "spare"):
            made = api.post(f"/volumes/{name}?size=8&provider=aws&type=ext4")
            assert made.status_code == 201, made.text
        store = services_of(api).ctx.store
        data_ebs = store.volumes.find("data").meta.provider_data["volume"]
        spare_ebs = store.volumes.find("spare").meta.provider_data["volume"]
        assert ec2.describe_volumes(VolumeIds=[data_ebs])["Volumes"][0]["State"] == "available"

        ran = api.post("/instances/run", json={"InstanceName": "w", "ImageName": "web", "Mounts": {"/data": "data"}})
        assert ran.status_code == 201, ran.text
        ec2_id = ec2_instance(ec2, ran.json()["Id"])["InstanceId"]
        (attachment,) = ec2.describe_volumes(VolumeIds=[data_ebs])["Volumes"][0]["Attachments"]
        assert (attachment["InstanceId"], attachment["Device"]) == (ec2_id, "/dev/sdf")

        # While it runs, a volume cannot be hot-plugged into an EC2 guest (no channel to mount it).
        hot = api.post("/volumes/spare/attach/w?mount=/spare")
        assert hot.status_code == 501, hot.text
        # Stopped, it can: attached to the EC2 instance, mounted by the guest at the next start.
        assert api.post("/instances/w/stop").status_code == 200
        assert api.post("/volumes/spare/attach/w?mount=/spare").status_code == 202
        assert api.post("/volumes/data/detach").status_code == 202
        assert api.post("/instances/w/start").status_code == 200
        assert ec2.describe_volumes(VolumeIds=[data_ebs])["Volumes"][0]["State"] == "available"
        assert ec2.describe_volumes(VolumeIds=[spare_ebs])["Volumes"][0]["Attachments"][0]["InstanceId"] == ec2_id
        user_data = base64.b64decode(sent[-1]["UserData"]["Value"])
        assert f"{spare_ebs.replace('-', '')} /spare ext4".encode() in user_data  # the guest finds it by serial
        assert data_ebs.replace("-", "").encode() not in user_data

        assert api.delete("/instances/w?force=true").status_code == 204
        assert api.delete("/volumes/spare").status_code == 204
        assert api.delete("/volumes/data").status_code == 204
        assert ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG_DAEMON}", "Values": [provider.daemon_id]}])[
            "Volumes"
        ] == []


def test_a_snapshot_whose_upload_was_cut_short_is_deleted_at_start(
    aws_env: None, moto_url: str, data_dir: Path
) -> None:
    ebs, ec2 = client("ebs", moto_url), client("ec2", moto_url)
    orphan = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    (data_dir / "aws" / "uploads").mkdir(parents=True)
    (data_dir / "aws" / "uploads" / orphan).touch()  # what a daemon killed mid-upload leaves
    with aws_daemon(data_dir, moto_url):
        assert not (data_dir / "aws" / "uploads" / orphan).exists()
    assert orphan not in [s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]]


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("AuthFailure", 401),
        ("UnauthorizedOperation", 403),
        ("InvalidParameterValue", 400),
        ("InvalidUserData.Malformed", 400),
        ("InvalidAMIID.NotFound", 404),
        ("InsufficientInstanceCapacity", 409),
        ("InternalError", 502),
    ],
)
def test_aws_errors_keep_their_code_under_a_clear_status(code: str, status: int) -> None:
    error = ClientError({"Error": {"Code": code, "Message": "what AWS said"}}, "RunInstances")
    translated = translate(error)
    assert translated.status == status
    assert str(translated) == f"AWS RunInstances: {code}: what AWS said"
