"""What the resource collections share: progress callback types, the client link, request encoding."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from unik.models import HubConfig, HubTransfer

if TYPE_CHECKING:
    from unik.client.core import UnikClient

ProgressCallback = Callable[[int, int], None]
"""Called as `progress(sent_bytes, total_bytes)` while an upload body is sent."""

HubProgressCallback = Callable[[HubTransfer], None]
"""Called with the daemon's view of a hub push or pull, a few times a second while it runs."""


class _Collection:
    def __init__(self, client: UnikClient) -> None:
        self._client = client


def _flag(value: bool) -> str:
    # The daemon treats only the string "true" as true; Go's %v prints exactly this.
    return "true" if value else "false"


def _seg(value: str) -> str:
    # Names are restricted by the daemon, but ids typed by a user must never be able
    # to reach another route through "/" or "?".
    return quote(value, safe="")


def _hub_body(hub: HubConfig) -> dict[str, Any]:
    # The Go client's config.HubConfig has no json tags, so these are its field names.
    body = {"URL": hub.url, "Username": hub.user, "Password": hub.password}
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}
