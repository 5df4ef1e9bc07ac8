"""`client.images`: the `/images` routes (list, get, build, delete, export, hub push/pull/remote-delete)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from unik.client.base import HubProgressCallback, ProgressCallback, _Collection, _flag, _hub_body, _seg
from unik.client.downloads import IDENTITY, _download
from unik.client.uploads import _MultipartBody, _open_upload
from unik.models import HubConfig, Image

DISK_FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi")
"""What `GET /images/{name}/disk` makes; the daemon has the last word (400 for others)."""


def disk_filename(name: str, fmt: str) -> str:
    """The file name the daemon gives a disk: `<image>.<ext>`, where raw disks are `.img`."""
    return f"{name}.{'img' if fmt == 'raw' else fmt}"


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

    def export(
        self,
        name: str,
        fmt: str,
        dest: Path | str,
        *,
        env: Mapping[str, str] | None = None,
        args: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Download a bootable disk of the image in format `fmt` to `dest`; returns its path.

        `dest` is a file, or an existing folder to put `<name>.<ext>` in. `env` and `args` are
        baked into the disk's run configuration. The disk is written under a temporary name
        beside `dest` and renamed when complete, so `dest` is never half written.
        """
        target = Path(dest).expanduser()
        if target.is_dir():
            target = target / disk_filename(name, fmt)
        params = [("format", fmt)]
        # Sent as given, one `env` per variable: the daemon validates keys and answers 400.
        params += [("env", f"{key}={value}") for key, value in (env or {}).items()]
        if args is not None:
            params.append(("args", args))

        def open_response() -> httpx.Response:
            return self._client._request(
                "GET", f"/images/{_seg(name)}/disk", params=params, headers=IDENTITY, stream=True
            )

        return _download(open_response, target, progress)

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
