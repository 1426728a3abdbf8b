"""content-length-limit: never more body bytes than the declared Content-Length.

Upstream: aio-libs/aiohttp PR #10915 (3.12.0) limits bytes, BytesIO, files,
text files and async iterables; MultipartWriter/FormData, ``@aiohttp.streamer``
bodies, third-party Payload subclasses and memoryviews whose items are wider
than a byte still overrun in 3.12.15 and 3.14.x. 3.14.0 refuses a
Content-Length that is not ASCII digits.

Affected: aiohttp >=3.9.0 (no release limits every body type).

Symptom: with an explicit ``Content-Length`` smaller than the body, the extra
bytes go onto the wire and the server parses them as the start of the next
request (request smuggling from the client side). 3.12.0-3.13.5 parse the
header with ``int()``: ``"-3"`` sends all but the last three bytes.

Remedy, at the one place every body passes through:

* ``ClientRequest.write_bytes`` sets the declared length on the request's
  ``StreamWriter`` (``writer.length``, which aiohttp's own server side uses to
  stop at a length), so the writer drops what lies beyond it, whatever wrote it;
* async iterables stop pulling (and async generators are closed) once that
  length is reached instead of being drained;
* ``ClientRequest.update_headers`` refuses a Content-Length that is not plain
  ASCII digits, or that is given twice with different values, with a
  ValueError before a connection is even taken.

Chunked requests (no Content-Length) are not touched.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Awaitable, Callable, List, Optional, Sequence, Tuple

from aiohttp import client_reqrep, hdrs, payload
from aiohttp.http_writer import StreamWriter

from .._contract import body_of, body_size, bytes_io_left, overlong_policy
from .._fix import Fix
from .._ledger import LEDGER, Patch

__all__ = (
    "BELOW",
    "FIX",
    "below",
    "bypass",
    "declared_body",
    "declared_length",
    "forwarder",
    "open_length",
    "takes_length",
    "writer_declared",
)


def _validate(values: List[str]) -> None:
    for value in values:
        if not value.isascii() or not value.isdigit():
            raise ValueError(
                f"invalid Content-Length header {value!r}: it must be plain ASCII"
                " digits (a non-negative decimal integer)"
            )
    if len({int(v) for v in values}) > 1:
        raise ValueError(
            f"conflicting Content-Length headers {values!r}: give the length once"
        )


def open_length(writer: Any) -> Optional[int]:
    """Body bytes the request's writer will still accept, or None: no limit.

    Only aiohttp's own StreamWriter carries the declared length; other writers
    inherit ``AbstractStreamWriter.length = 0``, which means nothing here.
    """
    # The MRO first: coalesced-headers switches the writer to a subclass while
    # it holds the head, and StreamWriter is an ABC (a Python-level check).
    if StreamWriter in type(writer).__mro__ or isinstance(writer, StreamWriter):
        length: Optional[int] = writer.length
        return length
    return None


def declared_length(request: Any) -> Optional[int]:
    """The Content-Length a request declared, or None for a chunked one."""
    headers = request.headers
    value = headers.get(hdrs.CONTENT_LENGTH)
    if value is None or request.chunked:
        return None
    if "chunked" in headers.get(hdrs.TRANSFER_ENCODING, "").lower():
        return None
    return int(value)


def nbytes(chunk: Any) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


def _build_update_headers(original: Callable[..., Any]) -> Callable[..., Any]:
    def update_headers(self: Any, headers: Any, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            original(self, headers, *args, **kwargs)
        else:
            original(self, headers)  # a plain call is cheaper than f(*a, **kw)
        if not headers:
            return  # nothing from the caller: aiohttp sets the length itself
        values = self.headers.getall(hdrs.CONTENT_LENGTH, ())
        if values:
            _validate(values)

    return update_headers


def takes_length(write_bytes: Callable[..., Any]) -> bool:
    """Whether a ``write_bytes`` takes 3.12's ``content_length`` argument."""
    return len(inspect.signature(write_bytes).parameters) > 3


