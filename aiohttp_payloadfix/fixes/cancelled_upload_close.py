"""cancelled-upload-close: a half-sent request never goes back to the pool.

Upstream: aio-libs/aiohttp issue #7599, PR #8992, released in 3.10.6.

Affected: aiohttp >=3.9.0,<3.10.6.

Symptom: when the body write is cancelled part-way (the response arrived
early, the caller gave up, a timeout), ``ClientRequest.write_bytes`` swallows
the cancellation, writes the end-of-message marker (for a chunked body: a
truncated body the server takes as complete) and lets the connection be
released to the pool. The next request on that socket is read by the server as
the rest of the previous body and times out.

Remedy: ``ClientRequest.write_bytes`` is replaced by one that closes the
connection when the body write is cancelled, without writing the end of the
message. Unlike 3.10.6 the cancellation is not re-raised: on these releases
``ClientResponse.release()`` and ``wait_for_close()`` await the write task
directly and would hand the CancelledError to the caller. A cancellation while
waiting for ``100 Continue`` (nothing of the body sent) closes the connection
too: the server may still be waiting for the body (see expect-continue-close).

This fix needs file-payload-reuse: closing the connection on a cancelled write
is what turned the file-payload race into a closed connection per upload in
3.10.6.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, Generator, Optional, Sequence

from aiohttp import client_reqrep, payload
from aiohttp.client_exceptions import ClientConnectionError, ClientOSError

from .._fix import Fix
from .._ledger import Patch
from .content_length_limit import declared_length

__all__ = ("FIX",)


def _fail(protocol: Any, exc: BaseException, cause: BaseException) -> None:
    exc.__cause__ = cause
    exc.__context__ = cause
    protocol.set_exception(exc)


def _build_write_bytes(original: Callable[..., Any]) -> Callable[..., Any]:
    async def write_bytes(self: Any, writer: Any, conn: Any) -> None:
        if self._continue is not None:
            try:
                await writer.drain()
                await self._continue
            except asyncio.CancelledError:
                if declared_length(self) != 0:
                    conn.close()
                return
        protocol = conn.protocol
        assert protocol is not None
        body = self.body
        try:
            if isinstance(body, payload.Payload):
                await body.write(writer)
            else:
                if isinstance(body, (bytes, bytearray)):
                    body = self.body = (body,)
                for chunk in body:
                    await writer.write(chunk)
        except asyncio.CancelledError:
            # Part of the body may be on the wire: the socket cannot be reused.
            conn.close()
        except OSError as exc:
            if exc.errno is None and isinstance(exc, asyncio.TimeoutError):
                protocol.set_exception(exc)
            else:
                _fail(
                    protocol,
                    ClientOSError(
                        exc.errno, f"Can not write request body for {self.url!s}"
                    ),
                    exc,
                )
        except Exception as exc:
            _fail(
                protocol,
                ClientConnectionError(
                    f"Failed to send bytes into the underlying connection {conn!s}"
                ),
                exc,
            )
        else:
            await writer.write_eof()
            protocol.start_timeout()

    return write_bytes


class _Stub:
    """Just enough of a request, writer, connection and body for the probe."""

    _continue = None
    url = "http://probe.invalid/"
    closed = False
    protocol = object()

    def __init__(self) -> None:
        self.body = self

    def __iter__(self) -> Any:
        return iter((b"x",))

    def close(self) -> None:
        self.closed = True

    async def write(self, chunk: bytes) -> None:
        await _Suspend()

    async def write_eof(self, chunk: bytes = b"") -> None:
        return None


class _Suspend:
    def __await__(self) -> Generator[None, None, None]:
        yield None


def _probe() -> Optional[str]:
    method = inspect.unwrap(client_reqrep.ClientRequest.write_bytes)
    if "content_length" in inspect.signature(method).parameters:
        return None  # the 3.12 write path, which closes on cancellation
    stub = _Stub()
    coro = method(stub, stub, stub)
    try:
        coro.send(None)  # suspended inside the body write
        coro.throw(asyncio.CancelledError())
    except asyncio.CancelledError:
        return None  # propagates: the connection is closed by the caller path
    except StopIteration:
        if stub.closed:
            return None
        return "a cancelled body write is swallowed and the connection is reused"
    finally:
        coro.close()
    return None


def _patches() -> Sequence[Patch]:
    return (Patch(client_reqrep.ClientRequest, "write_bytes", _build_write_bytes),)


FIX = Fix(
    id="cancelled-upload-close",
    upstream="aio-libs/aiohttp#7599, PR #8992 (3.10.6)",
    summary="a cancelled upload closes its connection instead of reusing it",
    affected=((3, 9, 0), (3, 10, 6)),
    probe=_probe,
    patches=_patches,
    requires=("file-payload-reuse",),
)
