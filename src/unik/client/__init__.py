"""Python client of the UniK daemon (docs/api.md), shaped like docker-py.

    client = UnikClient("localhost:3000")
    image = client.images.build("hello", Path("src/"), base="linux", lang="c", provider="qemu")
    instance = client.instances.run("hello-1", "hello")
    for chunk in client.instances.follow_logs(instance.Id):
        print(chunk, end="")

Requests are shaped exactly as the original Go client (`pkg/client`) shaped them, so
this client also works against the original daemon where the routes overlap. `core` holds
UnikClient and its HTTP plumbing; `images`, `instances`, `volumes` and `hub` one collection each.
"""

from unik.client.base import HubProgressCallback, ProgressCallback
from unik.client.core import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, UnikClient, normalize_host
from unik.client.errors import UnikAPIError, UnikClientError, UnikConnectionError
from unik.client.hub import HubCollection
from unik.client.images import ImageCollection
from unik.client.instances import InstanceCollection
from unik.client.volumes import VolumeCollection

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "HubCollection",
    "HubProgressCallback",
    "ImageCollection",
    "InstanceCollection",
    "ProgressCallback",
    "UnikAPIError",
    "UnikClient",
    "UnikClientError",
    "UnikConnectionError",
    "VolumeCollection",
    "normalize_host",
]