def forwarder(original: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
    """Call ``original`` write_bytes with the arguments its release takes."""
    if takes_length(original):
        return original

    def forward(self: Any, writer: Any, conn: Any, _length: Any = None) -> Any:
        return original(self, writer, conn)

    return forward


#: Set on the write_bytes wrappers of the Content-Length contract: the
#: write_bytes below all of them, which a wrapper may call directly for a body
#: none of them has anything to do with (see ``bypass``).
BELOW = "_payloadfix_below"

#: In-memory payloads whose ``size`` is exactly what they write.
_EXACT_BODIES = frozenset({payload.BytesPayload, payload.StringPayload})
_BYTES_IO = payload.BytesIOPayload


def below(original: Callable[..., Any]) -> Callable[..., Any]:
    """The write_bytes under ``original`` and any contract wrappers on it."""
    target: Callable[..., Any] = getattr(original, BELOW, original)
    return target


#: Kept on a request while it is written: (id of its writer, what
#: ``declared_body`` found). Each contract wrapper asks, one after the other.
_SENDING = "_payloadfix_sending"


def declared_body(
    request: Any, writer: Any
) -> Optional[Tuple[int, Any, Optional[int]]]:
    """``(declared length, body, body size or None)`` when ``writer`` is the
    request's own StreamWriter and a Content-Length is declared, else None.

    Worked out once per write: the wrappers of write_bytes run one after the
    other, synchronously, and all ask.
    """
    if StreamWriter not in type(writer).__mro__ and not isinstance(
        writer, StreamWriter
    ):
        return None
    cached = getattr(request, _SENDING, None)
    if cached is not None and cached[0] == id(writer):
        found: Optional[Tuple[int, Any, Optional[int]]] = cached[1]
        return found
    declared = declared_length(request)
    if declared is None:
        found = None
    else:
        body = body_of(request)
        found = (declared, body, body_size(body))
    setattr(request, _SENDING, (id(writer), found))
    return found


def writer_declared(request: Any, writer: Any) -> Optional[int]:
    """The declared length, when ``writer`` is the request's own StreamWriter."""
    found = declared_body(request, writer)
    return None if found is None else found[0]


#: The request's body as write_bytes sends it: 3.12.8+ keep it in ``_body``
#: (``body`` is a property there); before, it is the ``body`` attribute.
_body_of = operator.attrgetter(
    "_body"
    if isinstance(vars(client_reqrep.ClientRequest).get("body"), property)
    else "body"
)


def bypass(
    original: Callable[..., Any],
) -> Callable[[Any, Any, Any, Optional[int]], Optional[Awaitable[None]]]:
    """For a contract wrapper of ``original``: a function returning the
    coroutine of the write_bytes below all contract wrappers when the request
    needs none of them, else None (the wrapper then does its work).

    None of them has anything to do when the body is bytes or str (not a
    bytearray, which may have been resized since its size was taken) and
    nothing, or exactly its size, is declared: it can be neither longer nor shorter than
    declared, and it writes exactly the declared bytes. That is the path of
    nearly every request, so it is kept cheap.

    A BytesIO is in memory too: when its size is the declared length it is
    sent the same way, the writer limited to that length (the limit's part). A
    BytesIO changed by another task while it is being sent is a race of the
    caller's: the writer still stops at the declared length, but a body that
    shrank then is not reported.
    """
    target = below(original)
    target_takes_length = takes_length(target)
    # Payload.size is a property returning _size, which neither exact type
    # overrides on any release: read the attribute, no frame.
    exact_size: Callable[[Any], int] = (
        operator.attrgetter("_size")
        if not any("size" in vars(cls) for cls in _EXACT_BODIES)
        else operator.attrgetter("size")
    )

    size_kept = "__init__" in vars(_BYTES_IO)  # it sets _size

    def skip(
        self: Any, writer: Any, conn: Any, content_length: Optional[int]
    ) -> Optional[Awaitable[None]]:
        if content_length is None and target_takes_length:
            return None  # a 3.11-style call on 3.12: the length is needed
        body = _body_of(self)
        cls = type(body)
        value = self.headers.get(hdrs.CONTENT_LENGTH)
        if cls in _EXACT_BODIES:
            if type(body._value) is bytearray:
                # Mutable: its size was taken when the request was built, and
                # another task may have resized it since.
                return None
            if value is not None:
                try:
                    if int(value) != exact_size(body):
                        return None
                except ValueError:
                    return None
        elif cls is _BYTES_IO:
            if value is not None:
                try:
                    declared = int(value)
                    # BytesIOPayload.size, without its property frame: kept
                    # from the start (3.12.8+), or what is left of the buffer.
                    size = body._size if size_kept else bytes_io_left(body._value)
                    if declared != size:  # (-1: closed)
                        return None
                except ValueError:
                    return None
                if writer.length is None and (
                    StreamWriter in type(writer).__mro__
                    or isinstance(writer, StreamWriter)
                ):
                    writer.length = declared
        else:
            return None
        if target_takes_length:
            return target(self, writer, conn, content_length)  # type: ignore[no-any-return]
        return target(self, writer, conn)  # type: ignore[no-any-return]

    return skip


def _build_write_bytes(original: Callable[..., Any]) -> Callable[..., Any]:
    forward = forwarder(original)
    skip = bypass(original)

    # A plain function returning the original's coroutine: no extra frame on
    # the write path of every request.
    def write_bytes(
        self: Any, writer: Any, conn: Any, content_length: Optional[int] = None
    ) -> Awaitable[None]:
        direct = skip(self, writer, conn, content_length)
        if direct is not None:
            return direct
        length = writer_declared(self, writer)
        if length is not None and writer.length is None:
            writer.length = length
        return forward(self, writer, conn, content_length)

    setattr(write_bytes, BELOW, below(original))
    return write_bytes


def _build_aiter_write(original: Callable[..., Any]) -> Callable[..., Any]:
    async def write(self: Any, writer: Any, *args: Any) -> None:
        limit = open_length(writer)
        if args and args[0] is not None:  # 3.12's content_length argument
            limit = args[0] if limit is None else min(limit, args[0])
        if (
            limit is None
            or self._iter is None
            or getattr(self, "_cached_chunks", None) is not None
        ):
            await original(self, writer, *args)
            return
        iterator = self._iter
        try:
            while limit > 0:
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                size = nbytes(chunk)
                if size > limit:
                    if open_length(writer) is None:
                        chunk = memoryview(chunk).cast("B")[:limit]
                    # else the writer drops the excess (and it can be reported)
                    size = limit
                limit -= size
                await writer.write(chunk)
            # The declared length is reached. Only to tell an over-long body
            # from an exact one (overlong-body-warning) is one more chunk
            # pulled; it is offered to the writer, which drops it.
            if LEDGER.is_applied("overlong-body-warning"):
                if overlong_policy() != "truncate":
                    try:
                        extra = await iterator.__anext__()
                    except StopAsyncIteration:
                        return
                    await writer.write(extra)
            # Stop pulling, let it clean up.
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._iter = None

    return write


def _probe() -> Optional[str]:
    unlimited = [
        cls.__name__
        for cls in (payload.Payload, payload.BytesPayload, payload.IOBasePayload)
        if "write_with_length" not in vars(cls)
    ]
    if unlimited:
        return "no payload limits its write to the declared Content-Length"
    return (
        "the declared length is passed to the payload, not the writer: multipart,"
        " streamer and third-party payloads still write past it"
    )


def _patches() -> Sequence[Patch]:
    aiter_method = (
        "write_with_length"
        if "write_with_length" in vars(payload.AsyncIterablePayload)
        else "write"
    )
    return (
        Patch(client_reqrep.ClientRequest, "update_headers", _build_update_headers),
        Patch(client_reqrep.ClientRequest, "write_bytes", _build_write_bytes),
        Patch(payload.AsyncIterablePayload, aiter_method, _build_aiter_write),
    )


FIX = Fix(
    id="content-length-limit",
    upstream="aio-libs/aiohttp PR #10915 (3.12.0, partial)",
    summary="at most Content-Length body bytes are written; bad values refused",
    affected=((3, 9, 0), None),
    probe=_probe,
    patches=_patches,
)
