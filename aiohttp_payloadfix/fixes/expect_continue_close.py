"""expect-continue-close: a request whose body was never sent does not go
back to the pool.

Upstream: fixed in aiohttp 3.14.4, where ``write_bytes`` waits for the 100
inside the handler that closes the connection of a cancelled write (no issue
found; 3.14.0-3.14.3 and 3.13.x still have the bug, and are left untouched
like every release from 3.13 on).

Affected: aiohttp >=3.9.0,<3.14.4 (found by tests/test_desync.py).

Symptom: with ``expect100=True`` the body write waits for ``100 Continue``.
When the server answers with a final status instead (413, 417, 401), or with
the 100 and the final status in one read, the end of that answer cancels the
write while it waits, outside the code that closes the connection on a
cancelled write (before 3.10.6 the cancellation is swallowed there). The
connection goes back to the pool with the body unsent, and a server that goes
on reading the declared body, as RFC 9110 section 10.1.1 allows, takes the
next request on that socket for body bytes: a request desync.

Remedy (a wrapper of ``ClientRequest.write_bytes``, for requests that expect
a 100 only): a cancelled body write closes the connection, and so does a write
that returned without the 100 having arrived, unless the request declared
``Content-Length: 0`` (nothing was owed). Before 3.10.6, cancelled-upload-close
closes it where it swallows the cancellation.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Awaitable, Callable, Generator, List, Optional, Sequence

from aiohttp import client_reqrep

from .._fix import Fix
from .._ledger import Patch
from .content_length_limit import declared_length, forwarder

__all__ = ("FIX",)


def _build_write_bytes(original: Callable[..., Any]) -> Callable[..., Any]:
    forward = forwarder(original)

    # A plain function: requests without Expect get the original's coroutine.
    def write_bytes(
        self: Any, writer: Any, conn: Any, content_length: Optional[int] = None
    ) -> Awaitable[None]:
        waiting = self._continue
        if waiting is None:
            return forward(self, writer, conn, content_length)
        return guarded(self, writer, conn, content_length, waiting)

    async def guarded(
        self: Any,
        writer: Any,
        conn: Any,
        content_length: Optional[int],
        waiting: Any,
    ) -> None:
        try:
            await forward(self, writer, conn, content_length)
        except asyncio.CancelledError:
            # Waiting for the 100 or part-way: the body is not all on the wire
            # (unless it is declared empty).
            if declared_length(self) != 0:
                conn.close()
            raise
        if waiting.done() and not waiting.cancelled():
            return
        # Returned without the 100 (nothing was sent): unless the request is
        # already failing (short-body-error, overlong-body-warning: aiohttp
        # closes the connection then), the connection must not be reused.
        protocol = conn.protocol
        if protocol is None or declared_length(self) == 0:
            return
        if getattr(protocol, "exception", lambda: None)() is None:
            conn.close()

    return write_bytes


class _Suspend:
    def __await__(self) -> Generator[None, None, None]:
        yield None


class _Stub:
    """Just enough of a request, writer and connection for the probe: a
    request still waiting for its 100 Continue."""

    url = "http://probe.invalid/"
    closed = False
    protocol = object()
    body = _body = None
    _upload_tracker = _upload_gen = None  # 3.14.4+

    def __init__(self) -> None:
        self._continue = _Suspend()

    def close(self) -> None:
        self.closed = True

    def send_headers(self) -> None:
        return None

    async def drain(self) -> None:
        return None


def _probe() -> Optional[str]:
    method = inspect.unwrap(client_reqrep.ClientRequest.write_bytes)
    stub = _Stub()
    args: List[Any] = [stub, stub, stub]
    if len(inspect.signature(method).parameters) > 3:
        args.append(None)
    coro = method(*args)
    try:
        coro.send(None)  # suspended waiting for the 100
        coro.throw(asyncio.CancelledError())
    except (asyncio.CancelledError, StopIteration):
        pass
    except Exception:  # an unexpected shape: keep the guard
        pass
    finally:
        coro.close()
    if stub.closed:
        return None
    return "a request whose 100 Continue never came is pooled with its body unsent"


def _patches() -> Sequence[Patch]:
    return (Patch(client_reqrep.ClientRequest, "write_bytes", _build_write_bytes),)


FIX = Fix(
    id="expect-continue-close",
    upstream="aiohttp 3.14.4 (the wait for 100 Continue moved into the handler"
    " that closes a cancelled write's connection)",
    summary="a request answered before its 100 Continue closes its connection",
    affected=((3, 9, 0), (3, 14, 4)),
    probe=_probe,
    patches=_patches,
)
