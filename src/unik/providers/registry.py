"""The provider kinds the daemon knows, keyed by their config kind (`providers: {<kind>: [...]}`).

Adding a provider is one package and one entry here: the config, the daemon and the services
only ever go through this table. A kind's provider class is imported only when configured.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from unik.providers.aws.config import AwsProviderConfig
from unik.providers.base import Provider, ProviderConfig, ProviderContext
from unik.providers.libvirt.config import LibvirtProviderConfig
from unik.providers.qemu.config import QemuProviderConfig

__all__ = ["ProviderKind", "create", "default_config", "kinds", "lookup", "register", "unregister"]


@dataclass(frozen=True)
class ProviderKind:
    kind: str
    config_model: type[ProviderConfig]
    # The Provider class, or "module:Class" to import it only when a config names this kind.
    factory: type[Provider] | str
    # Whether the built-in default config (no daemon-config.yaml) has one of these.
    in_default_config: bool = False

    def provider_class(self) -> type[Provider]:
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attribute = self.factory.partition(":")
        cls: type[Provider] = getattr(importlib.import_module(module), attribute)
        return cls


_KINDS: dict[str, ProviderKind] = {}


def register(kind: ProviderKind) -> None:
    _KINDS[kind.kind] = kind


def unregister(kind: str) -> None:
    _KINDS.pop(kind, None)


def kinds() -> list[str]:
    return sorted(_KINDS)


def lookup(kind: str) -> ProviderKind | None:
    return _KINDS.get(kind)


def default_config() -> dict[str, list[ProviderConfig]]:
    return {name: [entry.config_model(name=name)] for name, entry in _KINDS.items() if entry.in_default_config}


def create(kind: str, config: ProviderConfig, context: ProviderContext) -> Provider:
    entry = _KINDS[kind]
    return entry.provider_class()(config, context)


register(ProviderKind("qemu", QemuProviderConfig, "unik.providers.qemu.provider:QemuProvider", in_default_config=True))
register(ProviderKind("aws", AwsProviderConfig, "unik.providers.aws.provider:AwsProvider"))
register(ProviderKind("libvirt", LibvirtProviderConfig, "unik.providers.libvirt.provider:LibvirtProvider"))
