"""Access to the daemon's services from a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from unik.services import Services


# async: FastAPI runs a plain `def` dependency in its thread pool, a thread hand-off on every
# request for what is an attribute read.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
