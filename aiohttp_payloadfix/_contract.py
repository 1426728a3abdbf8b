"""The Content-Length contract: the error, the over-long policy, the helpers
shared by short-body-error and overlong-body-warning."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional

import aiohttp
from aiohttp import payload

__all__ = (
    "ENV_OVERLONG",
    "OVERLONG_POLICIES",
    "ContentLengthError",
    "body_of",
    "body_size",
    "bytes_io_left",
    "configure",
    "fail",
    "is_payload",
    "nothing",
    "overlong_policy",
    "where",
)

LOG = logging.getLogger("aiohttp_payloadfix")
ENV_OVERLONG = "AIOHTTP_PAYLOADFIX_OVERLONG"
OVERLONG_POLICIES = ("warn", "truncate", "error")


class ContentLengthError(aiohttp.ClientConnectionError):
    """A request body did not match its declared Content-Length."""


_policy: Optional[str] = None


def configure(*, overlong: Optional[str] = None) -> None:
    """Set what happens to a body longer than its Content-Length.

    ``"warn"`` (default): send the declared bytes and log one WARNING on the
    ``aiohttp_payloadfix`` logger. ``"truncate"``: send the declared bytes
    quietly. ``"error"``: fail the request with :class:`ContentLengthError`
    (before any body byte when the size is known).
    """
    global _policy
    if overlong is not None:
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(
                f"unknown overlong policy {overlong!r}; choose one of"
                f" {', '.join(OVERLONG_POLICIES)}"
            )
        _policy = overlong


def _swap_policy(policy: Optional[str]) -> Optional[str]:
    """Put ``policy`` in place of what :func:`configure` set and return what
    was there; ``None`` means nothing was configured (the environment or the
    default decides). For tests, which must leave the process as they found it:
    ``configure()`` alone cannot go back to "not configured"."""
    global _policy
    if policy is not None and policy not in OVERLONG_POLICIES:
        raise ValueError(f"unknown overlong policy {policy!r}")
    previous, _policy = _policy, policy
    return previous


def overlong_policy() -> str:
    if _policy is not None:
        return _policy
    raw = os.environ.get(ENV_OVERLONG, "").strip().lower()
    if not raw:
        return "warn"
    if raw not in OVERLONG_POLICIES:
        from ._ledger import PayloadFixWarning

        warnings.warn(
            f"aiohttp_payloadfix: {ENV_OVERLONG}={raw!r} is not one of"
            f" {', '.join(OVERLONG_POLICIES)}; using 'warn'",
            PayloadFixWarning,
            stacklevel=2,
        )
        configure(overlong="warn")
        return "warn"
    return raw


def body_of(request: Any) -> Any:
    """The request's payload (3.12 keeps it in ``_body``)."""
    body = getattr(request, "_body", None)
    return body if body is not None else request.body


#: Bodies that are certainly not payloads: no ABC instance check for them.
_PLAIN = frozenset({type(None), bytes, bytearray, memoryview, str})


def is_payload(body: Any) -> bool:
    """``isinstance(body, payload.Payload)``, cheap for the common types.

    ``Payload`` is an ABC, whose instance check runs Python code; its real
    subclasses are found in the MRO first.
    """
    cls = type(body)
    if payload.Payload in cls.__mro__:
        return True
    return cls not in _PLAIN and isinstance(body, payload.Payload)


async def nothing() -> None:
    """What a ``write_bytes`` wrapper returns when nothing is left to write."""
    return None


def bytes_io_left(f: Any) -> int:
    """The bytes of a BytesIO from its position to its end, -1 once closed.

    Without ``BytesIOPayload.size``'s property frame and its two seeks, and
    from ``getvalue()``, not ``getbuffer()``: a BytesIO made from a bytes
    object shares it until written to, and ``getbuffer()`` copies it first
    (2 us for 64 KiB), where ``getvalue()`` hands out the shared object.
    """
    try:
        left: int = len(f.getvalue()) - f.tell()
    except ValueError:  # closed
        return -1
    return left


def body_size(body: Any) -> Optional[int]:
    """The size of the body when known before sending, else None."""
    if is_payload(body):
        value = getattr(body, "_value", None)
        if type(value) is bytearray:
            # Resizable: its length now, not when the payload was made.
            return len(value)
        try:
            size: Optional[int] = body.size
        except (OSError, ValueError):
            return None
        return size
    if isinstance(body, (bytes, bytearray)):
        return len(body)
    return None


def where(request: Any) -> str:
    """``METHOD scheme://host:port/path``: no query string, no credentials."""
    url = request.url
    port = f":{url.port}" if url.port is not None and not url.is_default_port() else ""
    return f"{request.method} {url.scheme}://{url.host}{port}{url.path}"


def kind(body: Any) -> str:
    value = getattr(body, "_value", None)
    name = type(body).__name__
    if value is not None and is_payload(body):
        return f"{name} of {type(value).__name__}"
    return name


def fail(conn: Any, exc: BaseException) -> None:
    """Fail the request with ``exc``; its connection will not be reused.

    The exception goes to the protocol, where the response being awaited picks
    it up (aiohttp then closes the connection); setting it also marks the
    connection as not reusable. Closing the transport here instead would race
    with that: the response would see "connection lost", not ``exc``.
    """
    protocol = conn.protocol
    if protocol is not None:
        protocol.set_exception(exc)
    else:
        conn.close()
