"""Images: list, describe, build from an uploaded tar.gz, export as a disk, delete; the hub
routes (push, pull, search)."""

from __future__ import annotations

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse

from unik.api.deps import ServicesDep
from unik.api.params import NamePath, RefPath, check_upload_size, json_body, query_or_form, truthy
from unik.errors import BadRequest
from unik.models import BuildImageRequest, ExportDiskRequest, HubConfig, HubImage, HubTransfer, Image, PullImageRequest

router = APIRouter(tags=["images"])

_HUB_BODY = {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/HubConfig"}}}}}


# Served from the stored wire JSON without a model round trip (see Store.all_wire_json);
# response_model still documents the shape.
@router.get("/images", response_model=list[Image])
async def list_images(services: ServicesDep) -> Response:
    return Response(services.images.list_json(), media_type="application/json")


@router.get("/images/{name}", response_model=Image)
async def get_image(name: RefPath, services: ServicesDep) -> Response:
    return Response(services.images.get_json(name), media_type="application/json")


@router.post("/images/{name}/create", response_model=Image, status_code=201)
async def create_image(
    name: NamePath,
    request: Request,
    services: ServicesDep,
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
    check_upload_size(tarfile, services.config.max_upload_mb)
    build = BuildImageRequest(
        name=name,
        sources=tarfile.file,
        base=params["base"] or "",
        lang=params["lang"] or "",
        provider=params["provider"] or "",
        args=params["args"] or "",
        mounts=(params["mounts"] or "").split(","),
        force=truthy(params["force"]),
        no_cleanup=truthy(params["no_cleanup"]),
    )
    return await services.builds.build(build)


@router.get(
    "/images/{name}/disk",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the bootable disk"}},
)
async def export_disk(
    name: RefPath,
    services: ServicesDep,
    format: str = Query(..., max_length=16, description="raw, qcow2, vmdk, vhd, vhdx or vdi"),
    env: list[str] = Query([], description="KEY=VALUE baked into the disk's run config (repeatable)"),
    args: str | None = Query(None, max_length=4096, description="default arguments (else the image's)"),
) -> FileResponse:
    disk = await services.disks.export(ExportDiskRequest(image=name, format=format, env=env, args=args))
    return FileResponse(disk.path, media_type="application/octet-stream", filename=disk.filename)


@router.delete("/images/{name}", status_code=204, response_class=Response)
async def delete_image(name: RefPath, services: ServicesDep, force: str | None = Query(None)) -> Response:
    await services.images.delete(name, force=truthy(force))
    return Response(status_code=204)


async def _hub_config(request: Request) -> HubConfig:
    return HubConfig.from_wire(await json_body(request))


@router.post("/images/push/{name}", status_code=202, response_class=Response, openapi_extra=_HUB_BODY)
async def push_image(name: RefPath, request: Request, services: ServicesDep) -> Response:
    await services.hub.push(name, await _hub_config(request))
    return Response(status_code=202)


@router.post("/images/pull/{name}", status_code=202, response_model=Image, openapi_extra=_HUB_BODY)
async def pull_image(
    name: NamePath,
    request: Request,
    services: ServicesDep,
    provider: str = Query(..., max_length=64),
    force: str | None = Query(None),
) -> Image:
    pull = PullImageRequest(name=name, credentials=await _hub_config(request), provider=provider, force=truthy(force))
    return await services.hub.pull(pull)


@router.post("/images/remote-delete/{name}", status_code=202, response_class=Response, openapi_extra=_HUB_BODY)
async def remote_delete_image(name: NamePath, request: Request, services: ServicesDep) -> Response:
    await services.hub.remote_delete(name, await _hub_config(request))
    return Response(status_code=202)


@router.post("/hub/search", response_model=list[HubImage], tags=["hub"], openapi_extra=_HUB_BODY)
async def search_hub(request: Request, services: ServicesDep) -> list[HubImage]:
    """Daemon addition: the images on the hub (POST: the credentials travel in the body)."""
    return await services.hub.search(await _hub_config(request))


@router.get("/hub/transfers", response_model=list[HubTransfer], tags=["hub"])
async def hub_transfers(services: ServicesDep) -> list[HubTransfer]:
    """Daemon addition: pushes and pulls in progress, with bytes done and total (for progress bars)."""
    return services.hub.list_transfers()
