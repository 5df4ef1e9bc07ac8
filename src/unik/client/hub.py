"""`client.hub`: image hub operations (search, transfers, and push/pull/delete as on `images`)."""

from __future__ import annotations

from unik.client.base import HubProgressCallback, _Collection, _hub_body
from unik.models import HubConfig, HubImage, HubTransfer


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
