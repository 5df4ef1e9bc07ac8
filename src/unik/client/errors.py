"""What the client raises for a failed call, and how a daemon's error answer becomes one."""

from __future__ import annotations

import json

import httpx


class UnikClientError(Exception):
    """Base of everything this client raises for a failed call."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnikAPIError(UnikClientError):
    """The daemon answered with a non-2xx status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status_code})"


class UnikConnectionError(UnikClientError):
    """The daemon could not be reached (refused, unresolvable, timed out, dropped)."""


def _error_message(response: httpx.Response) -> str:
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if value:
                return json.dumps(value)
    return text.strip() or response.reason_phrase or f"HTTP {response.status_code}"


def _check(response: httpx.Response) -> httpx.Response:
    if not response.is_success:
        response.read()
        raise UnikAPIError(response.status_code, _error_message(response))
    return response
