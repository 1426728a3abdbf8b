"""short-body-error: a body shorter than its Content-Length fails at once.

Upstream: none; no aiohttp release has this (beyond upstream).

Affected: every release (3.9.0 to 3.14.x measured: 3.11.18, 3.12.15).

Symptom: when the body ends before the declared Content-Length (a wrong
length, a file that shrank, a generator that stopped early, a text file whose
CRLF newlines are read as LF), the server waits for the rest and the client
waits for the response until the total timeout (300 s by default), then
reports a bare TimeoutError that says nothing about the cause.

Remedy (a wrapper of ``ClientRequest.write_bytes``): where the body's size is
known before sending (bytes, str, BytesIO, files with a size) and is smaller
than the declared length, the request fails before any body byte is written;
otherwise, when the body ends short, it fails as soon as the body has ended.
Either way with :class:`ContentLengthError` (an
``aiohttp.ClientConnectionError``) naming the declared and the sent byte
counts and the body type, and the connection is closed, never pooled. A
response the server sent before (413 without reading the body) still reaches
the caller: the end of that response stops the write first. A BytesIO whose
size is the declared length is taken as exact (content-length-limit's bypass):
one that another task shrinks while it is being sent is not caught.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, Sequence

from aiohttp import client_reqrep, payload

from .._contract import ContentLengthError, fail, kind, nothing, where
from .._fix import Fix
from .._ledger import Patch
from .content_length_limit import (
    BELOW,
    below,
    bypass,
    declared_body,
    forwarder,
)

__all__ = ("FIX",)


def _build_write_bytes(original: Callable[..., Any]) -> Callable[..., Any]:
    forward = forwarder(original)
    skip = bypass(original)

    # A plain function: the common cases return the original's coroutine.
    def write_bytes(
        self: Any, writer: Any, conn: Any, content_length: Optional[int] = None
    ) -> Awaitable[None]:
        direct = skip(self, writer, conn, content_length)
        if direct is not None:
            return direct
        found = declared_body(self, writer)
        if found is None:
            return forward(self, writer, conn, content_length)
        declared, body, size = found
        if size is not None and size < declared:
            fail(
                conn,
                ContentLengthError(
                    f"request body for {where(self)} is shorter than its"
                    f" Content-Length: declared {declared} bytes, the {kind(body)}"
                    f" has {size}; no body byte was sent"
                ),
            )
            return nothing()
        if size is not None and isinstance(body, payload.BytesPayload):
            # In memory, and at least as long as declared: cannot end short.
            return forward(self, writer, conn, content_length)
        return checked(self, writer, conn, content_length, declared, body)

    async def checked(
        self: Any,
        writer: Any,
        conn: Any,
        content_length: Optional[int],
        declared: int,
        body: Any,
    ) -> None:
        await forward(self, writer, conn, content_length)
        remaining = writer.length
        protocol = conn.protocol
        if not remaining or protocol is None:
            return
        if getattr(protocol, "exception", lambda: None)() is not None:
            return  # the write failed for another reason, already reported
        fail(
            conn,
            ContentLengthError(
                f"request body for {where(self)} is shorter than its"
                f" Content-Length: declared {declared} bytes, sent"
                f" {declared - remaining} ({kind(body)})"
            ),
        )

    setattr(write_bytes, BELOW, below(original))
    return write_bytes


def _probe() -> Optional[str]:
    return "no release fails a body shorter than its Content-Length"


def _patches() -> Sequence[Patch]:
    return (Patch(client_reqrep.ClientRequest, "write_bytes", _build_write_bytes),)


FIX = Fix(
    id="short-body-error",
    upstream="beyond upstream (no aiohttp release)",
    summary="a body shorter than its Content-Length fails fast with ContentLengthError",
    affected=((3, 9, 0), None),
    probe=_probe,
    patches=_patches,
    # It reads what the limit left open on the writer.
    requires=("content-length-limit",),
)
