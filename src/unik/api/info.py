"""Compilers, providers, health and version."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from unik import __version__
from unik.api.deps import ManagerDep

router = APIRouter(tags=["info"])


@router.get("/available_compilers", response_model=list[str])
async def available_compilers(manager: ManagerDep) -> list[str]:
    return manager.available_compilers()


@router.get("/available_providers", response_model=list[str])
async def available_providers(manager: ManagerDep) -> list[str]:
    return manager.available_providers()


@router.get("/describe_compiler", response_class=PlainTextResponse)
async def describe_compiler(
    manager: ManagerDep,
    provider: str = Query(..., max_length=64),
    base: str = Query(..., max_length=64),
    lang: str = Query(..., max_length=64),
) -> str:
    return manager.describe_compiler(provider, base, lang)


@router.get("/_ping", response_class=PlainTextResponse)
async def ping() -> str:
    return "OK"


@router.get("/version")
async def version(manager: ManagerDep) -> dict[str, object]:
    return {
        "version": __version__,
        "providers": {name: p.status() for name, p in manager.providers.items()},
    }
