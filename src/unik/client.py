"""Python client of the UniK daemon (../shared/API.md), shaped like docker-py.

    client = UnikClient("localhost:3000")
    image = client.images.build("hello", Path("src/"), base="linux", lang="c", provider="qemu")
    instance = client.instances.run("hello-1", "hello")
    for chunk in client.instances.follow_logs(instance.Id):
        print(chunk, end="")

Requests are shaped exactly as the original Go client (`pkg/client`) shaped them, so
this client also works against the original daemon where the routes overlap.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

import httpx

from unik.models import HubConfig, HubImage, HubTransfer, Image, Instance, PortMapping, RunInstanceRequest, Volume

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "HubProgressCallback",
    "ProgressCallback",
    "UnikAPIError",
    "UnikClient",
    "UnikClientError",
    "UnikConnectionError",
    "normalize_host",
]

DEFAULT_PORT = 3000
DEFAULT_HOST = f"localhost:{DEFAULT_PORT}"
# Builds compile a whole application and boots wait for the guest, so a read may
# legitimately take minutes; only the connect should fail fast.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

ProgressCallback = Callable[[int, int], None]
"""Called as `progress(sent_bytes, total_bytes)` while an upload body is sent."""

HubProgressCallback = Callable[[HubTransfer], None]
"""Called with the daemon's view of a hub push or pull, a few times a second while it runs."""

# How often a push or pull in progress asks the daemon how far it got.
_TRANSFER_POLL_SECONDS = 0.25

_CHUNK = 64 * 1024


class UnikClientError(Exception):
    """Base of everything this client raises for a failed call."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnikAPIError(UnikClientError):
    """The daemon answered with a non-2xx status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status_code})"


class UnikConnectionError(UnikClientError):
    """The daemon could not be reached (refused, unresolvable, timed out, dropped)."""


def normalize_host(host: str) -> str:
    """Turn `host`, `host:port` or an http(s) URL into a base URL.

    A bare host gets the daemon's default port, because that is what `unik target`
    users mean; an explicit URL is taken as written.
    """
    host = host.strip()
    if not host:
        host = DEFAULT_HOST
    if "://" in host:
        return host.rstrip("/")
    parts = urlsplit(f"http://{host}")
    if parts.port is None:
        host = f"{host}:{DEFAULT_PORT}"
    return f"http://{host}".rstrip("/")


def _flag(value: bool) -> str:
    # The daemon treats only the string "true" as true; Go's %v prints exactly this.
    return "true" if value else "false"


def _seg(value: str) -> str:
    # Names are restricted by the daemon, but ids typed by a user must never be able
    # to reach another route through "/" or "?".
    return quote(value, safe="")


def _error_message(response: httpx.Response) -> str:
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if value:
                return json.dumps(value)
    return text.strip() or response.reason_phrase or f"HTTP {response.status_code}"


def _check(response: httpx.Response) -> httpx.Response:
    if not response.is_success:
        response.read()
        raise UnikAPIError(response.status_code, _error_message(response))
    return response


# --------------------------------------------------------------------------- uploads


def _pack_folder(folder: Path, out: IO[bytes]) -> None:
    """Write `folder` as tar.gz with member names relative to it (no leading ./)."""
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(str(child), arcname=child.name)


def _open_upload(stack: contextlib.ExitStack, source: Path) -> tuple[IO[bytes], str]:
    """An open binary file holding the upload and the file name to announce for it."""
    source = Path(source).expanduser()
    if source.is_dir():
        # A temp file rather than memory: application folders can be large.
        tmp = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (the stack closes it)
        _pack_folder(source, tmp)
        tmp.seek(0)
        return tmp, f"{source.resolve().name or 'sources'}.tar.gz"
    if not source.is_file():
        raise FileNotFoundError(f"no such file or folder: {source}")
    return stack.enter_context(source.open("rb")), source.name


