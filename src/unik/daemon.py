"""Wiring: config → store → compilers/providers → app; `unik daemon` calls serve()."""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from pathlib import Path

from fastapi import FastAPI

from unik.aio import use_pidfd_child_watcher
from unik.api import create_app
from unik.compilers import CompilerRegistry
from unik.config import DaemonConfig, load_daemon_config
from unik.manager import Manager
from unik.providers.base import Provider
from unik.providers.qemu import QemuProvider
from unik.store import Store

log = logging.getLogger("unik")


def default_data_dir() -> Path:
    return Path.home() / ".unik"


def build_manager(data_dir: Path, config: DaemonConfig, config_file: Path | None = None) -> Manager:
    data_dir.mkdir(parents=True, exist_ok=True)
    providers: dict[str, Provider] = {}
    if config.qemu is not None:
        providers["qemu"] = QemuProvider(config.qemu, data_dir)
    store = Store(data_dir / "unik.db")
    compilers = CompilerRegistry(sorted(providers), config, data_dir / "cache" / "toolchains")
    private = tuple(path for path in (config_file, config.tls_keyfile) if path is not None)
    manager = Manager(config, data_dir, store, providers, compilers, private_files=private)
    manager.recover()
    return manager


def build_app(data_dir: Path, config_file: Path | None = None) -> FastAPI:
    config_file = config_file or data_dir / "daemon-config.yaml"
    config = load_daemon_config(config_file)
    if config.auth_token is None and os.environ.get("UNIK_AUTH_TOKEN"):
        config.auth_token = os.environ["UNIK_AUTH_TOKEN"]
    return create_app(build_manager(data_dir, config, config_file))


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
    tempfile.tempdir = str(app.state.manager.tmp_dir)
    for name, provider in app.state.manager.providers.items():
        log.info("provider %s: %s", name, provider.status())
    if app.state.manager.config.auth_token is None and not _is_loopback(host):
        log.warning(
            "listening on %s without a token: anyone who can reach this port can run code here; "
            "set auth_token in the config or UNIK_AUTH_TOKEN",
            host,
        )
    scheme = "https" if app.state.manager.config.tls_certfile else "http"
    log.info("unik daemon on %s://%s:%d, data in %s", scheme, host, port, data_dir)
    config = app.state.manager.config
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
