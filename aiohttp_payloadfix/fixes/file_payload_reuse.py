"""file-payload-reuse: file-like bodies no longer cost a TCP connection each.

Upstream: aio-libs/aiohttp issue #10325, PR #10915, released in 3.12.0.

Affected: aiohttp >=3.9.0,<3.12.0 (a race before 3.10.6; since PR #8992 in
3.10.6 it closes the connection on nearly every request).

Symptom: after a POST whose body is file-like (``io.BytesIO()``, an open file),
the client closes the connection instead of returning it to the pool. The file
payload's write awaits one more (empty) read and the file's close in the
default executor after the last body byte; the server has answered by then,
the response reaching EOF cancels the still-running write task, and a cancelled
body write closes the connection.

Remedy (replacement of ``IOBasePayload.write`` and ``TextIOPayload.write``):

* stop reading once the payload's known size, or the declared Content-Length
  still open on the writer, has been written: no trailing read;
* read in-memory buffers (``BytesIO``) on the loop; read files in the
  executor 256 KiB at a time, as aiohttp 3.14 does (its DEFAULT_CHUNK_SIZE;
  3.9-3.12 read 64 KiB, four times the thread round trips);
* never await the close: it is scheduled after the write, and a reference to
  it is kept until it ran; with no usable loop or executor it is done inline.
  As in 3.12.15, ``BytesIO`` bodies are left open.

Resends. aiohttp >=3.10 resends idempotent requests once on a stale pooled
connection, and every release resends the body on 307/308 redirects, each time
building a new request from the same file object. Within one
``ClientSession._request`` call the file is therefore kept open (it is closed
when the call returns, or when a write still running then ends), each rebuild
rewinds it to the position where the request started, and reads of a
superseded attempt are refused, so the resend carries the whole body. A file
that cannot be rewound (a pipe) makes the resend fail with a clear error
instead of sending a truncated or empty body. A ``BytesIO`` is never closed
here, so it needs no wrapper around the call: each build records where its
body starts, and a build by the same call (the same timer, which aiohttp
makes once per call) is a resend.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Callable, Optional, Sequence, Tuple

from aiohttp import client, client_reqrep, payload
from aiohttp.http_writer import StreamWriter

from .._filebody import (
    Superseded,
    build_request_scope,
    build_rewind,
    claim_of,
    close_soon,
    existing_state,
    read_current,
    state_of,
    tell,
)
from .._fix import Fix
from .._ledger import Patch
from .content_length_limit import open_length

__all__ = ("FIX",)

_READ_SIZE = 2**16
#: A file is read in the executor, and each read is a round trip to a
#: thread: 256 KiB reads (aiohttp 3.14's chunk size) made a 16 MiB upload 2.6
#: times as fast as 64 KiB ones here. What is held stays bounded: the next read waits
#: until the transport has drained the last chunk below its high-water mark.
_FILE_READ_SIZE = 2**18


def _limits(pl: Any, writer: Any) -> Tuple[Optional[int], int, Optional[str]]:
    """``(bytes to write or None: to the end, extra bytes to peek, encoding)``."""
    try:
        size: Optional[int] = pl.size
    except (OSError, ValueError):
        size = None
    remaining = open_length(writer)
    limit = size
    if remaining is not None and (size is None or remaining < size):
        limit = remaining
    # When the declared length, not the body's own size, ends the body, the
    # last read asks for one byte more: a longer body then shows (for
    # overlong-body-warning) without a read after the last byte.
    peek = 1 if limit is not None and limit == remaining and limit != size else 0
    encoding: Optional[str] = None
    if payload.TextIOPayload in type(pl).__mro__:  # no ABC check (Payload is one)
        encoding = pl._encoding or "utf-8"
    return limit, peek, encoding


async def _write_file(pl: Any, writer: Any) -> None:
    f = pl._value
    state = state_of(f)
    generation = state.generation
    if state.start is None:
        state.start = tell(f)
    limit, peek, encoding = _limits(pl, writer)
    loop = asyncio.get_running_loop()
    written = 0
    state.writers += 1
    try:
        # max(): with nothing declared (0) the peek is the only read.
        while limit is None or written < max(limit, peek):
            want = (
                _FILE_READ_SIZE
                if limit is None
                else min(_FILE_READ_SIZE, limit - written + peek)
            )
            if limit == 0:
                # Declared empty: the server may answer before a read in a
                # thread returns, and its answer cancels this write; so the
                # one-byte peek happens on the loop.
                chunk = read_current(f, state, generation, want)
            else:
                chunk = await loop.run_in_executor(
                    None, read_current, f, state, generation, want
                )
            if not chunk:
                break
            if encoding is not None:
                chunk = chunk.encode(encoding)
            if limit is not None and written + len(chunk) > limit:
                if peek:
                    # Over-long: the writer drops the excess (and it is reported).
                    await writer.write(chunk)
                    break
                chunk = chunk[: limit - written]
            written += len(chunk)
            await writer.write(chunk)
    except Superseded:
        pass
    finally:
        state.writers -= 1
        if state.scopes == 0 and state.writers == 0:
            close_soon(f)


def _build_write(original: Callable[..., Any]) -> Callable[..., Any]:
    async def write(self: Any, writer: Any) -> None:
        f = self._value
        if type(f) is not io.BytesIO:
            # A file, or a BytesIO subclass (whose read may return less than
            # asked before its end): read until its end or the declared
            # length. (A file's reads cost far more than this frame.)
            await _write_file(self, writer)
            return
        # A BytesIO, inline (one frame less on the common in-memory path):
        # read on the loop, never closed (see close_soon), outside a request
        # call (no state) never superseded. Its size is not needed: reading up
        # to one byte past what the writer still accepts ends at the end of
        # the buffer, or shows an over-long body (the writer drops the excess)
        # without a read after the last byte.
        remaining: Optional[int] = (  # open_length, inline
            writer.length
            if StreamWriter in type(writer).__mro__ or isinstance(writer, StreamWriter)
            else None
        )
        if remaining == 0:
            return  # nothing declared is left: not even a byte is read
        want = _READ_SIZE if remaining is None else min(_READ_SIZE, remaining + 1)
        chunk = f.read(want)
        if len(chunk) < want or remaining is not None and len(chunk) > remaining:
            # All of it in one read, the usual case: nothing can have
            # superseded this attempt before its first await.
            if chunk:
                await writer.write(chunk)
            return
        # More reads: each after an await, so each checks that no resend (or
        # new request) took the file over in between. The claim is this
        # attempt's: no await yet.
        # (An exact BytesIO has a claim; a subclass is scoped like a file.)
        claim = claim_of(f)
        state = None if claim is not None else existing_state(f)
        generation = 0 if state is None else state.generation
        written = len(chunk)
        await writer.write(chunk)
        while remaining is None or written < remaining:
            if claim_of(f) is not claim or (
                state is not None and state.generation != generation
            ):
                return  # superseded by a resend
            want = (
                _READ_SIZE
                if remaining is None
                else min(_READ_SIZE, remaining - written + 1)
            )
            chunk = f.read(want)
            if not chunk:
                return
            written += len(chunk)
            await writer.write(chunk)

    return write


def _probe() -> Optional[str]:
    if "write_with_length" in vars(payload.IOBasePayload):
        return None
    return (
        "IOBasePayload.write reads once more after the last byte and awaits the"
        " file's close, so the response cancels it and the connection is closed"
    )


def _patches() -> Sequence[Patch]:
    return (
        Patch(payload.IOBasePayload, "write", _build_write),
        Patch(payload.TextIOPayload, "write", _build_write),
        Patch(
            client.ClientSession, "_request", build_request_scope(True, bytes_io=False)
        ),
        Patch(
            client_reqrep.ClientRequest,
            "update_body_from_data",
            build_rewind(by_call=True),
        ),
    )


FIX = Fix(
    id="file-payload-reuse",
    upstream="aio-libs/aiohttp#10325, PR #10915 (3.12.0)",
    summary="file-like bodies reuse the connection; resends carry the whole file",
    affected=((3, 9, 0), (3, 12, 0)),
    probe=_probe,
    patches=_patches,
)
