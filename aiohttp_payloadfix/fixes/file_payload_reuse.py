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
* read in-memory buffers (``BytesIO``) on the loop, files in the executor;
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
instead of sending a truncated or empty body.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import weakref
from typing import Any, Callable, Optional, Sequence, Set

from aiohttp import client, client_reqrep, payload

from .._fix import Fix
from .._ledger import Patch
from .content_length_limit import open_length

__all__ = ("FIX", "FileBodyError")

_LOG = logging.getLogger("aiohttp_payloadfix")
_READ_SIZE = 2**16

#: Closes scheduled in the executor, kept alive until they have run.
_PENDING_CLOSES: Set[asyncio.Future[None]] = set()


class FileBodyError(ValueError):
    """A file body cannot be (re)sent as a whole."""


class _Superseded(Exception):
    """A newer attempt of the same request owns the file now."""


class _FileState:
    """Per file object: where its body starts and who may read it."""

    __slots__ = (
        "start",
        "generation",
        "lock",
        "scopes",
        "builds",
        "writers",
        "__weakref__",
    )

    def __init__(self) -> None:
        self.start: Optional[int] = None
        self.generation = 0
        # Serialises executor reads with the rewind of a resend.
        self.lock = threading.Lock()
        self.scopes = 0  # ClientSession._request calls using this file as data
        self.builds = 0  # requests built from it in the current scope
        self.writers = 0  # writes in progress


_STATES: weakref.WeakKeyDictionary[Any, _FileState] = weakref.WeakKeyDictionary()


def _state(f: Any) -> _FileState:
    state = _STATES.get(f)
    if state is None:
        state = _STATES[f] = _FileState()
    return state


def _tell(f: Any) -> Optional[int]:
    try:
        if not f.seekable():
            return None
        return int(f.tell())
    except (OSError, ValueError, AttributeError):
        return None


def _is_file_body(data: Any) -> bool:
    return isinstance(data, io.IOBase)


def _log_close_error(fut: asyncio.Future[None]) -> None:
    _PENDING_CLOSES.discard(fut)
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        _LOG.warning("closing a request body file failed: %r", exc)


def _close_soon(f: Any) -> None:
    """Close ``f`` without making anybody wait for it."""
    if isinstance(f, io.BytesIO) or getattr(f, "closed", True):
        return
    try:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, f.close)
    except RuntimeError:
        # No running loop, a closed loop or an executor already shut down.
        f.close()
        return
    _PENDING_CLOSES.add(fut)
    fut.add_done_callback(_log_close_error)


def _read(f: Any, state: _FileState, generation: int, size: int) -> Any:
    with state.lock:
        if state.generation != generation:
            raise _Superseded
        return f.read(size)


def _size_of(pl: payload.Payload) -> Optional[int]:
    try:
        return pl.size
    except (OSError, ValueError):
        return None


async def _write_file(pl: Any, writer: Any) -> None:
    f = pl._value
    state = _state(f)
    generation = state.generation
    if state.start is None:
        state.start = _tell(f)
    limit = _size_of(pl)
    remaining = open_length(writer)
    if remaining is not None and (limit is None or remaining < limit):
        limit = remaining
    encoding: Optional[str] = None
    if isinstance(pl, payload.TextIOPayload):
        encoding = pl._encoding or "utf-8"
    in_memory = isinstance(f, io.BytesIO)
    loop = asyncio.get_running_loop()
    written = 0
    state.writers += 1
    try:
        while limit is None or written < limit:
            want = _READ_SIZE if limit is None else min(_READ_SIZE, limit - written)
            if in_memory:
                if state.generation != generation:
                    raise _Superseded
                chunk = f.read(want)
            else:
                chunk = await loop.run_in_executor(
                    None, _read, f, state, generation, want
                )
            if not chunk:
                break
            if encoding is not None:
                chunk = chunk.encode(encoding)
            if limit is not None and written + len(chunk) > limit:
                chunk = chunk[: limit - written]
            written += len(chunk)
            await writer.write(chunk)
    except _Superseded:
        pass
    finally:
        state.writers -= 1
        if state.scopes == 0 and state.writers == 0:
            _close_soon(f)


def _begin_scope(f: Any) -> _FileState:
    state = _state(f)
    if state.scopes == 0:
        with state.lock:
            # A write left over from an earlier request must not read on.
            state.generation += 1
            state.start = _tell(f)
            state.builds = 0
    state.scopes += 1
    return state


def _end_scope(f: Any, state: _FileState) -> None:
    state.scopes -= 1
    if state.scopes == 0 and state.writers == 0:
        _close_soon(f)


def _rewind_for_resend(f: Any, state: _FileState) -> None:
    state.builds += 1
    if state.builds == 1:
        return
    if getattr(f, "closed", False):
        raise FileBodyError(
            f"cannot resend the request body {f!r}: the file was closed after"
            " the first attempt"
        )
    with state.lock:
        state.generation += 1
        if state.start is None:
            raise FileBodyError(
                f"cannot resend the request body {f!r}: it is not seekable, so"
                " the part already sent by the first attempt cannot be read again;"
                " send bytes, a seekable file or an async generator that can be"
                " restarted"
            )
        f.seek(state.start)


def _build_request(original: Callable[..., Any]) -> Callable[..., Any]:
    async def _request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        data = kwargs.get("data")
        if not _is_file_body(data):
            return await original(self, method, str_or_url, **kwargs)
        state = _begin_scope(data)
        try:
            return await original(self, method, str_or_url, **kwargs)
        finally:
            _end_scope(data, state)

    return _request


def _build_update_body(original: Callable[..., Any]) -> Callable[..., Any]:
    def update_body_from_data(self: Any, body: Any, *args: Any, **kwargs: Any) -> None:
        if _is_file_body(body):
            state = _STATES.get(body)
            if state is not None and state.scopes:
                _rewind_for_resend(body, state)
        original(self, body, *args, **kwargs)

    return update_body_from_data


def _build_write(original: Callable[..., Any]) -> Callable[..., Any]:
    async def write(self: Any, writer: Any) -> None:
        await _write_file(self, writer)

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
        Patch(client.ClientSession, "_request", _build_request),
        Patch(client_reqrep.ClientRequest, "update_body_from_data", _build_update_body),
    )


FIX = Fix(
    id="file-payload-reuse",
    upstream="aio-libs/aiohttp#10325, PR #10915 (3.12.0)",
    summary="file-like bodies reuse the connection; resends carry the whole file",
    affected=((3, 9, 0), (3, 12, 0)),
    probe=_probe,
    patches=_patches,
)