class _MultipartBody:
    """A multipart/form-data body streamed from a file, reporting progress.

    httpx's own `files=` encoder gives no progress hook, so the (simple) framing is
    written here; the length is known up front so the body is not sent chunked.
    """

    def __init__(
        self,
        fields: Mapping[str, str],
        file_field: str,
        filename: str,
        fileobj: IO[bytes],
        progress: ProgressCallback | None,
    ) -> None:
        self.boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields.items()
        )
        safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head += (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{file_field}"; filename="{safe_name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._head = head
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        fileobj.seek(0, os.SEEK_END)
        self._file_size = fileobj.tell()
        fileobj.seek(0)
        self._file = fileobj
        self._progress = progress
        self.length = len(self._head) + self._file_size + len(self._tail)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.length),
        }

    def __iter__(self) -> Iterator[bytes]:
        sent = 0

        def report(n: int) -> None:
            nonlocal sent
            sent += n
            if self._progress is not None:
                self._progress(sent, self.length)

        if self._progress is not None:
            self._progress(0, self.length)
        yield self._head
        report(len(self._head))
        self._file.seek(0)
        while chunk := self._file.read(_CHUNK):
            yield chunk
            report(len(chunk))
        yield self._tail
        report(len(self._tail))


# ----------------------------------------------------------------------- collections


class _Collection:
    def __init__(self, client: UnikClient) -> None:
        self._client = client


