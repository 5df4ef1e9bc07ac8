"""Access to the daemon's Manager from a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from unik.manager import Manager


def get_manager(request: Request) -> Manager:
    manager: Manager = request.app.state.manager
    return manager


ManagerDep = Annotated[Manager, Depends(get_manager)]
