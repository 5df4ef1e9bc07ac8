"""Images: list, describe, build from an uploaded tar.gz, delete; the hub routes."""

from __future__ import annotations

from typing import NoReturn

from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from unik.api.deps import ManagerDep
from unik.api.params import NamePath, RefPath, json_body, query_or_form, truthy
from unik.errors import BadRequest, NotImplementedByProvider, TooLarge
from unik.models import HubConfig, Image

router = APIRouter(tags=["images"])

_HUB_BODY = {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/HubConfig"}}}}}


@router.get("/images", response_model=list[Image])
async def list_images(manager: ManagerDep) -> list[Image]:
    return manager.list_images()


@router.get("/images/{name}", response_model=Image)
async def get_image(name: RefPath, manager: ManagerDep) -> Image:
    return manager.get_image(name)


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


async def _hub_not_ready(request: Request) -> NoReturn:
    HubConfig.from_wire(await json_body(request))  # a malformed body is a 400 even now
    raise NotImplementedByProvider("the image hub (S3 push/pull/remote-delete) is not implemented yet")


@router.post("/images/push/{name}", status_code=202, openapi_extra=_HUB_BODY)
async def push_image(name: RefPath, request: Request, manager: ManagerDep) -> None:
    manager.get_image(name)
    await _hub_not_ready(request)


@router.post("/images/pull/{name}", status_code=202, openapi_extra=_HUB_BODY)
async def pull_image(
    name: NamePath,
    request: Request,
    manager: ManagerDep,
    provider: str = Query(..., max_length=64),
    force: str | None = Query(None),
) -> None:
    del name, manager, provider, force
    await _hub_not_ready(request)


@router.post("/images/remote-delete/{name}", status_code=202, openapi_extra=_HUB_BODY)
async def remote_delete_image(name: NamePath, request: Request) -> None:
    del name
    await _hub_not_ready(request)
