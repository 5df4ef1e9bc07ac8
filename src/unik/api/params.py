"""Parameter helpers shared by the routers: names, booleans, bodies without Content-Type."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Path, Request, UploadFile

from unik.errors import BadRequest, TooLarge
from unik.models import NAME_PATTERN

# Lookups accept an id, a name or an id prefix; a name being created must be a valid name.
RefPath = Annotated[str, Path(min_length=1, max_length=128, description="exact Id, exact Name, or unique Id prefix")]
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="1-64 of [A-Za-z0-9][A-Za-z0-9_.-]*")]


def truthy(value: str | None) -> bool:
    """docs/api.md: a boolean is true only when it is the string `true`, in any case."""
    return value is not None and value.strip().lower() == "true"


async def json_body(request: Request) -> Any:
    """The Go client sends JSON without a Content-Type; an empty body reads as null."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc


async def query_or_form(request: Request, key: str) -> str | None:
    """docs/api.md: build and volume parameters come in the query string or as form fields."""
    if key in request.query_params:
        return request.query_params[key]
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        value = (await request.form()).get(key)
        if isinstance(value, str):
            return value
    return None


def check_upload_size(upload: UploadFile, max_mb: int) -> None:
    if upload.size is not None and upload.size > max_mb << 20:
        raise TooLarge(f"the upload is larger than {max_mb} MB")
