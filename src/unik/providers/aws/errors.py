"""AWS's errors as the daemon's: a clear status and AWS's own code in the message."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from unik.errors import BadGateway, BadRequest, Conflict, Forbidden, NotFound, Unauthorized, UnikError

P = ParamSpec("P")
R = TypeVar("R")

NO_CREDENTIALS = (
    "no AWS credentials: boto3's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and "
    "~/.aws/credentials, the container or instance role) found none"
)
_BY_CODE: dict[str, type[UnikError]] = {
    "AuthFailure": Unauthorized,
    "InvalidClientTokenId": Unauthorized,
    "SignatureDoesNotMatch": Unauthorized,
    "UnrecognizedClientException": Unauthorized,
    "ExpiredToken": Unauthorized,
    "UnauthorizedOperation": Forbidden,
    "AccessDenied": Forbidden,
    "AccessDeniedException": Forbidden,
    "InvalidParameterValue": BadRequest,
    "InvalidParameterCombination": BadRequest,
    "ValidationException": BadRequest,
    "IncorrectInstanceState": Conflict,
    "InsufficientInstanceCapacity": Conflict,
    "InstanceLimitExceeded": Conflict,
    "VcpuLimitExceeded": Conflict,
    "ConflictException": Conflict,
}


def translate(exc: Exception) -> UnikError:
    if isinstance(exc, NoCredentialsError):
        return Unauthorized(NO_CREDENTIALS)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        operation = exc.operation_name
        cls = _BY_CODE.get(code) or (
            NotFound if "NotFound" in code else BadRequest if code.endswith(".Malformed") else BadGateway
        )
        return cls(f"AWS {operation}: {code}: {error.get('Message', '')}".rstrip(": "))
    if isinstance(exc, EndpointConnectionError):
        return BadGateway(f"AWS is unreachable: {exc}")
    if isinstance(exc, BotoCoreError):
        return BadGateway(f"AWS: {exc}")
    raise exc


def aws_errors(func: Callable[P, R]) -> Callable[P, R]:
    """botocore's exceptions out of a (sync) call become the daemon's."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc) from exc

    return wrapper
