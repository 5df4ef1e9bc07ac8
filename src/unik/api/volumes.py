"""Volumes: every route of API.md is here; creating and attaching arrive with the volumes issue."""

from __future__ import annotations

from typing import NoReturn

from fastapi import APIRouter, Query, Response

from unik.api.deps import ManagerDep
from unik.api.params import NamePath, RefPath
from unik.errors import NotImplementedByProvider
from unik.models import Volume

router = APIRouter(tags=["volumes"])

NOT_YET = "volumes are not implemented yet: creating, attaching and detaching them arrives with volume support"


def _not_yet() -> NoReturn:
    raise NotImplementedByProvider(NOT_YET)


@router.get("/volumes", response_model=list[Volume])
async def list_volumes(manager: ManagerDep) -> list[Volume]:
    return [r.obj for r in manager.store.volumes.all()]


@router.get("/volumes/{name}", response_model=Volume)
async def get_volume(name: RefPath, manager: ManagerDep) -> Volume:
    return manager.store.volumes.find(name).obj


@router.post("/volumes/{name}", response_model=Volume, status_code=201)
async def create_volume(name: NamePath, size: int | None = Query(None, ge=0)) -> Volume:
    del name, size
    _not_yet()


@router.delete("/volumes/{name}", status_code=204, response_class=Response)
async def delete_volume(name: RefPath, manager: ManagerDep, force: str | None = Query(None)) -> Response:
    del force
    manager.store.volumes.find(name)
    _not_yet()


@router.post("/volumes/{name}/attach/{instance_id}", status_code=202)
async def attach_volume(
    name: RefPath, instance_id: RefPath, manager: ManagerDep, mount: str = Query(..., min_length=1)
) -> str:
    del mount
    manager.store.volumes.find(name)
    manager.get_instance(instance_id)
    _not_yet()


@router.post("/volumes/{name}/detach", status_code=202)
async def detach_volume(name: RefPath, manager: ManagerDep) -> str:
    manager.store.volumes.find(name)
    _not_yet()
