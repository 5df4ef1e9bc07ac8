"""`client.instances`: the `/instances` routes (list, get, run, start, stop, delete, logs)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx

from unik.client.base import _Collection, _flag, _seg
from unik.models import Instance, PortMapping, RunInstanceRequest


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
        warm_start: bool = False,
    ) -> Instance:
        """Boot a new instance; `mounts` maps a mount point to a volume name or id; `ports`
        publishes host ports (``{"HostPort": 18080, "GuestPort": 8080, "Protocol": "tcp"}``);
        `warm_start` starts it as a clone of a VM template of the same image, Env, args and memory
        (the first such run boots cold and becomes the template once its app is ready)."""
        request = RunInstanceRequest(
            InstanceName=name,
            ImageName=image,
            Env=dict(env) if env else None,
            Mounts=dict(mounts) if mounts else None,
            MemoryMb=memory_mb,
            NoCleanup=no_cleanup,
            DebugMode=debug_mode,
        )
        # Without ports or warm_start the body is exactly what the Go client sends.
        body = request.model_dump(mode="json", exclude={"Ports", "WarmStart"})
        if warm_start:
            body["WarmStart"] = True
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
