"""UnikClient, one daemon's client: its address, the info routes and the HTTP plumbing collections use."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from unik.client.base import HubProgressCallback
from unik.client.errors import UnikAPIError, UnikClientError, UnikConnectionError, _check
from unik.client.hub import HubCollection
from unik.client.images import ImageCollection
from unik.client.instances import InstanceCollection
from unik.client.uploads import _MultipartBody
from unik.client.volumes import VolumeCollection

DEFAULT_PORT = 3000
DEFAULT_HOST = f"localhost:{DEFAULT_PORT}"
# Builds compile a whole application and boots wait for the guest, so a read may
# legitimately take minutes; only the connect should fail fast.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

# How often a push or pull in progress asks the daemon how far it got.
_TRANSFER_POLL_SECONDS = 0.25


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
        # Pairs for a key that repeats (`env=A=1&env=B=2`); a Mapping cannot hold those.
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
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
