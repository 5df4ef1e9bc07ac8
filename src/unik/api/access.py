"""Access control and request-size limits, applied before any route runs."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unik.errors import TooLarge, Unauthorized, UnikError

# Health checks stay open so that a supervisor can probe a daemon that requires a token.
# The dashboard's static page and assets hold no data: the browser must load them to ask for the token.
OPEN_PATHS = frozenset({"/_ping", "/"})
OPEN_PREFIXES = ("/ui/",)


class AccessGuard:
    """Pure ASGI middleware: bearer token (when configured) and the upload size bound.

    Both are checked from the headers alone, so a refused request never has its body read
    or spooled to disk."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check_token(scope["path"], headers.get("authorization", ""))
            self._check_size(headers.get("content-length"))
        except UnikError as refusal:
            await _refuse(send, refusal)
            return
        await _BodyBound(self.app, self.max_body_bytes)(scope, receive, send)

    def _check_token(self, path: str, authorization: str) -> None:
        if self.token is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip(), self.token):
            raise Unauthorized("this daemon requires a token: send `Authorization: Bearer <token>`")

    def _check_size(self, content_length: str | None) -> None:
        if content_length is None:
            return
        try:
            length = int(content_length)
        except ValueError:
            return
        if length > self.max_body_bytes:
            raise TooLarge(f"the request body is larger than {self.max_body_bytes >> 20} MB")


class _BodyBound:
    """A chunked body has no Content-Length to check up front: count it as it arrives. Past
    the bound the app is told the client left, and whatever it answers is replaced by a 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.received = 0
        self.exceeded = False
        self.refused = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            if self.exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.limit:
                    self.exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not self.exceeded:
                await send(message)
            elif not self.refused:
                self.refused = True
                await _refuse(send, TooLarge(f"the request body is larger than {self.limit >> 20} MB"))

        await self.app(scope, counted_receive, guarded_send)
        if self.exceeded and not self.refused:
            self.refused = True
            await _refuse(send, TooLarge(f"the request body is larger than {self.limit >> 20} MB"))


async def _refuse(send: Send, error: UnikError) -> None:
    body = json.dumps({"message": error.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
