"""`client.volumes`: the `/volumes` routes (list, get, create empty or from data, delete, attach, detach)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from unik.client.base import ProgressCallback, _Collection, _flag, _seg
from unik.client.uploads import _MultipartBody, _open_upload
from unik.models import Volume


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
