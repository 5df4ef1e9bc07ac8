"""Volumes: list, describe, create (empty, from a tar.gz, or a raw disk image), delete; attach, detach."""

from __future__ import annotations

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from fastapi.responses import PlainTextResponse

from unik.api.deps import ServicesDep
from unik.api.params import NamePath, RefPath, check_upload_size, query_or_form, truthy
from unik.models import AttachVolumeRequest, CreateVolumeRequest, Volume

router = APIRouter(tags=["volumes"])


@router.get("/volumes", response_model=list[Volume])
async def list_volumes(services: ServicesDep) -> list[Volume]:
    return services.volumes.list()


@router.get("/volumes/{name}", response_model=Volume)
async def get_volume(name: RefPath, services: ServicesDep) -> Volume:
    return services.volumes.get(name)


@router.post("/volumes/{name}", response_model=Volume, status_code=201)
async def create_volume(
    name: NamePath,
    request: Request,
    services: ServicesDep,
    tarfile: UploadFile | None = File(
        None, description="the data: a tar.gz whose files fill the new filesystem, or with raw=true a disk image"
    ),
    size: int | None = Query(
        None, ge=0, description="MB; required without data; with data 0 or absent fits the data with headroom"
    ),
    provider: str | None = Query(None, max_length=64, description="default: the only configured provider"),
    raw: str | None = Query(None, description="true: the uploaded file is a raw disk image used as it is"),
    fs_type: str | None = Query(None, alias="type", max_length=16, description="ext2 (default), ext4 or fat"),
    no_cleanup: str | None = Query(None, description="true: keep the unpacked files and name their folder in the log"),
) -> Volume:
    """Create a volume, in one of two forms.

    With data: `multipart/form-data` with the file `tarfile`; `provider`, `raw`, `type` and
    `no_cleanup` in the query string or as form fields. Without data (any other body, the Go
    client posts JSON `null`): an empty filesystem of `size` MB.
    """
    del provider, raw, fs_type, no_cleanup  # read below from the query or the form
    params = {key: await query_or_form(request, key) for key in ("provider", "raw", "type", "no_cleanup")}
    if tarfile is not None:
        check_upload_size(tarfile, services.config.max_upload_mb)
    create = CreateVolumeRequest(
        name=name,
        data=tarfile.file if tarfile is not None else None,
        provider=params["provider"] or None,
        raw=truthy(params["raw"]),
        fs_type=params["type"] or None,
        size_mb=size or 0,
        no_cleanup=truthy(params["no_cleanup"]),
    )
    return await services.volumes.create(create)


@router.delete("/volumes/{name}", status_code=204, response_class=Response)
async def delete_volume(
    name: RefPath,
    services: ServicesDep,
    force: str | None = Query(None, description="true: detach it first if attached"),
) -> Response:
    await services.volumes.delete(name, force=truthy(force))
    return Response(status_code=204)


@router.post("/volumes/{name}/attach/{instance_id}", status_code=202, response_class=PlainTextResponse)
async def attach_volume(
    name: RefPath, instance_id: RefPath, services: ServicesDep, mount: str = Query(..., min_length=1, max_length=255)
) -> PlainTextResponse:
    attached = await services.volumes.attach(AttachVolumeRequest(volume=name, instance=instance_id, mount=mount))
    return PlainTextResponse(attached, status_code=202)


@router.post("/volumes/{name}/detach", status_code=202, response_class=PlainTextResponse)
async def detach_volume(name: RefPath, services: ServicesDep) -> PlainTextResponse:
    return PlainTextResponse(await services.volumes.detach(name), status_code=202)
