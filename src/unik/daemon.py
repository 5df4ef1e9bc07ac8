"""Wiring: config → providers (through the registry) → store → services → app; `unik daemon` calls serve()."""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from pathlib import Path

from fastapi import FastAPI

from unik.aio import use_pidfd_child_watcher
from unik.api import create_app
from unik.artifacts import ArtifactStore
from unik.compilers import CompilerRegistry
from unik.config import DaemonConfig, load_daemon_config
from unik.providers import registry
from unik.providers.base import Provider, ProviderContext
from unik.services import Services
from unik.store import Store

log = logging.getLogger("unik")


def default_data_dir() -> Path:
    return Path.home() / ".unik"


def build_services(data_dir: Path, config: DaemonConfig, config_file: Path | None = None) -> Services:
    data_dir.mkdir(parents=True, exist_ok=True)
    artifacts = ArtifactStore(data_dir / "images")
    context = ProviderContext(data_dir=data_dir, artifacts=artifacts)
    providers: dict[str, Provider] = {
        kind: registry.create(kind, provider_config, context)
        for kind, provider_config in config.provider_configs().items()
    }
    store = Store(data_dir / "unik.db")
    compilers = CompilerRegistry(sorted(providers), config, data_dir / "cache" / "toolchains")
    private = tuple(path for path in (config_file, config.tls_keyfile) if path is not None)
    services = Services.create(config, data_dir, store, providers, artifacts, compilers, private_files=private)
    services.reconciler.recover()
    return services


def build_app(data_dir: Path, config_file: Path | None = None) -> FastAPI:
    config_file = config_file or data_dir / "daemon-config.yaml"
    config = load_daemon_config(config_file)
    if config.auth_token is None and os.environ.get("UNIK_AUTH_TOKEN"):
        config.auth_token = os.environ["UNIK_AUTH_TOKEN"]
    return create_app(build_services(data_dir, config, config_file))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(host: str, port: int, data_dir: Path, config_file: Path | None, debug: bool) -> None:
    import uvicorn

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    data_dir = data_dir.expanduser().resolve()
    app = build_app(data_dir, config_file)
    # Uploads are spooled to temporary files: keep them inside the data dir (process-wide).
    services: Services = app.state.services
    tempfile.tempdir = str(services.ctx.tmp_dir)
    for name, status in services.provider_status().items():
        log.info("provider %s: %s", name, status)
    config = services.config
    if config.auth_token is None and not _is_loopback(host):
        log.warning(
            "listening on %s without a token: anyone who can reach this port can run code here; "
            "set auth_token in the config or UNIK_AUTH_TOKEN",
            host,
        )
    scheme = "https" if config.tls_certfile else "http"
    log.info("unik daemon on %s://%s:%d, data in %s", scheme, host, port, data_dir)
    use_pidfd_child_watcher()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="debug" if debug else "info",
        timeout_graceful_shutdown=5,
        ssl_certfile=config.tls_certfile,
        ssl_keyfile=config.tls_keyfile,
    )
