"""The image hub: push, pull and delete images in any S3-compatible object store (boto3).

Where: bucket `hub.bucket` (default `unik-hub`, created on the first push when the
credentials allow), one object per image at `hub.key` (default `<user>/<image>/latest`,
the original UniK hub's layout). The request's HubConfig names the endpoint (`url`) and the
credentials: `user` is the access key id, `pass` the secret key.

The artifact is one object, the image's archive (artifacts.archive: manifest.json, then
the files its Artifact names), so `aws s3 cp s3://unik-hub/me/hello/latest - | tar x` gives
back the image's folder.

Its metadata travels as the object's user metadata (x-amz-meta-unik-*): the format version,
the sha256 of the whole artifact, the image digest (artifacts.artifact_digest) and the
provider. Metadata and content are replaced together by one upload, so the checksum can
never describe another push. A pull downloads into the daemon's tmp dir, checks the
artifact's sha256 before unpacking, and the caller recomputes the image digest from the
unpacked files before the image is recorded; anything else is a 502 and leaves nothing.

Transfers are multipart and streamed from and to disk; memory stays near
`multipart_chunk_mb x max_concurrency` whatever the image size. Every function here
blocks: services.hub runs them in threads.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import s3transfer.exceptions
from boto3.s3.transfer import TransferConfig

from unik.artifacts.archive import ARTIFACT_FORMAT
from unik.config import HubSettings
from unik.errors import BadGateway, BadRequest, Forbidden, NotFound, Unauthorized, UnikError
from unik.models import HubConfig, HubImage, HubTransfer

# x-amz-meta-* names; S3 lower-cases them on the way back anyway.
META_FORMAT = "unik-format"
META_SHA256 = "unik-sha256"
META_DIGEST = "unik-digest"
META_PROVIDER = "unik-provider"

# Credentials wrong or unknown: the user can fix them with `unik login`.
_UNAUTHORIZED = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "MissingSecurityHeader",
    "401",
}
# Credentials right, permission missing.
_FORBIDDEN = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}


@dataclass(frozen=True)
class RemoteImage:
    key: str
    size: int
    sha256: str
    digest: str
    provider: str


# -- progress ---------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One push or pull in progress; boto3 reports bytes from its worker threads."""

    image: str
    image_id: str
    direction: Literal["push", "pull"]
    phase: str
    total: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, phase: str, total: int | None = None) -> None:
        """A new phase; with `total`, a new count of bytes (otherwise the last one stays on show)."""
        with self._lock:
            self.phase = phase
            if total is not None:
                self.total, self.done = total, 0

    def advance(self, amount: int) -> None:
        # s3transfer reports negative amounts when it rewinds a retried part.
        with self._lock:
            self.done = max(0, self.done + amount)

    def to_wire(self) -> HubTransfer:
        with self._lock:
            return HubTransfer(
                Image=self.image,
                ImageId=self.image_id,
                Direction=self.direction,
                Phase=self.phase,
                Bytes=self.done,
                Total=self.total,
                Seconds=round(time.monotonic() - self.started, 3),
            )


class TransferBoard:
    """The transfers running now, for `GET /hub/transfers` (the CLI's progress bars)."""

    def __init__(self) -> None:
        self._active: dict[int, Transfer] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def track(self, image: str, image_id: str, direction: Literal["push", "pull"], phase: str) -> Iterator[Transfer]:
        transfer = Transfer(image, image_id, direction, phase)
        with self._lock:
            self._active[id(transfer)] = transfer
        try:
            yield transfer
        finally:
            with self._lock:
                del self._active[id(transfer)]

    def list(self) -> list[HubTransfer]:
        with self._lock:
            transfers = list(self._active.values())
        return [t.to_wire() for t in transfers]


# -- the store --------------------------------------------------------------------------------

# boto3 sessions are not thread-safe while they create clients; clients are.
_session_lock = threading.Lock()
_session: boto3.session.Session | None = None


