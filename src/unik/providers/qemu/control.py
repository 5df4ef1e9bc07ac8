"""Talking to a running VM: QMP commands, disk hot-plug and unplug, and the guest init's control channel.

The control channel is the guest's second serial port (ttyS1; the console is the first),
a unix socket on the host: one `TAG COMMAND` line out, one `TAG ok` or `TAG err WHY` back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from unik.errors import UnikError
from unik.guest import check_control_answer
from unik.providers.base import VolumeAttachment
from unik.providers.qemu.options import Blockdev, Device

CONTROL_TIMEOUT = 30.0
CONTROL_RESEND = 1.0
UNPLUG_TIMEOUT = 15.0
QMP_CONNECT_TIMEOUT = 5.0
QMP_COMMAND_TIMEOUT = 10.0


# -- disks ----------------------------------------------------------------------------


def _node_name(volume: VolumeAttachment) -> str:
    return f"vol-{volume.serial}"


def _device_id(volume: VolumeAttachment) -> str:
    return f"disk-{volume.serial}"


def blockdev(volume: VolumeAttachment) -> Blockdev:
    return Blockdev(_node_name(volume), volume.path)


def disk_device(volume: VolumeAttachment) -> Device:
    """The volume's virtio disk; its serial is how the guest finds it (/sys/block/vdX/serial)."""
    return Device("virtio-blk-pci", {"drive": _node_name(volume), "id": _device_id(volume), "serial": volume.serial})




# -- QMP ------------------------------------------------------------------------------


async def qmp(socket: Path, name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command on a fresh connection to the monitor at `socket`."""
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(str(socket)), QMP_CONNECT_TIMEOUT)
    try:
        return await asyncio.wait_for(client.execute(command, arguments), QMP_COMMAND_TIMEOUT)
    finally:
        await client.disconnect()


def qcode(key: str) -> dict[str, str]:
    """A key for QMP's send-key."""
    return {"type": "qcode", "data": key}


async def plug_disk(socket: Path, name: str, volume: VolumeAttachment) -> None:
    """Hot-plug the volume's disk: its block node, then the device (the node goes if the device fails)."""
    await qmp(socket, name, "blockdev-add", blockdev(volume).qmp())
    try:
        await qmp(socket, name, "device_add", disk_device(volume).qmp())
    except Exception:
        await qmp(socket, name, "blockdev-del", {"node-name": _node_name(volume)})
        raise


async def unplug_disk(socket: Path, name: str, volume: VolumeAttachment) -> None:
    device_id = _device_id(volume)
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(str(socket)), QMP_CONNECT_TIMEOUT)
    try:
        # The guest acknowledges the ACPI eject; only then is the disk gone for the guest.
        with client.listener("DEVICE_DELETED") as listener:
            await client.execute("device_del", {"id": device_id})
            async with asyncio.timeout(UNPLUG_TIMEOUT):
                async for event in listener:
                    if event.get("data", {}).get("device") == device_id:
                        break
        await client.execute("blockdev-del", {"node-name": _node_name(volume)})
    except TimeoutError:
        raise UnikError(f"the guest did not release the disk of volume {volume.serial} in time") from None
    finally:
        await client.disconnect()


# -- the guest init's control channel ---------------------------------------------------


async def guest_control(socket: Path, command: str) -> None:
    """One request to the guest init over its control serial port: `TAG COMMAND` out,
    `TAG ok` or `TAG err WHY` back (lines with another tag are leftovers: skipped)."""
    check_control_answer(command, await _exchange(socket, command))


async def guest_ask(socket: Path, question: str) -> bool:
    """A yes/no question to the guest init (`listening`): its `ok` is yes, an `err` no."""
    return await _exchange(socket, question) == "ok"


async def _exchange(socket: Path, command: str) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket)), 5.0)
    except (OSError, TimeoutError) as exc:
        raise UnikError(f"cannot reach the guest's control channel: {exc}") from exc
    tag = secrets.token_hex(6)  # 12 hex digits: the guest ignores lines without such a tag
    # The leading newline ends whatever fragment an interrupted earlier request left.
    request = f"\n{tag} {command}\n".encode()
    answer, closed = "", False
    try:
        async with asyncio.timeout(CONTROL_TIMEOUT):
            while not answer and not closed:
                # Repeated until answered: what reaches the guest before its port is open is
                # lost, and the guest answers a repeated tag without running it again.
                writer.write(request)
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CONTROL_RESEND):
                        while not answer:
                            line = await reader.readline()
                            if not line:
                                closed = True
                                break
                            head, _, rest = line.decode(errors="replace").strip().partition(" ")
                            # Only an answer counts: a tty echo of the request carries the tag too.
                            if head == tag and (rest == "ok" or rest.startswith("err")):
                                answer = rest
    except TimeoutError:
        raise UnikError(f"the guest did not answer {command.split()[0]!r} in time") from None
    finally:
        writer.close()
    return answer
