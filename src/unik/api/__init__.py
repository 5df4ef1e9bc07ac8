"""The HTTP layer: one router per resource, one error shape; no business logic here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from unik import __version__
from unik.api import images, info, instances, volumes, web
from unik.api.access import AccessGuard
from unik.api.errors import ERROR_RESPONSES, install_error_handlers
from unik.models import HubConfig, RunInstanceRequest
from unik.services import Services


def create_app(services: Services) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        monitor = asyncio.create_task(services.reconciler.monitor())
        try:
            yield
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor

    app = FastAPI(
        title="unik daemon",
        version=__version__,
        description="Compile applications into micro-VM images and run them (the UniK REST API).",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.services = services
    app.add_middleware(
        AccessGuard, token=services.config.auth_token, max_body_bytes=services.config.max_upload_mb << 20
    )
    install_error_handlers(app)
    for router in (info.router, images.router, instances.router, volumes.router):
        app.include_router(router)
    web.install(app)
    _publish_body_schemas(app)
    return app


def _publish_body_schemas(app: FastAPI) -> None:
    """Bodies read by hand (no Content-Type from the Go client) still belong in /openapi.json."""
    generate = app.openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        run_request = RunInstanceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        # Nested models (PortMapping) become components of their own, where the refs point.
        components.update(run_request.pop("$defs", {}))
        components["RunInstanceRequest"] = run_request
        components["HubConfig"] = HubConfig.model_json_schema()
        _errors_as_json(schema)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _errors_as_json(schema: dict[str, object]) -> None:
    """Every error is JSON {"message"}, also from text routes (FastAPI would document those as
    text/plain), and a validation failure is a 400: FastAPI's 422 is never sent."""
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    paths: dict[str, dict[str, dict[str, dict[str, dict[str, object]]]]] = schema.get("paths", {})  # type: ignore[assignment]
    for operations in paths.values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for status, response in responses.items():
                if status[0] in "45":
                    response["content"] = error_content
