"""Access to the daemon's Manager from a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from unik.manager import Manager


# async: FastAPI runs a plain `def` dependency in its thread pool, a thread hand-off on every
# request for what is an attribute read.
async def get_manager(request: Request) -> Manager:
    manager: Manager = request.app.state.manager
    return manager


ManagerDep = Annotated[Manager, Depends(get_manager)]
