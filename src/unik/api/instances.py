"""Instances: run, list, describe, start, stop, delete, and the console logs."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from unik.api.deps import ManagerDep
from unik.api.params import RefPath, json_body, truthy
from unik.errors import BadRequest
from unik.models import Instance, RunInstanceRequest

router = APIRouter(tags=["instances"])

_RUN_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunInstanceRequest"}}},
    }
}


# Served from the stored wire JSON without a model round trip (see Store.all_wire_json);
# response_model still documents the shape.
@router.get("/instances", response_model=list[Instance])
async def list_instances(manager: ManagerDep) -> Response:
    return Response(manager.list_instances_json(), media_type="application/json")


@router.get("/instances/{id}", response_model=Instance)
async def get_instance(id: RefPath, manager: ManagerDep) -> Response:
    return Response(manager.get_instance_json(id), media_type="application/json")


@router.delete("/instances/{id}", status_code=204, response_class=Response)
async def delete_instance(id: RefPath, manager: ManagerDep, force: str | None = Query(None)) -> Response:
    await manager.delete_instance(id, force=truthy(force))
    return Response(status_code=204)


@router.post("/instances/run", response_model=Instance, status_code=201, openapi_extra=_RUN_BODY)
async def run_instance(request: Request, manager: ManagerDep) -> Instance:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON RunInstanceRequest object")
    try:
        run_request = RunInstanceRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise BadRequest(f"invalid RunInstanceRequest: {where + ': ' if where else ''}{first.get('msg')}") from exc
    return await manager.run_instance(run_request)


@router.post("/instances/{id}/start")
async def start_instance(id: RefPath, manager: ManagerDep) -> Instance:
    return await manager.start_instance(id)


@router.post("/instances/{id}/stop")
async def stop_instance(id: RefPath, manager: ManagerDep) -> Instance:
    return await manager.stop_instance(id)


@router.get("/instances/{id}/logs", response_class=PlainTextResponse)
async def instance_logs(
    id: RefPath,
    manager: ManagerDep,
    follow: str | None = Query(None, description="stream new output until the instance stops"),
    fallow: str | None = Query(None, description="the seed's spelling of follow"),
    delete: str | None = Query(None, description="with follow: delete the instance when the client leaves"),
) -> Response:
    if not (truthy(follow) or truthy(fallow)):
        return PlainTextResponse(await manager.logs(id))
    manager.get_instance(id)  # a 404 before the stream starts, not inside it
    # Starlette cancels the stream when the client leaves, which ends the generator.
    return StreamingResponse(manager.follow_logs(id, delete=truthy(delete)), media_type="text/plain; charset=utf-8")
