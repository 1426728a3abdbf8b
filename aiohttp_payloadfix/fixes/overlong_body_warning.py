"""overlong-body-warning: a body longer than its Content-Length is never cut
silently.

Upstream: none; no aiohttp release has this (beyond upstream).

Affected: every release: before 3.12 the extra bytes go onto the wire, 3.12+
(and content-length-limit here) cut them silently, hiding the logic bug that
produced the wrong length.

Remedy (a wrapper of ``ClientRequest.write_bytes``), by the policy of
``aiohttp_payloadfix.configure(overlong=...)`` or ``AIOHTTP_PAYLOADFIX_OVERLONG``:

* ``warn`` (default): the declared bytes are sent and one WARNING is logged on
  the ``aiohttp_payloadfix`` logger, naming the method and URL (no query, no
  credentials), the declared and the available size;
* ``truncate``: the declared bytes are sent, nothing is logged;
* ``error``: :class:`ContentLengthError` before any body byte is written when
  the size is known; otherwise the body stops at the limit, the request fails
  and the connection is discarded.

Where the size is not known before sending, the writes of the body are counted
on the request's writer.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, Sequence

from aiohttp import client_reqrep

from .._contract import (
    LOG,
    ContentLengthError,
    fail,
    kind,
    nothing,
    overlong_policy,
    where,
)
from .._fix import Fix
from .._ledger import Patch
from .content_length_limit import (
    BELOW,
    below,
    bypass,
    declared_body,
    forwarder,
    nbytes,
)

__all__ = ("FIX",)


def _message(request: Any, declared: int, available: str, body: Any) -> str:
    return (
        f"request body for {where(request)} is longer than its Content-Length:"
        f" declared {declared} bytes, {available} available ({kind(body)})"
    )


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
        if size is not None and size <= declared:
            return forward(self, writer, conn, content_length)
        policy = overlong_policy()
        if policy == "truncate":
            return forward(self, writer, conn, content_length)
        if size is None:
            return counted(self, writer, conn, content_length, declared, body, policy)
        if size > declared:
            message = _message(self, declared, str(size), body)
            if policy == "error":
                fail(conn, ContentLengthError(message + "; no body byte was sent"))
                return nothing()
            LOG.warning("%s; sent the declared bytes", message)
        return forward(self, writer, conn, content_length)

    async def counted(
        self: Any,
        writer: Any,
        conn: Any,
        content_length: Optional[int],
        declared: int,
        body: Any,
        policy: str,
    ) -> None:
        # Size unknown before sending: count what the body offers.
        write = writer.write
        offered = 0

        async def counting_write(chunk: Any, *args: Any, **kwargs: Any) -> None:
            nonlocal offered
            before = offered
            offered += nbytes(chunk)
            if offered > declared and before <= declared and policy == "warn":
                LOG.warning(
                    "%s; sent the declared bytes",
                    _message(self, declared, f"at least {offered}", body),
                )
            if before < declared:
                await write(chunk, *args, **kwargs)

        writer.write = counting_write
        if content_length is not None:
            # 3.12 payloads stop reading at the length they are given: one
            # byte more lets an over-long body show (the writer drops it).
            content_length += 1
        try:
            await forward(self, writer, conn, content_length)
        finally:
            del writer.write
        protocol = conn.protocol
        if policy == "error" and offered > declared and protocol is not None:
            if getattr(protocol, "exception", lambda: None)() is None:
                fail(
                    conn,
                    ContentLengthError(
                        _message(self, declared, f"at least {offered}", body)
                        + "; stopped at the declared length"
                    ),
                )

    setattr(write_bytes, BELOW, below(original))
    return write_bytes


def _probe() -> Optional[str]:
    return "no release reports a body longer than its Content-Length"


def _patches() -> Sequence[Patch]:
    return (Patch(client_reqrep.ClientRequest, "write_bytes", _build_write_bytes),)


FIX = Fix(
    id="overlong-body-warning",
    upstream="beyond upstream (no aiohttp release)",
    summary="a body longer than its Content-Length is logged or refused, not cut",
    affected=((3, 9, 0), None),
    probe=_probe,
    patches=_patches,
    # It reads what the limit left open on the writer.
    requires=("content-length-limit",),
)
