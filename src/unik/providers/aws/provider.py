"""AwsProvider: images as AMIs, instances on EC2, through boto3.

An image for `aws` is built like any (kernel+initrd), then published: a raw bootable disk of
the disk kernel (NVMe, ENA, the EFI stub) and the image's initrd, whose baked network config
is DHCP plus `config=imds`, uploaded as an EBS snapshot (ebs.py) and registered as an AMI.
A run is `run_instances` from that AMI with the run archive (env, args, hostname) as
user-data, which the guest init fetches from the instance metadata service. EC2 is the
record of what runs: instances carry unik tags (daemon, instance, image) and are found by
them, so a restarted daemon re-adopts them. Their state comes from one `describe_instances`
for all of them, refreshed in the background; the console from `get_console_output`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from unik import guest
from unik.artifacts.disk import build_raw_disk, missing_disk_tools
from unik.errors import BadRequest, Conflict, NotImplementedByProvider, UnikError
from unik.kernel import BOOT_ARGS, Kernel, default_kernel_root
from unik.kernel import load as load_kernel
from unik.models import ImageMeta, VolumeAttachment, VolumeMeta
from unik.providers.aws.config import AwsProviderConfig
from unik.providers.aws.ebs import GIB, delete_unfinished, upload_snapshot
from unik.providers.aws.errors import aws_errors, translate
from unik.providers.base import LaunchSpec, Provider, ProviderConfig, ProviderContext, daemon_id

log = logging.getLogger(__name__)

TAG_DAEMON, TAG_INSTANCE, TAG_IMAGE, TAG_VOLUME = "unik:daemon", "unik:instance", "unik:image", "unik:volume"
LIVE = ("pending", "running")
ROOT_DEVICE = "/dev/xvda"
# Deadlines on every call: an unreachable endpoint fails an API call, it never hangs it.
BOTO_CONFIG = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
STATE_POLL = 1.0


class AwsProvider(Provider):
    name = "aws"
    infrastructure = "AWS"

    config: AwsProviderConfig

    def __init__(self, config: ProviderConfig, context: ProviderContext) -> None:
        if not isinstance(config, AwsProviderConfig):
            raise TypeError(f"the aws provider needs an AwsProviderConfig, not {type(config).__name__}")
        super().__init__(config, context)
        self.root = context.data_dir / "aws"
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        # Which instances are this daemon's: two daemons may share an account.
        self.daemon_id = daemon_id(self.root)
        # Credentials come from boto3's own chain, never from the daemon's config or store.
        session = boto3.session.Session(region_name=config.region)
        self.ec2 = session.client("ec2", endpoint_url=config.endpoint_url, config=BOTO_CONFIG)
        self.ebs = session.client("ebs", endpoint_url=config.endpoint_url, config=BOTO_CONFIG)
        # unik instance id -> EC2's description of it (the last one seen).
        self._instances: dict[str, dict[str, Any]] = {}
        self._described_at: float | None = None
        self._poller: asyncio.Task[None] | None = None
        self._console_at: dict[str, float] = {}
        self._zone: str | None = config.availability_zone
        # When _find last saw each instance: a describe-all that began before must not drop it.
        self._found_at: dict[str, float] = {}
        self.pending_uploads = self.root / "uploads"
        delete_unfinished(self.ec2, self.pending_uploads)

    # -- what it is -------------------------------------------------------------------------

    def kernel(self) -> Kernel:
        try:
            return load_kernel(default_kernel_root(), "disk")
        except FileNotFoundError as exc:
            raise UnikError(f"AWS images boot the disk kernel: {exc}") from exc

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "infrastructure": self.infrastructure,
            "region": self.config.region,
            "endpoint_url": self.config.endpoint_url,
            "daemon_id": self.daemon_id,
        }

    def volume_device(self, index: int) -> str:
        return f"/dev/sd{chr(ord('f') + index)}"

    def console_path(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id / "console.log"

    # -- images: a snapshot of a bootable disk, an AMI ----------------------------------------

    async def publish_image(self, image_id: str, meta: ImageMeta) -> dict[str, str]:
        if problem := missing_disk_tools():
            raise NotImplementedByProvider(f"this host cannot make the bootable disk of an AMI: {problem}")
        return await asyncio.to_thread(self._publish, image_id, meta)

    def _tags(self, **extra: str) -> dict[str, str]:
        return {**self.config.tags, TAG_DAEMON: self.daemon_id, **extra}

    def _publish(self, image_id: str, meta: ImageMeta) -> dict[str, str]:
        work = self.root / f"publish-{image_id}"
        work.mkdir(parents=True)
        snapshot_id = ""
        try:
            image_initrd = self.context.artifacts.path(image_id, meta.artifact, "initrd")
            init_binary = guest.ensure_init_binary(self.root / "init")
            disk = build_ami_disk(image_initrd, self.kernel(), init_binary, work)
            tags = self._tags(**{TAG_IMAGE: image_id})
            try:
                snapshot_id = self._upload(disk, f"unik image {image_id}", tags)
            except Exception as exc:
                snapshot_id = getattr(exc, "snapshot_id", "")
                raise
            ami = self._register(image_id, snapshot_id, tags)
            log.info("image %s is AMI %s (snapshot %s)", image_id, ami, snapshot_id)
            return {"ami": ami, "snapshot": snapshot_id}
        except Exception as exc:
            if snapshot_id:
                with contextlib.suppress(Exception):
                    self.ec2.delete_snapshot(SnapshotId=snapshot_id)
            raise translate(exc) if not isinstance(exc, UnikError) else exc from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _upload(self, disk: Path, description: str, tags: dict[str, str]) -> str:
        return upload_snapshot(
            self.ebs, disk, description=description, tags=tags, threads=self.config.upload_threads,
            pending=self.pending_uploads,
        )  # fmt: skip

    def _register(self, image_id: str, snapshot_id: str, tags: dict[str, str]) -> str:
        root = {"SnapshotId": snapshot_id, "VolumeType": "gp3", "DeleteOnTermination": True}
        response = self.ec2.register_image(
            Name=f"unik-{image_id}",
            Description=f"unik image {image_id}",
            Architecture="x86_64",
            RootDeviceName=ROOT_DEVICE,
            BlockDeviceMappings=[{"DeviceName": ROOT_DEVICE, "Ebs": root}],
            VirtualizationType="hvm",
            EnaSupport=True,
            # The disk boots under both firmwares; UEFI where the instance type has it.
            BootMode="uefi-preferred",
            ImdsSupport="v2.0",
            TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        )
        return str(response["ImageId"])

    def forget_image(self, image_id: str, meta: ImageMeta) -> None:
        data = meta.provider_data
        self._delete_quietly(f"image {image_id}", (self.ec2.deregister_image, "ImageId", data.get("ami")),
                             (self.ec2.delete_snapshot, "SnapshotId", data.get("snapshot")))  # fmt: skip

    @staticmethod
    def _delete_quietly(owner: str, *steps: tuple[Callable[..., Any], str, str | None]) -> None:
        """Deletions nobody waits on (the record is gone): what fails is logged, not raised."""
        for delete, key, value in steps:
            if value:
                try:
                    delete(**{key: value})
                except Exception as exc:
                    log.warning("%s: %s %s not removed: %s", owner, key, value, exc)

    # -- instances ------------------------------------------------------------------------------

    async def launch(self, instance_id: str, spec: LaunchSpec) -> bool:
        ami = spec.image_data.get("ami")
        if not ami:
            raise UnikError(f"image {spec.image_id} has no AMI (was it built for provider aws?)")
        if missing := [v.mount for v in spec.volumes if not v.provider_data.get("volume")]:
            raise BadRequest(f"the volumes at {', '.join(missing)} are not EBS volumes: create them with provider aws")
        await asyncio.to_thread(self._launch, instance_id, spec, ami)
        self._ensure_poller()
        return False

    @aws_errors
    def _launch(self, instance_id: str, spec: LaunchSpec, ami: str) -> None:
        existing = self._find(instance_id)
        state = existing["State"]["Name"] if existing else None
        if state in LIVE:
            return
        user_data = self._user_data(spec)
        if existing is not None and state in ("stopping", "stopped"):
            self._wait(instance_id, ("stopped",))
            ec2_id = existing["InstanceId"]
            # Volumes attached or detached while it was stopped: its mounts and disks follow.
            # Unlike run_instances' UserData, botocore sends this blob as it is: EC2 wants base64.
            encoded = base64.b64encode(user_data)
            self.ec2.modify_instance_attribute(InstanceId=ec2_id, UserData={"Value": encoded})
            self._attach_volumes(ec2_id, spec.volumes)
            self.ec2.start_instances(InstanceIds=[ec2_id])
            self._wait(instance_id, ("running",))
        else:
            tags = self._tags(**{TAG_INSTANCE: instance_id, TAG_IMAGE: spec.image_id, "Name": spec.hostname})
            params: dict[str, Any] = {
                "ImageId": ami,
                "InstanceType": self.config.instance_type,
                "MinCount": 1,
                "MaxCount": 1,
                # boto3 base64-encodes it; the guest gets these bytes back from the metadata service.
                "UserData": user_data,
                "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
                ],
                "ClientToken": f"{instance_id}-{int(time.time())}",
            }
            if self.config.subnet_id:
                params["SubnetId"] = self.config.subnet_id
            if self.config.security_group_ids:
                params["SecurityGroupIds"] = self.config.security_group_ids
            if self.config.key_name:
                params["KeyName"] = self.config.key_name
            if not self.config.subnet_id:  # a subnet places the instance (and its zone) itself
                params["Placement"] = {"AvailabilityZone": self._availability_zone()}
            self.ec2.run_instances(**params)
            found = self._wait(instance_id, ("running",))
            # EC2 attaches volumes only to a running (or stopped) instance: the guest waits for them.
            self._attach_volumes(found["InstanceId"], spec.volumes)

    def _user_data(self, spec: LaunchSpec) -> bytes:
        """The run archive the guest fetches from the metadata service; EBS disks by their serial."""
        mounts = [(_ebs_serial(v), v.mount, guest.guest_fs_type(v.fs_type)) for v in spec.volumes]
        return guest.run_config_cpio(
            env=spec.env, args=spec.args, hostname=spec.hostname or None, mounts=mounts,
            mount_timeout=self.config.volume_wait if mounts else None,
        )  # fmt: skip

    def _attach_volumes(self, ec2_id: str, volumes: list[VolumeAttachment]) -> None:
        """Exactly `volumes` attached to the instance: the daemon's others detached, these attached."""
        wanted = {v.provider_data.get("volume", "") for v in volumes}
        attached = self.ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [ec2_id]},
                                                      *self._filters()])["Volumes"]  # fmt: skip
        have = {v["VolumeId"] for v in attached}
        for volume_id in have - wanted:
            self.ec2.detach_volume(VolumeId=volume_id, InstanceId=ec2_id)
            self._wait_volume(volume_id, "available")
        for index, volume in enumerate(volumes):
            volume_id = volume.provider_data["volume"]
            if volume_id not in have:
                self.ec2.attach_volume(VolumeId=volume_id, InstanceId=ec2_id, Device=f"/dev/sd{chr(ord('f') + index)}")
                self._wait_volume(volume_id, "in-use")

    def _wait_volume(self, volume_id: str, state: str) -> None:
        deadline = time.monotonic() + self.config.state_timeout
        while (now := self.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"]) != state:
            if time.monotonic() > deadline:
                raise Conflict(f"EBS volume {volume_id} is {now}, not {state}")
            time.sleep(STATE_POLL)

    def _availability_zone(self) -> str:
        if self._zone is None:
            if self.config.subnet_id:
                subnets = self.ec2.describe_subnets(SubnetIds=[self.config.subnet_id])["Subnets"]
                self._zone = str(subnets[0]["AvailabilityZone"])
            else:
                self._zone = f"{self.config.region}a"
        return self._zone

    # -- volumes: EBS volumes made from the volume's filesystem image ------------------------------

    async def publish_volume(self, volume_id: str, disk: Path) -> dict[str, str]:
        return await asyncio.to_thread(self._publish_volume, volume_id, disk)

    @aws_errors
    def _publish_volume(self, volume_id: str, disk: Path) -> dict[str, str]:
        tags = self._tags(**{TAG_VOLUME: volume_id})
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        try:
            snapshot = self._upload(disk, f"unik volume {volume_id}", tags)
        except Exception as exc:
            if snapshot_id := getattr(exc, "snapshot_id", ""):
                with contextlib.suppress(Exception):
                    self.ec2.delete_snapshot(SnapshotId=snapshot_id)
            raise
        try:
            created = self.ec2.create_volume(
                AvailabilityZone=self._availability_zone(), SnapshotId=snapshot, VolumeType="gp3",
                Size=max(1, math.ceil(disk.stat().st_size / GIB)),
                TagSpecifications=[{"ResourceType": "volume", "Tags": tag_list}],
            )  # fmt: skip
            self._wait_volume(created["VolumeId"], "available")
        except Exception:
            with contextlib.suppress(Exception):
                self.ec2.delete_snapshot(SnapshotId=snapshot)
            raise
        log.info("volume %s is EBS volume %s (snapshot %s)", volume_id, created["VolumeId"], snapshot)
        return {"volume": created["VolumeId"], "snapshot": snapshot}

    def forget_volume(self, volume_id: str, meta: VolumeMeta) -> None:
        data = meta.provider_data
        self._delete_quietly(f"volume {volume_id}", (self.ec2.delete_volume, "VolumeId", data.get("volume")),
                             (self.ec2.delete_snapshot, "SnapshotId", data.get("snapshot")))  # fmt: skip

    async def stop(self, instance_id: str) -> None:
        await asyncio.to_thread(self._stop, instance_id)

    @aws_errors
    def _stop(self, instance_id: str) -> None:
        existing = self._find(instance_id)
        if existing is None or existing["State"]["Name"] in ("stopped", "terminated", "shutting-down"):
            return
        # EC2 sends the guest an ACPI power-button press, then powers it off.
        self.ec2.stop_instances(InstanceIds=[existing["InstanceId"]])
        self._wait(instance_id, ("stopped",))

    async def remove(self, instance_id: str, *, keep_files: bool = False) -> None:
        await asyncio.to_thread(self._terminate, instance_id)
        if not keep_files:
            await asyncio.to_thread(shutil.rmtree, self.console_path(instance_id).parent, True)

    @aws_errors
    def _terminate(self, instance_id: str) -> None:
        existing = self._find(instance_id)
        if existing is not None and existing["State"]["Name"] != "terminated":
            self.ec2.terminate_instances(InstanceIds=[existing["InstanceId"]])
        self._instances.pop(instance_id, None)

    def alive(self, instance_id: str) -> bool:
        if self._described_at is None:
            # The first question (the daemon's start): answered from EC2, not from nothing.
            with contextlib.suppress(UnikError):
                self._describe_all()
        self._ensure_poller()
        found = self._instances.get(instance_id)
        return found is not None and found["State"]["Name"] in LIVE

    def instance_ids(self) -> set[str]:
        if self._described_at is None:
            with contextlib.suppress(UnikError):
                self._describe_all()
        return {i for i, found in self._instances.items() if found["State"]["Name"] != "terminated"}

    def address_of(self, instance_id: str) -> str | None:
        found = self._instances.get(instance_id)
        if found is None:
            return None
        return found.get("PublicIpAddress") or found.get("PrivateIpAddress")

    # -- EC2's view of the daemon's instances ------------------------------------------------------

    def _filters(self, **tags: str) -> list[dict[str, Any]]:
        return [{"Name": f"tag:{k}", "Values": [v]} for k, v in {TAG_DAEMON: self.daemon_id, **tags}.items()]

    def _find(self, instance_id: str) -> dict[str, Any] | None:
        """EC2's instance of a unik instance now (the newest, if a terminated one lingers)."""
        found: list[dict[str, Any]] = []
        filters = self._filters(**{TAG_INSTANCE: instance_id})
        for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                found += reservation["Instances"]
        if not found:
            self._instances.pop(instance_id, None)
            return None
        found.sort(key=lambda i: (i["State"]["Name"] != "terminated", str(i.get("LaunchTime", ""))))
        self._instances[instance_id] = found[-1]
        self._found_at[instance_id] = time.monotonic()
        return found[-1]

    @aws_errors
    def _describe_all(self) -> None:
        """One paginated call for all of them: what alive() and the monitor read."""
        began = time.monotonic()
        seen: dict[str, dict[str, Any]] = {}
        for page in self.ec2.get_paginator("describe_instances").paginate(Filters=self._filters()):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    unik_id = tags.get(TAG_INSTANCE)
                    if unik_id and (unik_id not in seen or instance["State"]["Name"] != "terminated"):
                        seen[unik_id] = instance
        for unik_id, instance in seen.items():
            before = self._instances.get(unik_id, {}).get("State", {}).get("Name")
            now = instance["State"]["Name"]
            if before in LIVE and now not in LIVE:
                # Ended outside the daemon (or by EC2 itself): the log says why, as EC2 does.
                reason = instance.get("StateReason", {}).get("Message") or instance.get("StateTransitionReason", "")
                log.info("EC2 instance %s of %s is %s: %s", instance["InstanceId"], unik_id, now, reason or "no reason")
        for unik_id, instance in self._instances.items():
            if unik_id not in seen and self._found_at.get(unik_id, 0.0) > began:
                seen[unik_id] = instance  # found by a launch while this call was on its way
        self._instances = seen
        self._described_at = time.monotonic()

    def _wait(self, instance_id: str, states: tuple[str, ...]) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.state_timeout
        while True:
            found = self._find(instance_id)
            state = found["State"]["Name"] if found else "gone"
            if found is not None and state in states:
                return found
            if state in ("terminated", "gone") or time.monotonic() > deadline:
                reason = (found or {}).get("StateReason", {}).get("Message", "")
                wanted = " or ".join(states)
                raise Conflict(f"EC2 instance of {instance_id} is {state}, not {wanted}: {reason}".rstrip(": "))
            time.sleep(STATE_POLL)

    def _ensure_poller(self) -> None:
        if self._poller is not None and not self._poller.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop: a synchronous caller
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """describe_instances every describe_interval, backing off (to a minute) while it fails."""
        delay = self.config.describe_interval
        while True:
            try:
                await asyncio.to_thread(self._describe_all)
                delay = self.config.describe_interval
            except UnikError as exc:
                delay = min(60.0, delay * 2)
                log.warning("describing the daemon's EC2 instances failed (next try in %.0f s): %s", delay, exc)
            await asyncio.sleep(delay)

    # -- console --------------------------------------------------------------------------------

    async def refresh_console(self, instance_id: str) -> None:
        now = time.monotonic()
        if now - self._console_at.get(instance_id, -1e9) < self.config.console_interval:
            return
        self._console_at[instance_id] = now
        found = self._instances.get(instance_id)
        if found is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._fetch_console, instance_id, found["InstanceId"])

    def _fetch_console(self, instance_id: str, ec2_id: str) -> None:
        """EC2 keeps the console's last 64 KB, updated now and then (not live): what is new is
        appended to the console file, which is what logs read and follow."""
        output = self.ec2.get_console_output(InstanceId=ec2_id, Latest=True).get("Output") or ""
        path = self.console_path(instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        had = path.read_text(errors="replace") if path.exists() else ""
        if output == had or had.endswith(output):
            return
        overlap = next((n for n in range(min(len(had), len(output)), 0, -1) if had.endswith(output[:n])), 0)
        with open(path, "a") as f:
            f.write(output[overlap:])


def build_ami_disk(image_initrd: Path, kernel: Kernel, init_binary: Path, work: Path) -> Path:
    """The raw bootable disk an AMI is made of (`work/disk.img`): the disk kernel and the
    image's initrd, then today's init (older images' have no metadata client) and a baked run
    archive whose network is DHCP with `config=imds`: the rest comes from the user-data."""
    initrd = work / "initrd"
    with open(initrd, "wb") as out:
        with open(image_initrd, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
        out.write(guest.modules_cpio([], init_binary=init_binary))
        out.write(guest.run_config_cpio(env={}, net=guest.DHCP_IMDS))
    disk = work / "disk.img"
    build_raw_disk(kernel.bzimage, initrd, " ".join(BOOT_ARGS), disk)
    return disk


def _ebs_serial(volume: VolumeAttachment) -> str:
    """The serial a Nitro instance's NVMe disk of an EBS volume has: the volume id without its dash."""
    return volume.provider_data.get("volume", "").replace("-", "")
