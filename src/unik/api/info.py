"""Compilers, providers, health and version."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from unik import __version__
from unik.api.deps import ServicesDep

router = APIRouter(tags=["info"])


@router.get("/available_compilers", response_model=list[str])
async def available_compilers(services: ServicesDep) -> list[str]:
    return services.builds.available_compilers()


@router.get("/available_providers", response_model=list[str])
async def available_providers(services: ServicesDep) -> list[str]:
    return services.provider_names()


@router.get("/describe_compiler", response_class=PlainTextResponse)
async def describe_compiler(
    services: ServicesDep,
    provider: str = Query(..., max_length=64),
    base: str = Query(..., max_length=64),
    lang: str = Query(..., max_length=64),
) -> str:
    return services.builds.describe_compiler(provider, base, lang)


@router.get("/_ping", response_class=PlainTextResponse)
async def ping() -> str:
    return "OK"


@router.get("/version")
async def version(services: ServicesDep) -> dict[str, object]:
    return {"version": __version__, "providers": services.provider_status()}