class ImageCollection(_Collection):
    """`/images` routes."""

    def list(self) -> list[Image]:
        return [Image.model_validate(x) for x in self._client._get_json("/images") or []]

    def get(self, name: str) -> Image:
        return Image.model_validate(self._client._get_json(f"/images/{_seg(name)}"))

    def build(
        self,
        name: str,
        source: Path,
        base: str,
        lang: str,
        provider: str,
        args: str = "",
        mounts: Sequence[str] = (),
        force: bool = False,
        no_cleanup: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Image:
        """Upload `source` (a folder, packed here, or a ready .tar.gz) and build it.

        Parameters go in the query string and the sources as multipart field
        `tarfile`, as the Go client sends them.
        """
        params = {
            "base": base,
            "lang": lang,
            "provider": provider,
            "args": args,
            "mounts": ",".join(mounts),
            "force": _flag(force),
            "no_cleanup": _flag(no_cleanup),
        }
        with contextlib.ExitStack() as stack:
            fileobj, filename = _open_upload(stack, source)
            body = _MultipartBody({}, "tarfile", filename, fileobj, progress)
            response = self._client._request(
                "POST", f"/images/{_seg(name)}/create", params=params, content=body, headers=body.headers
            )
        return Image.model_validate(response.json())

    def delete(self, name: str, force: bool = False) -> None:
        self._client._request("DELETE", f"/images/{_seg(name)}", params={"force": _flag(force)})

    def push(self, name: str, hub: HubConfig, progress: HubProgressCallback | None = None) -> None:
        """Upload an image to the hub; the daemon does the transfer, `progress` watches it."""
        with self._client._watch_transfer(name, "push", progress):
            self._client._request("POST", f"/images/push/{_seg(name)}", **_hub_body(hub))

    def pull(
        self, name: str, hub: HubConfig, provider: str, force: bool = False, progress: HubProgressCallback | None = None
    ) -> None:
        params = {"provider": provider, "force": _flag(force)}
        with self._client._watch_transfer(name, "pull", progress):
            self._client._request("POST", f"/images/pull/{_seg(name)}", params=params, **_hub_body(hub))

    def remote_delete(self, name: str, hub: HubConfig) -> None:
        self._client._request("POST", f"/images/remote-delete/{_seg(name)}", **_hub_body(hub))


def _hub_body(hub: HubConfig) -> dict[str, Any]:
    # The Go client's config.HubConfig has no json tags, so these are its field names.
    body = {"URL": hub.url, "Username": hub.user, "Password": hub.password}
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


class HubCollection(_Collection):
    """Image hub operations; the same routes as `images.push/pull/remote_delete`."""

    def push(self, name: str, hub: HubConfig, progress: HubProgressCallback | None = None) -> None:
        self._client.images.push(name, hub, progress=progress)

    def pull(
        self, name: str, hub: HubConfig, provider: str, force: bool = False, progress: HubProgressCallback | None = None
    ) -> None:
        self._client.images.pull(name, hub, provider, force=force, progress=progress)

    def search(self, hub: HubConfig) -> list[HubImage]:
        """The images on the hub (a daemon addition: `POST /hub/search`)."""
        response = self._client._request("POST", "/hub/search", **_hub_body(hub))
        return [HubImage.model_validate(x) for x in response.json() or []]

    def transfers(self) -> list[HubTransfer]:
        """Pushes and pulls the daemon is doing now (a daemon addition: `GET /hub/transfers`)."""
        return [HubTransfer.model_validate(x) for x in self._client._get_json("/hub/transfers") or []]

    def delete(self, name: str, hub: HubConfig) -> None:
        self._client.images.remote_delete(name, hub)

    remote_delete = delete


class InstanceCollection(_Collection):
    """`/instances` routes."""

    def list(self) -> list[Instance]:
        return [Instance.model_validate(x) for x in self._client._get_json("/instances") or []]

    def get(self, id: str) -> Instance:
        return Instance.model_validate(self._client._get_json(f"/instances/{_seg(id)}"))

    def run(
        self,
        name: str,
        image: str,
        env: Mapping[str, str] | None = None,
        mounts: Mapping[str, str] | None = None,
        memory_mb: int = 0,
        no_cleanup: bool = False,
        debug_mode: bool = False,
        ports: Sequence[PortMapping | Mapping[str, Any]] | None = None,
    ) -> Instance:
        """Boot a new instance; `mounts` maps a mount point to a volume name or id; `ports`
        publishes host ports (``{"HostPort": 18080, "GuestPort": 8080, "Protocol": "tcp"}``)."""
        request = RunInstanceRequest(
            InstanceName=name,
            ImageName=image,
            Env=dict(env) if env else None,
            Mounts=dict(mounts) if mounts else None,
            MemoryMb=memory_mb,
            NoCleanup=no_cleanup,
            DebugMode=debug_mode,
        )
        # Without ports the body is exactly what the Go client sends.
        body = request.model_dump(mode="json", exclude={"Ports"})
        if ports:
            # Sent as given: the daemon validates them and answers 400 with a message.
            body["Ports"] = [p.model_dump() if isinstance(p, PortMapping) else dict(p) for p in ports]
        response = self._client._request(
            "POST",
            "/instances/run",
            content=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        return Instance.model_validate(response.json())

    def start(self, id: str) -> None:
        self._client._request("POST", f"/instances/{_seg(id)}/start")

    def stop(self, id: str) -> None:
        self._client._request("POST", f"/instances/{_seg(id)}/stop")

    def delete(self, id: str, force: bool = False) -> None:
        self._client._request("DELETE", f"/instances/{_seg(id)}", params={"force": _flag(force)})

    def logs(self, id: str) -> str:
        return self._client._request("GET", f"/instances/{_seg(id)}/logs").text

    def follow_logs(self, id: str, delete: bool = False) -> Iterator[str]:
        """Stream the console as text chunks until the instance stops.

        The request is sent (and errors raised) by this call, not at the first
        iteration. With `delete`, the daemon deletes the instance when this stream is
        closed early, e.g. by closing the returned generator.
        """
        response = self._client._request(
            "GET",
            f"/instances/{_seg(id)}/logs",
            params={"follow": "true", "delete": _flag(delete)},
            stream=True,
            # A quiet guest may print nothing for hours; that is not a failure.
            timeout=httpx.Timeout(self._client.timeout.connect, read=None),
        )
        return self._client._iter_text(response)


class VolumeCollection(_Collection):
    """`/volumes` routes."""

    def list(self) -> list[Volume]:
        return [Volume.model_validate(x) for x in self._client._get_json("/volumes") or []]

    def get(self, name: str) -> Volume:
        return Volume.model_validate(self._client._get_json(f"/volumes/{_seg(name)}"))

    def create(
        self,
        name: str,
        size_mb: int = 0,
        provider: str = "qemu",
        data: Path | None = None,
        raw: bool = False,
        fs_type: str | None = None,
        no_cleanup: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Volume:
        """Create a volume, empty (`size_mb` required) or filled from `data`.

        `data` is a folder (packed here), a tar.gz, or with `raw` a disk image used
        as it is.
        """
        path = f"/volumes/{_seg(name)}"
        if data is None:
            params = {"size": str(size_mb), "provider": provider, "no_cleanup": _flag(no_cleanup)}
            if raw:
                params["raw"] = "true"  # lets the daemon reject it with its own message
            if fs_type:
                params["type"] = fs_type
            # The Go client posts the JSON body `null`; the daemon keys on "not multipart".
            response = self._client._request(
                "POST", path, params=params, content=b"null", headers={"Content-Type": "application/json"}
            )
            return Volume.model_validate(response.json())
        fields = {"provider": provider, "raw": _flag(raw), "no_cleanup": _flag(no_cleanup)}
        if fs_type:
            fields["type"] = fs_type
        with contextlib.ExitStack() as stack:
            fileobj, filename = _open_upload(stack, data)
            body = _MultipartBody(fields, "tarfile", filename, fileobj, progress)
            response = self._client._request(
                "POST", path, params={"size": str(size_mb)}, content=body, headers=body.headers
            )
        return Volume.model_validate(response.json())

    def delete(self, name: str, force: bool = False) -> None:
        self._client._request("DELETE", f"/volumes/{_seg(name)}", params={"force": _flag(force)})

    def attach(self, name: str, instance_id: str, mount: str) -> str:
        """Attach to an instance at mount point `mount`; returns the volume's name."""
        response = self._client._request(
            "POST", f"/volumes/{_seg(name)}/attach/{_seg(instance_id)}", params={"mount": mount}
        )
        return response.text

    def detach(self, name: str) -> str:
        """Detach from its instance; returns the volume's name."""
        return self._client._request("POST", f"/volumes/{_seg(name)}/detach").text


# ---------------------------------------------------------------------------- client


class UnikClient:
    """Client of one UniK daemon.

    `host` is `host`, `host:port` or an `http(s)://` URL. `transport` replaces the
    network (tests pass an `httpx.MockTransport`).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        token: str | None = None,
        timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_host(host)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        headers = {"User-Agent": "unik-python-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout, transport=transport)
        self.images = ImageCollection(self)
        self.instances = InstanceCollection(self)
        self.volumes = VolumeCollection(self)
        self.hub = HubCollection(self)

    def __repr__(self) -> str:
        return f"UnikClient({self.base_url!r})"

    def __enter__(self) -> UnikClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # info routes

    def available_compilers(self) -> list[str]:
        return list(self._get_json("/available_compilers") or [])

    def available_providers(self) -> list[str]:
        return list(self._get_json("/available_providers") or [])

    def describe_compiler(self, provider: str, base: str, lang: str) -> str:
        params = {"provider": provider, "base": base, "lang": lang}
        return self._request("GET", "/describe_compiler", params=params).text

    def ping(self) -> bool:
        """True when the daemon answers `/_ping`; raises when it cannot be reached."""
        return self._request("GET", "/_ping").text.strip() == "OK"

    def version(self) -> dict[str, Any]:
        return dict(self._get_json("/version"))

    # plumbing

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | _MultipartBody | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        request = self._http.build_request(
            method,
            path,
            params=params,
            content=content,  # type: ignore[arg-type]  # an iterable of bytes is valid content
            headers=headers,
            timeout=timeout if timeout is not None else self.timeout,
        )
        try:
            response = self._http.send(request, stream=stream)
        except httpx.ConnectError as exc:
            raise UnikConnectionError(f"cannot connect to the UniK daemon at {self.base_url}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UnikConnectionError(
                f"the UniK daemon at {self.base_url} did not answer in time ({method} {path})"
            ) from exc
        except httpx.TransportError as exc:
            raise UnikConnectionError(f"connection to the UniK daemon at {self.base_url} failed: {exc}") from exc
        try:
            return _check(response)
        finally:
            if stream and not response.is_success:
                response.close()

    @contextlib.contextmanager
    def _watch_transfer(self, image: str, direction: str, progress: HubProgressCallback | None) -> Iterator[None]:
        """While the body runs, report the daemon's progress on `image` to `progress`."""
        if progress is None:
            yield
            return
        done = threading.Event()

        def poll() -> None:
            while not done.wait(_TRANSFER_POLL_SECONDS):
                try:
                    transfers = self.hub.transfers()
                except UnikClientError:
                    return  # e.g. the original daemon, which has no such route: no progress then
                for transfer in transfers:
                    if transfer.Direction == direction and image in (transfer.Image, transfer.ImageId):
                        progress(transfer)
                        break

        watcher = threading.Thread(target=poll, name="unik-transfer-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def _get_json(self, path: str) -> Any:
        response = self._request("GET", path)
        try:
            return response.json()
        except ValueError as exc:
            raise UnikAPIError(response.status_code, f"{path}: answer is not JSON: {response.text[:200]}") from exc

    def _iter_text(self, response: httpx.Response) -> Iterator[str]:
        try:
            yield from response.iter_text()
        except httpx.TransportError as exc:
            raise UnikConnectionError(f"log stream from {self.base_url} broke: {exc}") from exc
        finally:
            response.close()
