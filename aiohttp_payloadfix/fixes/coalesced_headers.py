"""coalesced-headers: a request's head goes out with its first body bytes.

Upstream: aio-libs/aiohttp PR #10991, released in 3.12.0.

Affected: aiohttp >=3.9.0,<3.12.0.

Symptom: the client writes a request's status line and headers to the socket
on their own, then the body: two ``send`` calls per small request on the
client and (usually) two reads on the server. On loopback with 64 concurrent
1 KiB POSTs this alone costs 3.11.18 a fifth of its throughput against 3.12.

Remedy: for the writer the client creates for a request (a ``StreamWriter``
on a client ``ResponseHandler``; the web server's writers are left to
aiohttp's own ``write_headers``) the serialised head is held back and sent in
the same transport write as the first body bytes: a small chunk is joined to
it, a large one follows in a second write rather than being copied. The head
goes out on its own where the body cannot come with it: ``drain()`` (flow
control, and the wait for ``100 Continue``, which 3.9-3.11 begin with a
drain), ``set_eof()`` (a request without a body) and ``write_eof()`` with
nothing left to write. A body write that fails or is cancelled before its
first byte leaves the head unsent; aiohttp closes that connection in both
cases, so nothing half-written is reused. Tracing signals fire as before:
``on_request_headers_sent`` when the head is made, ``on_request_chunk_sent``
per chunk. Once the head is out the writer is aiohttp's own class again.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, List, Optional, Sequence

from aiohttp import client_proto, http_writer
from multidict import CIMultiDict

from .._fix import Fix
from .._ledger import Patch

__all__ = ("FIX",)

#: Chunks up to this size are joined to the head (copying them is cheaper
#: than a second send); larger ones follow it in their own write.
_JOIN_LIMIT = 2**16


def _held_class(base: Any) -> type:
    """A subclass of ``base`` whose first transport write carries the head.

    A writer holding a head is switched to it for that time only (the class
    adds no state to the instance layout, so the switch is an assignment).
    """

    def release(self: Any) -> bytes:
        head: bytes = self._payloadfix_head
        del self._payloadfix_head
        self.__class__ = base
        return head

    def _write(self: Any, chunk: Any) -> None:
        if not hasattr(self, "_payloadfix_head"):
            # The head itself, from base.write_headers: hold it.
            self._payloadfix_head = chunk
            return
        head = release(self)
        if len(chunk) <= _JOIN_LIMIT:
            base._write(self, head + chunk)
        else:
            base._write(self, head)
            base._write(self, chunk)

    def _writelines(self: Any, chunks: Iterable[Any]) -> None:
        head = release(self)
        parts: List[Any] = list(chunks)
        if sum(len(p) for p in parts) <= _JOIN_LIMIT:
            base._writelines(self, (head, *parts))
        else:
            base._write(self, head)
            base._writelines(self, parts)

    async def drain(self: Any) -> None:
        base._write(self, release(self))
        await base.drain(self)

    def set_eof(self: Any) -> None:
        base._write(self, release(self))
        base.set_eof(self)

    namespace = {
        "__module__": __name__,
        "__qualname__": f"HeadHolding{base.__name__}",
        "__doc__": "aiohttp's StreamWriter while a request head waits for its body.",
        "_write": _write,
        "drain": drain,
    }
    # Only what the installed release has (3.9 has neither).
    if "_writelines" in dir(base):
        namespace["_writelines"] = _writelines
    if "set_eof" in dir(base):
        namespace["set_eof"] = set_eof
    return type(f"HeadHolding{base.__name__}", (base,), namespace)


def _build_write_headers(original: Callable[..., Any]) -> Callable[..., Any]:
    base = http_writer.StreamWriter
    held = _held_class(base)
    client_protocol = client_proto.ResponseHandler

    async def hold_head(self: Any, status_line: str, headers: Any) -> None:
        self.__class__ = held
        try:
            await original(self, status_line, headers)
        except BaseException:
            # The head was not made (a trace signal or the serialiser raised).
            self.__class__ = base
            raise
        if not hasattr(self, "_payloadfix_head"):  # pragma: no cover - defensive
            self.__class__ = base

    # A plain function: a server response gets aiohttp's own coroutine.
    def write_headers(self: Any, status_line: str, headers: Any) -> Any:
        if type(self) is base and isinstance(self._protocol, client_protocol):
            return hold_head(self, status_line, headers)
        return original(self, status_line, headers)

    return write_headers


class _Transport:
    def __init__(self) -> None:
        self.writes: List[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, data: Iterable[bytes]) -> None:
        self.writes.append(b"".join(data))


class _Protocol:
    connected = True  # read by 3.9-3.10's _write

    def __init__(self) -> None:
        self.transport = _Transport()


def _probe() -> Optional[str]:
    method = inspect.unwrap(http_writer.StreamWriter.write_headers)
    protocol = _Protocol()
    writer = http_writer.StreamWriter(protocol, None)  # type: ignore[arg-type]
    headers: CIMultiDict[str] = CIMultiDict(Host="probe.invalid")
    coro = method(writer, "POST / HTTP/1.1", headers)
    try:
        coro.send(None)
    except StopIteration:
        pass
    else:  # pragma: no cover - write_headers does not suspend without signals
        coro.close()
        raise RuntimeError("StreamWriter.write_headers suspended in the probe")
    if protocol.transport.writes:
        return "a request's head is sent in a write of its own, before the body"
    return None


def _patches() -> Sequence[Patch]:
    return (Patch(http_writer.StreamWriter, "write_headers", _build_write_headers),)


FIX = Fix(
    id="coalesced-headers",
    upstream="aio-libs/aiohttp PR #10991 (3.12.0)",
    summary="a small request's head and body go out in one transport write",
    affected=((3, 9, 0), (3, 12, 0)),
    probe=_probe,
    patches=_patches,
)
