"""HTTP hardening: security headers, a request size limit, CORS only when configured."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The web pages and the API documentation are served by the API itself, assets included:
# nothing is loaded from elsewhere. The documentation runs no inline script at all.
# The pages run no inline script and no inline style: only the service's own files.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
            "frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; frame-ancestors 'none'")
_DOCS_PATHS = ("/docs",)


def _headers(csp: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        # Same-origin: pages name studies in their URLs, which never leave for another site;
        # same-origin form posts keep their Origin header (checked against CSRF).
        (b"referrer-policy", b"same-origin"),
        # Answers carry patient data: nothing may keep a copy.
        (b"cache-control", b"no-store"),
        (b"content-security-policy", csp.encode()),
    ]


_PAGE_HEADERS = _headers(PAGE_CSP)
_DOCS_HEADERS = _headers(DOCS_CSP)


class SecurityHeaders:
    """Adds the headers browsers use to keep pages and API answers from being misused."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = str(scope.get("path", "")).startswith(_DOCS_PATHS)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *(_DOCS_HEADERS if docs else _PAGE_HEADERS)]
            await send(message)

        await self.app(scope, receive, with_headers)


class RequestSizeLimit:
    """Refuses request bodies over ``limit`` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counting, send)
        except _TooLarge:
            await _too_large(send)


class _TooLarge(Exception):
    pass


async def _too_large(send: Send) -> None:
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"detail":"request body too large"}'})
