"""A raw disk uploaded as an EBS snapshot through the EBS direct APIs: no helper instance, no S3.

`start_snapshot`, then every 512 KiB block that is not all zeroes with `put_snapshot_block`
(its SHA-256, base64, as the checksum EBS verifies), in parallel, then `complete_snapshot` with
the number of blocks sent. Blocks of zeroes are holes EBS reads as zeroes anyway.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = 1 << 30
# The EBS direct APIs' only block size (moto's start_snapshot says 512 but stores these too).
BLOCK_SIZE = 512 * 1024


def upload_snapshot(
    ebs: Any, disk: Path, *, description: str, tags: dict[str, str], threads: int, pending: Path
) -> str:
    """The snapshot id of `disk` uploaded; on failure the caller deletes the snapshot it names
    in the raised exception's `snapshot_id` attribute (when it got that far). While it runs, a
    file named after the snapshot lies in `pending`: a daemon that dies meanwhile finds it at
    its next start and deletes that unfinished snapshot (EBS cannot resume one)."""
    size = disk.stat().st_size
    started = ebs.start_snapshot(
        VolumeSize=max(1, math.ceil(size / GIB)),
        Description=description,
        Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
        ClientToken=uuid.uuid4().hex,
        Timeout=60,
    )
    snapshot_id = started["SnapshotId"]
    marker = pending / snapshot_id
    pending.mkdir(parents=True, exist_ok=True)
    marker.touch()
    block_size = BLOCK_SIZE
    try:
        began = time.perf_counter()
        count = math.ceil(size / block_size)
        done = [0]
        lock = threading.Lock()
        with ThreadPoolExecutor(threads, thread_name_prefix="ebs-upload") as pool:

            def put(index: int) -> int:
                data = _block(disk, index, block_size)
                with lock:
                    done[0] += 1
                    if done[0] % max(1, count // 10) == 0:
                        log.info("snapshot %s: %d of %d blocks read", snapshot_id, done[0], count)
                if data == bytes(len(data)):
                    return 0
                ebs.put_snapshot_block(
                    SnapshotId=snapshot_id,
                    BlockIndex=index,
                    BlockData=data,
                    DataLength=len(data),
                    Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                    ChecksumAlgorithm="SHA256",
                )
                return 1

            changed = sum(pool.map(put, range(count)))
        ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=changed)
        log.info(
            "uploaded %s as snapshot %s: %d of %d blocks in %.1f s",
            disk.name, snapshot_id, changed, count, time.perf_counter() - began,
        )  # fmt: skip
    except BaseException as exc:
        exc.snapshot_id = snapshot_id  # type: ignore[attr-defined]
        raise
    finally:
        marker.unlink(missing_ok=True)
    return snapshot_id


def delete_unfinished(ec2: Any, pending: Path) -> None:
    """Snapshots whose upload a previous run of the daemon did not finish."""
    for marker in pending.glob("snap-*") if pending.is_dir() else []:
        try:
            ec2.delete_snapshot(SnapshotId=marker.name)
            log.info("deleted snapshot %s: its upload was cut short", marker.name)
        except Exception as exc:
            log.warning("snapshot %s of an upload cut short not deleted: %s", marker.name, exc)
        marker.unlink(missing_ok=True)


def _block(disk: Path, index: int, block_size: int) -> bytes:
    """Block `index` of the disk, the last one padded with zeroes: EBS takes whole blocks."""
    with open(disk, "rb") as f:
        f.seek(index * block_size)
        data = f.read(block_size)
    return data.ljust(block_size, b"\0")