def _s3_client(settings: HubSettings, credentials: HubConfig) -> Any:
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(
            "s3",
            endpoint_url=credentials.url,
            aws_access_key_id=credentials.user,
            aws_secret_access_key=credentials.password,
            region_name=settings.region,
            config=botocore.config.Config(
                s3={"addressing_style": settings.addressing_style},
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                # Few retries: an unreachable hub should fail within seconds, not minutes.
                retries={"mode": "standard", "max_attempts": 3},
            ),
        )


class Hub:
    """One hub endpoint with one user's credentials; every method blocks."""

    def __init__(self, settings: HubSettings, credentials: HubConfig) -> None:
        try:
            url = urlsplit(credentials.url.strip())
            valid = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
        except ValueError:
            valid = False
        if not valid:
            shown = credentials.url or "nothing"
            raise BadRequest(f"hub url must be an http(s) URL of an S3-compatible store, got {shown} (see unik login)")
        if not credentials.user or not credentials.password:
            raise BadRequest("hub user and password are required (see unik login)")
        if "{user}" in settings.key and ("/" in credentials.user or credentials.user in (".", "..")):
            raise BadRequest(f"hub user {credentials.user!r} cannot be part of an object key")
        self.settings = settings
        self.credentials = credentials.model_copy(update={"url": credentials.url.strip()})
        self.bucket = settings.bucket
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._transfer_config = TransferConfig(
            multipart_threshold=settings.multipart_chunk_mb << 20,
            multipart_chunksize=settings.multipart_chunk_mb << 20,
            max_concurrency=settings.max_concurrency,
        )

    @property
    def s3(self) -> Any:
        # Made on first use, in the worker thread: loading botocore's models takes a while.
        with self._client_lock:
            if self._client is None:
                self._client = _s3_client(self.settings, self.credentials)
            return self._client

    def key(self, image: str) -> str:
        return self.settings.key.replace("{user}", self.credentials.user).replace("{image}", image)

    def where(self, image: str) -> str:
        return f"{self.credentials.url.rstrip('/')}/{self.bucket}/{self.key(image)}"

    def push(self, image: str, artifact: Path, metadata: dict[str, str], transfer: Transfer) -> None:
        with _translated(f"pushing {image!r} to {self.where(image)}"):
            self._ensure_bucket()
            transfer.begin("uploading", artifact.stat().st_size)
            self.s3.upload_file(
                str(artifact),
                self.bucket,
                self.key(image),
                ExtraArgs={"Metadata": metadata, "ContentType": "application/x-tar"},
                Callback=transfer.advance,
                Config=self._transfer_config,
            )

    def _ensure_bucket(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in _NOT_FOUND:
                raise
        options: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.region != "us-east-1":
            # us-east-1 is the one region that refuses an explicit constraint.
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            self.s3.create_bucket(**options)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def head(self, image: str) -> RemoteImage:
        key = self.key(image)
        with _translated(f"image {image!r} on the hub ({self.where(image)})"):
            answer = self.s3.head_object(Bucket=self.bucket, Key=key)
        metadata = {k.lower(): v for k, v in (answer.get("Metadata") or {}).items()}
        if metadata.get(META_FORMAT) != str(ARTIFACT_FORMAT) or not metadata.get(META_SHA256):
            raise BadGateway(
                f"{self.where(image)} is not a unik image of format {ARTIFACT_FORMAT} "
                f"(format {metadata.get(META_FORMAT) or 'missing'})"
            )
        return RemoteImage(
            key=key,
            size=int(answer.get("ContentLength") or 0),
            sha256=metadata[META_SHA256],
            digest=metadata.get(META_DIGEST, ""),
            provider=metadata.get(META_PROVIDER, ""),
        )

    def download(self, remote: RemoteImage, dest: Path, transfer: Transfer) -> None:
        transfer.begin("downloading", remote.size)
        with _translated(f"pulling {self.credentials.url.rstrip('/')}/{self.bucket}/{remote.key}"):
            self.s3.download_file(
                self.bucket, remote.key, str(dest), Callback=transfer.advance, Config=self._transfer_config
            )
        size = dest.stat().st_size
        if size != remote.size:
            raise BadGateway(f"the download is corrupt: {size} bytes where the hub announced {remote.size}")

    def delete(self, image: str) -> None:
        # S3 deletes of a missing key succeed; the API promises 404 for an unknown image.
        self.head(image)
        with _translated(f"deleting {self.where(image)}"):
            self.s3.delete_object(Bucket=self.bucket, Key=self.key(image))

    def search(self) -> list[HubImage]:
        """Every image in the bucket whose key fits the layout, sorted by user and name."""
        prefix = self.settings.key.split("{", 1)[0]
        pattern = re.compile(
            "".join(
                {"{user}": r"(?P<user>[^/]+)", "{image}": r"(?P<image>[^/]+)"}.get(part, re.escape(part))
                for part in re.split(r"({user}|{image})", self.settings.key)
            )
        )
        found: list[HubImage] = []
        with _translated(f"listing the hub {self.credentials.url.rstrip('/')}/{self.bucket}"):
            try:
                pages = list(self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix))
            except botocore.exceptions.ClientError as exc:
                if _code(exc) == "NoSuchBucket":
                    return []  # nothing pushed yet
                raise
        for page in pages:
            for obj in page.get("Contents", []):
                match = pattern.fullmatch(obj["Key"])
                if match is None:
                    continue
                found.append(
                    HubImage(
                        Name=match["image"],
                        User=match.groupdict().get("user") or "",
                        SizeMb=max(1, -(-int(obj["Size"]) // (1 << 20))),
                        Updated=obj["LastModified"].isoformat(),
                    )
                )
        return sorted(found, key=lambda i: (i.User, i.Name))


def artifact_metadata(sha256: str, digest: str, provider: str) -> dict[str, str]:
    return {META_FORMAT: str(ARTIFACT_FORMAT), META_SHA256: sha256, META_DIGEST: digest, META_PROVIDER: provider}


def require_provider(image: str, built_for: str, wanted: str) -> None:
    if built_for != wanted:
        raise BadRequest(f"image {image!r} on the hub is for provider {built_for!r}, not {wanted!r}")


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client_error(exc: BaseException) -> botocore.exceptions.ClientError | None:
    """boto3 wraps upload failures in S3UploadFailedError and keeps the ClientError only as context."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, botocore.exceptions.ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """The store's answers as the daemon's errors: a clear 4xx or 502, never a 500."""
    try:
        yield
    except UnikError:
        raise
    except (
        botocore.exceptions.ClientError,
        boto3.exceptions.S3UploadFailedError,
        boto3.exceptions.RetriesExceededError,
        s3transfer.exceptions.RetriesExceededError,
    ) as exc:
        client_error = _client_error(exc)
        if client_error is None:
            raise BadGateway(f"{what}: {exc}") from exc
        code = _code(client_error)
        message = client_error.response.get("Error", {}).get("Message") or code
        if code in _UNAUTHORIZED:
            raise Unauthorized(f"{what}: the hub refused the credentials ({code}: {message})") from exc
        if code in _FORBIDDEN:
            reason = "wrong user/password or no permission"
            raise Forbidden(f"{what}: access denied by the hub, {reason} ({code}: {message})") from exc
        if code in _NOT_FOUND:
            raise NotFound(f"{what}: not found") from exc
        raise BadGateway(f"{what}: the hub answered {code}: {message}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        # Unreachable endpoint, dropped connection, timeout: the hub, not the request, failed.
        raise BadGateway(f"{what}: {exc}") from exc
    except ValueError as exc:
        # botocore rejects a malformed endpoint URL with a plain ValueError.
        raise BadRequest(f"{what}: {exc}") from exc
