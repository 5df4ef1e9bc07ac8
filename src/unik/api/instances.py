"""Instances: run, list, describe, start, stop, delete, and the console logs."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from unik.api.deps import ServicesDep
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
async def list_instances(services: ServicesDep) -> Response:
    return Response(services.instances.list_json(), media_type="application/json")


@router.get("/instances/{id}", response_model=Instance)
async def get_instance(id: RefPath, services: ServicesDep) -> Response:
    return Response(services.instances.get_json(id), media_type="application/json")


@router.delete("/instances/{id}", status_code=204, response_class=Response)
async def delete_instance(id: RefPath, services: ServicesDep, force: str | None = Query(None)) -> Response:
    await services.instances.delete(id, force=truthy(force))
    return Response(status_code=204)


@router.post("/instances/run", response_model=Instance, status_code=201, openapi_extra=_RUN_BODY)
async def run_instance(request: Request, services: ServicesDep) -> Instance:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON RunInstanceRequest object")
    try:
        run_request = RunInstanceRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise BadRequest(f"invalid RunInstanceRequest: {where + ': ' if where else ''}{first.get('msg')}") from exc
    return await services.instances.run(run_request)


@router.post("/instances/{id}/start")
async def start_instance(id: RefPath, services: ServicesDep) -> Instance:
    return await services.instances.start(id)


@router.post("/instances/{id}/stop")
async def stop_instance(id: RefPath, services: ServicesDep) -> Instance:
    return await services.instances.stop(id)


@router.get("/instances/{id}/logs", response_class=PlainTextResponse)
async def instance_logs(
    id: RefPath,
    services: ServicesDep,
    follow: str | None = Query(None, description="stream new output until the instance stops"),
    fallow: str | None = Query(None, description="the seed's spelling of follow"),
    delete: str | None = Query(None, description="with follow: delete the instance when the client leaves"),
) -> Response:
    if not (truthy(follow) or truthy(fallow)):
        return PlainTextResponse(await services.logs.read(id))
    services.instances.get(id)  # a 404 before the stream starts, not inside it
    # Starlette cancels the stream when the client leaves, which ends the generator.
    stream = services.logs.follow(id, delete=truthy(delete))
    return StreamingResponse(stream, media_type="text/plain; charset=utf-8")
