"""Images: list, describe, build from an uploaded tar.gz, delete; the hub routes (push, pull, search)."""

from __future__ import annotations

from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from unik.api.deps import ManagerDep
from unik.api.params import NamePath, RefPath, json_body, query_or_form, truthy
from unik.errors import BadRequest, TooLarge
from unik.models import HubConfig, HubImage, HubTransfer, Image

router = APIRouter(tags=["images"])

_HUB_BODY = {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/HubConfig"}}}}}


# Served from the stored wire JSON without a model round trip (see Store.all_wire_json);
# response_model still documents the shape.
@router.get("/images", response_model=list[Image])
async def list_images(manager: ManagerDep) -> Response:
    return Response(manager.list_images_json(), media_type="application/json")


@router.get("/images/{name}", response_model=Image)
async def get_image(name: RefPath, manager: ManagerDep) -> Response:
    return Response(manager.get_image_json(name), media_type="application/json")


@router.post("/images/{name}/create", response_model=Image, status_code=201)
async def create_image(
    name: NamePath,
    request: Request,
    manager: ManagerDep,
    tarfile: UploadFile | None = File(None, description="tar.gz of the application's sources"),
    base: str | None = Query(None, max_length=64),
    lang: str | None = Query(None, max_length=64),
    provider: str | None = Query(None, max_length=64),
    args: str | None = Query(None, description="the program's default arguments"),
    mounts: str | None = Query(None, description="comma-separated mount points"),
    force: str | None = Query(None),
    no_cleanup: str | None = Query(None),
) -> Image:
    del base, lang, provider, args, mounts, force, no_cleanup  # read below from query or form
    params = {
        key: await query_or_form(request, key)
        for key in ("base", "lang", "provider", "args", "mounts", "force", "no_cleanup")
    }
    missing = [key for key in ("base", "lang", "provider") if not params[key]]
    if missing:
        raise BadRequest(f"missing required parameter(s): {', '.join(missing)}")
    if tarfile is None:
        raise BadRequest("missing the multipart file `tarfile` (a tar.gz of the sources)")
    limit = manager.config.max_upload_mb << 20
    if tarfile.size is not None and tarfile.size > limit:
        raise TooLarge(f"the upload is larger than {manager.config.max_upload_mb} MB")
    return await manager.build_image(
        name,
        tarfile.file,
        base=params["base"] or "",
        lang=params["lang"] or "",
        provider_name=params["provider"] or "",
        args=params["args"] or "",
        mounts=(params["mounts"] or "").split(","),
        force=truthy(params["force"]),
        no_cleanup=truthy(params["no_cleanup"]),
    )


@router.delete("/images/{name}", status_code=204, response_class=Response)
async def delete_image(name: RefPath, manager: ManagerDep, force: str | None = Query(None)) -> Response:
    await manager.delete_image(name, force=truthy(force))
    return Response(status_code=204)


async def _hub_config(request: Request) -> HubConfig:
    return HubConfig.from_wire(await json_body(request))


@router.post("/images/push/{name}", status_code=202, response_class=Response, openapi_extra=_HUB_BODY)
async def push_image(name: RefPath, request: Request, manager: ManagerDep) -> Response:
    await manager.push_image(name, await _hub_config(request))
    return Response(status_code=202)


@router.post("/images/pull/{name}", status_code=202, response_model=Image, openapi_extra=_HUB_BODY)
async def pull_image(
    name: NamePath,
    request: Request,
    manager: ManagerDep,
    provider: str = Query(..., max_length=64),
    force: str | None = Query(None),
) -> Image:
    return await manager.pull_image(name, await _hub_config(request), provider_name=provider, force=truthy(force))


@router.post("/images/remote-delete/{name}", status_code=202, response_class=Response, openapi_extra=_HUB_BODY)
async def remote_delete_image(name: NamePath, request: Request, manager: ManagerDep) -> Response:
    await manager.remote_delete_image(name, await _hub_config(request))
    return Response(status_code=202)


@router.post("/hub/search", response_model=list[HubImage], tags=["hub"], openapi_extra=_HUB_BODY)
async def search_hub(request: Request, manager: ManagerDep) -> list[HubImage]:
    """Daemon addition: the images on the hub (POST: the credentials travel in the body)."""
    return await manager.search_hub(await _hub_config(request))


@router.get("/hub/transfers", response_model=list[HubTransfer], tags=["hub"])
async def hub_transfers(manager: ManagerDep) -> list[HubTransfer]:
    """Daemon addition: pushes and pulls in progress, with bytes done and total (for progress bars)."""
    return manager.list_hub_transfers()
