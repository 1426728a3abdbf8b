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

A head declaring ``Content-Length: 0`` has nothing to wait for: with an idle
event loop it is written at once, as aiohttp writes it, and the writer holds
an empty head, so the empty body still ends without aiohttp's body
coroutines. (Sent later, from the body write, the sequential empty POSTs
measured here ran 4-7% slower than unpatched; under load it is held, and
goes with the write task.)

Holding the head must not delay it. On 3.9-3.11 (below Python 3.12) the body
is written by a task that runs a loop iteration after ``send()``, so a held
head would reach the server later than the unpatched client's, which writes
it inside ``send()``. So the common request is written whole, by a replacement
``write_bytes``, without aiohttp's chain of body coroutines: an in-memory body
(``bytes``, ``bytearray``, ``str``; a ``BytesIO`` of at most 64 KiB while
file-payload-reuse is applied) whose size is its declared Content-Length, not
chunked, compressed or waiting for ``100 Continue``, on a transport that is
open and not paused:

* at once, inside ``send()``, when the event loop has nothing else ready
  (sequential requests): the server works on it while the client gets ready
  to read the answer. A body of at most 16 KiB goes in one write with its
  head; a larger one follows the head in a second write, so that the server
  reads the head while the client hands over the body, as unpatched;
* in the write task, as aiohttp's own write, when other callbacks are ready
  (concurrent requests), or when the loop does not show its ready callbacks
  (asyncio's own loops do, in ``_ready``; uvloop does not): writes and
  answers batch up. (Writing at once there
  cost 15% of the throughput of 64 concurrent 1 KiB BytesIO requests.)
  It goes in one write with its head (two, not copied, above 64 KiB; one
  ``writelines`` over TLS, see ``_GATHER_ABOVE``).

On 3.11 below Python 3.12 a whole request of at most 16 KiB is written
without holding its head (see ``_build_send``). On an idle loop ``send()``
writes it itself, as soon as it is called, where aiohttp's ``send()`` would
send the head as it stands (no header to add, the target the URL's path and
query): before aiohttp builds the request's writer. Otherwise ``send()``
leaves it on the connection's protocol for this fix's ``write_headers``,
which writes it at once on an idle loop, in the next loop iteration under
load. Under load there is no write task either: that
``send()`` ends a request without a body with the writer's ``set_eof()``,
and the body is hidden from it meanwhile, which saves the task and its
three loop callbacks for the common small concurrent request.

Every other request takes aiohttp's path, with the held head. A body above
the transport's high-water mark is followed by a drain before the read
timeout starts, as ``write_eof()`` does; the writer's byte counts and its
end-of-message flag are kept as aiohttp's write would leave them.

Trace signals: aiohttp gives a request's writer its signal callbacks whenever
the session has trace configs, whatever they listen to. One check asks
whether any trace config has a receiver for ``on_request_headers_sent`` or
``on_request_chunk_sent``; where none has, the empty signals are not
awaited. With a receiver, each signal fires as before: a receiver for the
chunks sends the body aiohttp's way (its first write still carries the head).
"""

from __future__ import annotations

import asyncio.sslproto
import inspect
import io
import sys
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from aiohttp import (
    client_exceptions,
    client_proto,
    client_reqrep,
    hdrs,
    http,
    http_writer,
    payload,
)
from multidict import CIMultiDict
from yarl import URL

from .._contract import bytes_io_left, nothing
from .._fix import Fix
from .._ledger import Patch

__all__ = ("FIX",)

#: Chunks up to this size are joined to the head (copying them is cheaper
#: than a second send); larger ones follow it in their own write.
_JOIN_LIMIT = 2**16


#: asyncio's TLS transport encrypts the parts given to ``writelines`` one
#: after the other and sends the result in one socket write, as aiohttp 3.12
#: sends a head and its first chunk: above ``_GATHER_ABOVE`` a body written
#: under load goes so (on an idle loop it follows its head: see _send_whole)
#: (a 64 KiB body joined to its head was a copy aiohttp 3.12 does not make:
#: 1-1.5 us more client CPU per concurrent 64 KiB BytesIO request over TLS,
#: 15 rounds twice). Below it, joining costs less than the TLS record the
#: head would take on its own. (A socket transport joins the parts anyway
#: below Python 3.12, and so does the TLS transport below 3.11: None there.)
_TLS_TRANSPORT: Optional[type] = getattr(
    asyncio.sslproto, "_SSLProtocolTransport", None
)
if _TLS_TRANSPORT is not None and "writelines" not in vars(_TLS_TRANSPORT):
    _TLS_TRANSPORT = None
_GATHER_ABOVE = 2**14

#: The values of an exact payload that the whole-request path writes as they
#: are (a memoryview, say, takes aiohttp's path).
_BUFFERS = frozenset({bytes, bytearray})

#: The fix whose write reads a BytesIO body; without it (disabled), such a
#: body takes aiohttp's path.
_REUSE = "file-payload-reuse"

#: The classes writers are switched to while they hold a head.
_HOLDING: Set[type] = set()


def _held_class(base: Any) -> type:
    """A subclass of ``base`` whose first transport write carries the head.

    A writer holding a head is switched to it for that time only (the class
    adds no state to the instance layout, so the switch is an assignment).
    """

    def release(self: Any) -> bytes:
        return _release_head(self, base)

    def _write(self: Any, chunk: Any) -> None:
        if self._payloadfix_head is None:
            # The head itself, from base.write_headers: hold it.
            self._payloadfix_head = chunk
            return
        head = release(self)
        if len(chunk) <= _JOIN_LIMIT:
            base._write(self, head + chunk)
        else:
            if head:
                base._write(self, head)
            base._write(self, chunk)

    def _writelines(self: Any, chunks: Iterable[Any]) -> None:
        head = release(self)
        parts: List[Any] = list(chunks)
        if sum(len(p) for p in parts) <= _JOIN_LIMIT:
            base._writelines(self, (head, *parts))
        else:
            if head:
                base._write(self, head)
            base._writelines(self, parts)

    def flush(self: Any) -> None:
        head = release(self)
        if head:  # (empty: sent already, see write_headers)
            base._write(self, head)

    async def drain(self: Any) -> None:
        flush(self)
        await base.drain(self)

    def set_eof(self: Any) -> None:
        flush(self)
        base.set_eof(self)

    namespace: Dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": f"HeadHolding{base.__name__}",
        "__doc__": "aiohttp's StreamWriter while a request head waits for its body.",
        "_payloadfix_head": None,
        # True when a trace config listens to the request's head or body
        # chunks: the body then goes aiohttp's way (see write_headers).
        "_payloadfix_loud": False,
        "_write": _write,
        "drain": drain,
    }
    # Only what the installed release has (3.9 has neither).
    if "_writelines" in dir(base):
        namespace["_writelines"] = _writelines
    if "set_eof" in dir(base):
        namespace["set_eof"] = set_eof
    held = type(f"HeadHolding{base.__name__}", (base,), namespace)
    _HOLDING.add(held)
    return held


def _quiet(callback: Any, signal: Union[str, Tuple[str, ...]]) -> bool:
    """Whether a writer's trace callback (``on_headers_sent``,
    ``on_chunk_sent``) has nothing to call: no callback, or one whose
    request's trace configs have no receiver for ``signal``. aiohttp sets the
    callbacks whenever a session has trace configs, whatever they listen to
    (a connection counter, OpenTelemetry's request spans); awaiting one then
    only sends empty signals."""
    if callback is None:
        return True
    try:
        return _traces_quiet(callback.func.__self__._traces, signal)
    except AttributeError:  # not aiohttp's own partial(method)
        return False


def _callbacks_quiet(headers_sent: Any, chunk_sent: Any) -> bool:
    """Whether neither of a writer's trace callbacks has anything to call,
    in one check: aiohttp makes both (or neither) for the same request, and
    that request's trace configs answer for both signals. False for a
    callback that is not aiohttp's own, or of another request."""
    try:
        request = (headers_sent or chunk_sent).func.__self__
        if (headers_sent is not None and headers_sent.func.__self__ is not request) or (
            chunk_sent is not None and chunk_sent.func.__self__ is not request
        ):
            return False
        return _traces_quiet(request._traces, _BODY_SIGNALS)
    except AttributeError:  # not aiohttp's own partial(method)
        return False


def _traces_quiet(traces: Any, signal: Union[str, Tuple[str, ...]]) -> bool:
    """Whether none of a request's traces has a receiver for ``signal`` (for
    any of them, given a tuple of signal names)."""
    try:
        for trace in traces:
            config = trace._trace_config
            # (An attribute: through vars() the config's inline attributes,
            # which aiohttp reads for every signal, would become a dict.)
            known = getattr(config, _QUIET, None)
            if type(known) is not dict:
                known = {}
                setattr(config, _QUIET, known)
            quiet = known.get(signal)
            if quiet is None:
                names = (signal,) if isinstance(signal, str) else signal
                lists = [getattr(config, name) for name in names]
                quiet = not any(lists)
                if all(receivers.frozen for receivers in lists):
                    known[signal] = quiet  # frozen once a session uses it
            if not quiet:
                return False
        return True
    except (AttributeError, TypeError):  # not aiohttp's own traces
        return False


#: Kept on a TraceConfig: {signal name, or a tuple of them: whether it has no
#: receiver}, once the session has frozen it (its receivers cannot change
#: after that).
_QUIET = "_payloadfix_quiet"


def _build_write_headers(original: Callable[..., Any]) -> Callable[..., Any]:
    base = http_writer.StreamWriter
    held = _held_class(base)
    client_protocol = client_proto.ResponseHandler
    # What write_headers does on 3.9-3.11 after its trace signal: serialise
    # the head (C or Python, as aiohttp chose) and write it.
    serialize = _serialize

    async def hold_head(self: Any, status_line: str, headers: Any) -> None:
        self.__class__ = held
        try:
            await original(self, status_line, headers)
        except BaseException:
            # The head was not made (a trace signal or the serialiser raised).
            self.__class__ = base
            raise

    content_length = hdrs.CONTENT_LENGTH

    # A plain function: a server response gets aiohttp's own coroutine.
    def write_headers(self: Any, status_line: str, headers: Any) -> Any:
        protocol = self._protocol
        if type(self) is not base or not isinstance(protocol, client_protocol):
            return original(self, status_line, headers)
        whole = getattr(protocol, _WHOLE, None)
        if type(whole) is _Written:
            # send() wrote a request whole (see _build_send): left to do is
            # the writer's bookkeeping, after the write.
            protocol._payloadfix_whole = _SENT  # type: ignore[attr-defined]
            if (
                whole.headers is headers
                and whole.status_line == status_line
                and whole.count == len(headers)
            ):
                _ended(self, whole.sent, whole.size)
            else:
                # What went out is not what aiohttp's send() now asks for:
                # a head it changed after send() wrote it (no release does,
                # send() checks), or another request's, whose send() never
                # ran on. The connection carries a request that is not this
                # one, so this request fails and the connection is closed.
                protocol.set_exception(
                    _write_error(
                        whole.url,
                        ": aiohttp_payloadfix wrote a request that aiohttp's"
                        " send() did not send as written",
                    )
                )
            return nothing()
        elif whole is not None:
            if whole is _SENT or whole[4] is not headers:
                # Not this request's: left by one that failed before its head
                # (or the mark of one whose write task never came).
                protocol._payloadfix_whole = None  # type: ignore[attr-defined]
            else:
                # The whole request send() left here (see _build_send), with
                # everything the write needs checked: head and body go as
                # one. Under load the write waits for the next loop
                # iteration, where aiohttp's write task would have written
                # (writes and answers batch up as with the task); on an idle
                # loop it goes now, and the protocol keeps a mark for this
                # fix's write_bytes, whose task (aiohttp's, kept) then has
                # nothing left to write. (Inline: every small request on
                # 3.11 comes here, and a frame less before the write is
                # measurable on sequential empty requests.)
                data, f, size, url, _, busy = whole
                if f is not None:
                    data = f.read(size)  # (nothing ran since send() measured it)
                buf = serialize(status_line, headers) + data  # type: ignore[misc]
                if busy:
                    protocol._payloadfix_whole = None  # type: ignore[attr-defined]
                    self.loop.call_soon(_write_later, protocol, buf, url)
                else:
                    protocol._payloadfix_whole = _SENT  # type: ignore[attr-defined]
                    transport = protocol.transport
                    if transport is None or transport.is_closing():
                        # The connection went: the response fails (and the
                        # connection is not reused).
                        protocol.set_exception(_write_error(url))
                    else:
                        transport.write(buf)
                _ended(self, len(buf), size)  # (after the write: off its path)
                return nothing()
        headers_sent = self._on_headers_sent
        chunk_sent = self._on_chunk_sent
        if (
            headers_sent is not None or chunk_sent is not None
        ) and not _callbacks_quiet(headers_sent, chunk_sent):
            # A receiver listens (the usual trace config listens to neither
            # signal, and the one check above is all it costs): each signal
            # is then asked about on its own. With one for the chunks, the
            # body goes aiohttp's way, its first write carrying the head.
            if not _quiet(chunk_sent, "on_request_chunk_sent"):
                self._payloadfix_loud = True  # type: ignore[attr-defined]
            if not _quiet(headers_sent, "on_request_headers_sent"):
                # aiohttp's write_headers fires it.
                return hold_head(self, status_line, headers)
        if serialize is None:
            return hold_head(self, status_line, headers)
        # No signal receiver to await: the head is made here.
        head = serialize(status_line, headers)
        if headers.get(content_length) == "0" and not _busy(self.loop):
            # Nothing can join it, and nothing else is ready to run: it goes
            # now, where aiohttp's write_headers writes it. The writer still
            # holds a head, an empty one: the (empty) body then takes the
            # whole-request path, without aiohttp's chain of body coroutines.
            self._write(head)
            head = b""
        self._payloadfix_head = head  # type: ignore[attr-defined]
        self.__class__ = held
        return nothing()

    _own["write_headers"] = write_headers
    return write_headers


def _busy(loop: Any) -> bool:
    """Whether other callbacks are ready in this loop iteration, or the loop
    does not show them (asyncio's loops keep them in ``_ready``; uvloop does
    not)."""
    return bool(getattr(loop, "_ready", True))


def _release_head(writer: Any, base: Any) -> bytes:
    """The head a writer held; the writer is aiohttp's ``base`` class again."""
    head: bytes = writer._payloadfix_head
    del writer._payloadfix_head
    writer.__class__ = base
    return head


def _ended(writer: Any, sent: int, size: int) -> None:
    """What aiohttp's write leaves on the writer once a whole body of ``size``
    bytes went out, ``sent`` bytes with the head: its byte counts and its
    end-of-message flag."""
    writer.buffer_size += sent
    writer.output_size += sent
    if writer.length is not None:
        writer.length -= size
    writer._eof = True


def _ready(protocol: Any) -> Optional[Any]:
    """The transport, when the request can go to it whole right now."""
    if protocol is None:
        return None
    transport = protocol.transport
    if transport is None or transport.is_closing() or protocol._paused:
        return None
    return transport


async def _drained(writer: Any, protocol: Any) -> None:
    await writer.drain()
    protocol.start_timeout()


def _send_whole(
    writer: Any, protocol: Any, transport: Any, data: Any, idle: bool
) -> Any:
    """Write the held head and the whole body; what the write task awaits.

    ``idle``: nothing else is ready to run (a sequential request, written
    inside send()). A body above ``_GATHER_ABOVE`` then follows its head in
    a second write, as unpatched aiohttp writes it there: the server reads
    and parses the head while this client hands the body to the kernel.
    (Sequential 64 KiB ``bytes`` on Python 3.12, against unpatched 3.11.18:
    joined 0.93, gathered 0.94 over HTTP and 0.95 over TLS; apart 0.97 and
    1.09.) Under load one write is cheaper (concurrent 64 KiB over TLS:
    gathered 1.05, apart 0.85)."""
    head = _release_head(writer, http_writer.StreamWriter)
    size = len(data)
    if size <= _GATHER_ABOVE or not head:
        if head or data:  # (an empty head was sent already)
            transport.write(head + data)
    elif idle:
        transport.write(head)
        transport.write(data)
    elif type(transport) is _TLS_TRANSPORT:
        transport.writelines((head, data))  # neither copied nor sent apart
    elif size <= _JOIN_LIMIT:
        transport.write(head + data)
    else:  # not copied
        transport.write(head)
        transport.write(data)
    _ended(writer, len(head) + size, size)
    return _body_sent(writer, protocol)


def _body_sent(writer: Any, protocol: Any) -> Any:
    """What ends a write task once the whole body is on the transport: as
    write_eof() would, the read timeout starts once the transport has taken
    the body (after a drain, if it paused). A coroutine to await, or None."""
    if protocol._paused:
        return _drained(writer, protocol)
    protocol.start_timeout()
    return None


#: Bodies up to this size are written without a task (see _build_send): with
#: the head they stay below the transport's high-water mark (64 KiB), so the
#: write never needs the drain that would need a task.
_TASKLESS_LIMIT = 2**14

#: The signals a request's write fires: with a receiver for either, send()
#: keeps aiohttp's body write.
_BODY_SIGNALS = ("on_request_headers_sent", "on_request_chunk_sent")

#: Where send() leaves a whole request for this fix's write_headers, on the
#: connection's protocol (one request at a time): an attribute, set and read
#: as one. (Through ``vars(protocol)`` it would turn the protocol's inline
#: attributes into a dict, and every later attribute access on it, aiohttp's
#: included, measured about 2% slower for sequential empty requests here.)
_WHOLE = "_payloadfix_whole"

#: What write_headers leaves there once a request went whole on an idle
#: loop, for write_bytes.
_SENT = object()


class _Written:
    """What send() leaves on the protocol once it wrote a request whole
    itself (see ``_build_send``): what it wrote, for write_headers to check
    against the head aiohttp's send() then asks it to write, and to keep the
    writer's byte counts."""

    __slots__ = ("count", "headers", "sent", "size", "status_line", "url")

    def __init__(
        self, status_line: str, headers: Any, sent: int, size: int, url: Any
    ) -> None:
        self.status_line = status_line
        self.headers = headers
        self.count = len(headers)
        self.sent = sent
        self.size = size
        self.url = url


#: aiohttp's head serialiser (C or Python, as aiohttp chose), None where the
#: release has none; taskless_send() requires it.
_serialize: Optional[Callable[[str, Any], bytes]] = getattr(
    http_writer, "_serialize_headers", None
)


def _write_error(url: Any, why: str = "") -> Exception:
    # What aiohttp's own body write fails with on a closed connection.
    return client_exceptions.ClientOSError(
        None, f"Can not write request body for {url!s}{why}"
    )


def _write_whole(protocol: Any, buf: bytes, url: Any) -> None:
    transport = protocol.transport
    if transport is None or transport.is_closing():
        # The connection went: the response fails (and the connection is
        # not reused) instead of waiting for a reply to nothing.
        protocol.set_exception(_write_error(url))
        return
    transport.write(buf)


def _write_later(protocol: Any, buf: bytes, url: Any) -> None:
    """The deferred write of a whole request (a loop callback: what goes
    wrong is the request's error, not the loop's)."""
    try:
        _write_whole(protocol, buf, url)
    except Exception as exc:  # noqa: BLE001 - handed to the request
        protocol.set_exception(exc)


#: ClientRequest subclasses (a session's ``request_class``): whether they
#: leave ``write_bytes`` and ``body`` to ClientRequest.
_PLAIN_CLASSES: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _plain_request_class(cls: type) -> bool:
    """Whether a request of ``cls`` may skip ``write_bytes``: not when the
    class writes its body itself (its ``write_bytes`` is never called
    otherwise) or makes ``body`` something other than a plain attribute."""
    plain = _PLAIN_CLASSES.get(cls)
    if plain is None:
        plain = not any(
            "write_bytes" in vars(k) or "body" in vars(k)
            for k in cls.__mro__
            if k is not client_reqrep.ClientRequest
        )
        _PLAIN_CLASSES[cls] = plain
    return plain


def _build_whole_body() -> Callable[[Any], Optional[Tuple[Any, Any, int]]]:
    from .._ledger import LEDGER  # noqa: PLC0415 - the ledger imports the fixes

    exact = (payload.BytesPayload, payload.StringPayload)
    bytes_io = payload.BytesIOPayload
    content_length = hdrs.CONTENT_LENGTH

    def whole_body(request: Any) -> Optional[Tuple[Any, Any, int]]:
        """``(data, file, size)`` of a body this fix may write whole, else
        None: ``bytes`` or ``bytearray`` (in a bytes or str payload), or a
        ``BytesIO`` still open whose reads are this package's
        (file-payload-reuse applied; ``data`` None, it is read when written),
        of the size its Content-Length declares."""
        body = request.body
        kind = type(body)
        if kind is bytes_io:
            if not LEDGER.is_applied(_REUSE):
                return None
            f = body._value
            if type(f) is not io.BytesIO:
                # A subclass may read or size itself otherwise: the fix's
                # payload write reads it, and aiohttp's path ends it.
                return None
            size = bytes_io_left(f)
            if size < 0:  # closed: aiohttp's path tells
                return None
            data = None
        elif kind in exact:
            data = body._value
            if type(data) not in _BUFFERS:
                return None
            size = len(data)
            f = None
        else:
            return None
        if request.headers.get(content_length) != str(size):
            return None
        return data, f, size

    return whole_body


def _build_send(original: Callable[..., Any]) -> Callable[..., Any]:
    """``ClientRequest.send`` without a write task for a small whole request.

    3.11's send() ends a request without a body with the writer's
    ``set_eof()`` and creates no task. Under load (other callbacks ready in
    asyncio's loop), a small in-memory body of its declared
    length, with no signal or 100-continue to wait for, takes that branch
    too: the body is hidden from send() while it runs, and ``write_headers``
    (this fix's, which send() calls first) takes the whole request: head and
    body, in one write in the next loop iteration, where the task would have
    written them. The writer is never switched to the head-holding class.
    Per request this saves the write task and its three loop callbacks (its
    first step and two done callbacks), and the held head's bookkeeping. The
    body is back on the request when send() returns or raises.

    On an idle loop the body stays on the request, and the whole request
    goes at once, inside send(): written by this send() before it calls
    aiohttp's where nothing aiohttp's send() does before its
    ``write_headers`` changes the head (the request is then left on the
    protocol as written, and ``write_headers`` checks it against the head it
    is given and keeps the writer's byte counts), else by ``write_headers``.
    aiohttp's write task stays, empty (this fix's ``write_bytes`` finds the
    request written): without it the loop blocks for the answer right after
    the write, and
    sequential small requests measured here ran 10-15% slower (a sleeping
    client wakes up later than one still busy with the task's callbacks when
    the answer arrives). A loop that does not show its ready callbacks
    (uvloop) takes aiohttp's path, with the held head: whether it is busy is
    unknown, and the task's timing is the one measured.

    The request is left on the connection's protocol for ``write_headers``
    with its headers object, so a request that failed before its head was
    written cannot be taken for the next one on that connection.
    """
    whole_body = _build_whole_body()
    base = http_writer.StreamWriter
    client_protocol = client_proto.ResponseHandler
    exact = (payload.BytesPayload, payload.StringPayload)
    content_length = hdrs.CONTENT_LENGTH
    content_type = hdrs.CONTENT_TYPE
    connection = hdrs.CONNECTION
    connect = hdrs.METH_CONNECT
    http11 = http.HttpVersion11
    serialize = _serialize
    assert serialize is not None  # (taskless_send() requires it)

    async def taskless(self: Any, conn: Any, protocol: Any, whole: Any) -> Any:
        protocol._payloadfix_whole = whole
        body = self.body
        self.body = b""
        try:
            response = await original(self, conn)
        finally:
            self.body = body
            left = protocol._payloadfix_whole
            protocol._payloadfix_whole = None
        if left is not None and left is not _SENT:
            # This fix's write_headers did not take the request (something
            # else wrote the head): the body was not sent, so the request
            # must not stand.
            protocol.set_exception(
                _write_error(
                    self.url, ": aiohttp_payloadfix found the request writer replaced"
                )
            )
        return response

    request_class = client_reqrep.ClientRequest

    # A plain function: any other request gets the original's coroutine.
    def send(self: Any, conn: Any) -> Any:
        protocol = conn.protocol
        cls = type(self)
        # asyncio's loops keep their ready callbacks here; uvloop does not.
        ready = getattr(self.loop, "_ready", None)
        if (
            ready is None
            or (cls is not request_class and not _plain_request_class(cls))
            or self._continue is not None
            or self.chunked is not None
            or self.compress
            or protocol is None
            or protocol._paused
            or not isinstance(protocol, client_protocol)
            or client_reqrep.StreamWriter is not base  # type: ignore[attr-defined]
        ):
            return original(self, conn)
        traces = self._traces
        if traces:
            # _traces_quiet(traces, _BODY_SIGNALS), inline where each trace
            # config has its answer cached.
            for trace in traces:
                known = getattr(trace._trace_config, _QUIET, None)
                if type(known) is not dict or known.get(_BODY_SIGNALS) is not True:
                    if not _traces_quiet(traces, _BODY_SIGNALS):
                        return original(self, conn)
                    break
        body = self.body
        if type(body) in exact:
            # whole_body(self) for bytes, inline (the common body).
            data = body._value
            if type(data) not in _BUFFERS:
                return original(self, conn)
            size = len(data)
            if size > _TASKLESS_LIMIT or self.headers.get(content_length) != str(size):
                return original(self, conn)
            f = None
        else:
            whole = whole_body(self)
            if whole is None or whole[2] > _TASKLESS_LIMIT:
                return original(self, conn)
            data, f, size = whole
        if ready:  # other callbacks wait: no write task
            return taskless(
                self, conn, protocol, (data, f, size, self.url, self.headers, True)
            )
        if request_class.write_bytes is not _own["write_bytes"]:
            # The body stays on the request, and this fix's write_bytes must
            # be the one send() calls, to find the request written: another
            # on top of it (which may not call it) gets the held head.
            return original(self, conn)
        headers = self.headers
        transport = protocol.transport
        if (
            # What aiohttp's send() writes is known before it runs: it
            # changes no header, the request target is the URL's path and
            # query, and this fix's write_headers is the one it calls (to
            # find the request written, not write its head again).
            cls is request_class  # (a subclass may change what send() reads)
            and connection not in headers
            and (content_type in headers or self.method not in self.POST_METHODS)
            and self.version is http11  # (aiohttp's own: not a look-alike tuple)
            and not conn._connector.force_close
            and not self.proxy
            and self.method != connect
            and base.write_headers is _own["write_headers"]
            # (_ready(protocol), inline: _paused was checked above.)
            and transport is not None
            and not transport.is_closing()
        ):
            # Written here, before aiohttp's send() builds the writer: the
            # server works on the request while the client gets ready to
            # read the answer. (From write_headers, about 2 us later, the
            # sequential empty POSTs measured here ran 2-3% slower than
            # unpatched; from here, at par.)
            status_line = f"{self.method} {self.url.raw_path_qs} HTTP/1.1"
            buf = serialize(status_line, headers) + (
                data if f is None else f.read(size)
            )
            transport.write(buf)
            protocol._payloadfix_whole = _Written(
                status_line, headers, len(buf), size, self.url
            )
            return original(self, conn)
        protocol._payloadfix_whole = (data, f, size, self.url, headers, False)
        return original(self, conn)

    return send


def _build_write_bytes(original: Callable[..., Any]) -> Callable[..., Any]:
    whole_body = _build_whole_body()

    async def in_task(
        self: Any, writer: Any, conn: Any, args: Any, f: Any, size: int
    ) -> None:
        protocol = conn.protocol
        transport = _ready(protocol)
        if f is None:
            data = self.body._value
            left = len(data)
        else:
            left = bytes_io_left(f)  # (-1: closed meanwhile)
        if transport is None or type(writer) not in _HOLDING or left != size:
            # Things changed while the task waited (another task resized the
            # body, or the connection went): aiohttp's own path, with the
            # Content-Length fixes.
            await original(self, writer, conn, *args)
            return
        if f is not None:
            data = f.read(size)
        drained = _send_whole(writer, protocol, transport, data, False)
        if drained is not None:
            await drained

    # A plain function: any other request gets the original's coroutine.
    def write_bytes(self: Any, writer: Any, conn: Any, *args: Any) -> Any:
        protocol = conn.protocol
        sent = getattr(protocol, _WHOLE, None)
        if sent is not None:
            protocol._payloadfix_whole = None
            if sent is _SENT:  # write_headers wrote the whole request
                drained = _body_sent(writer, protocol)
                return nothing() if drained is None else drained
        if (
            type(writer) not in _HOLDING
            or writer._payloadfix_loud  # (a trace receiver, see write_headers)
            or self._continue is not None
            or writer.chunked
            or writer._compress is not None
        ):
            return original(self, writer, conn, *args)
        whole = whole_body(self)
        if whole is None:
            return original(self, writer, conn, *args)
        data, f, size = whole
        if f is not None and size > _JOIN_LIMIT:  # a large BytesIO: read in parts
            return original(self, writer, conn, *args)
        if _busy(self.loop):
            # Other callbacks wait in this loop iteration (concurrent
            # requests), or the loop does not show them (uvloop): the write
            # goes with the task, as aiohttp's would, and writes and answers
            # batch up. (The task checks the transport when it runs.)
            return in_task(self, writer, conn, args, f, size)
        # Nothing else to run: the request goes now, if the transport is open
        # and not paused, and the server works on it while the caller gets
        # ready to read the answer.
        transport = _ready(protocol)
        if transport is None:
            return original(self, writer, conn, *args)
        drained = _send_whole(
            writer, protocol, transport, data if f is None else f.read(size), True
        )
        return nothing() if drained is None else drained

    _own["write_bytes"] = write_bytes
    return write_bytes


#: This fix's ``write_bytes`` (the one that ends a request written whole on
#: an idle loop) and ``write_headers`` (the one that finds it written), as
#: built by the ledger: send() checks that they are the ones aiohttp calls.
_own: Dict[str, Any] = {"write_bytes": None, "write_headers": None}


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


class _Tasked(Exception):
    pass


class _ProbeLoop:
    def get_debug(self) -> bool:
        return False

    def create_task(self, coro: Any) -> Any:
        coro.close()
        raise _Tasked

    def create_future(self) -> Any:  # pragma: no cover - no 100-continue here
        raise _Tasked


class _ProbeConnector:
    force_close = False


class _ProbeProtocol(_Protocol):
    writing_paused = False
    _paused = False

    def start_timeout(self) -> None:
        pass


class _ProbeConnection:
    _connector = _ProbeConnector()

    def __init__(self) -> None:
        self.protocol = _ProbeProtocol()


def _probe_write_bytes(*_: Any) -> Any:
    raise _Tasked


class _ProbeResponse:
    def __init__(self, *args: Any, writer: Any = None, **kwargs: Any) -> None:
        self.writer = writer


def _send_ends_without_task() -> bool:
    """Whether ``ClientRequest.send`` ends a request without a body with the
    writer's ``set_eof()``, creating no write task (3.11.0 and newer: 3.9 and
    3.10 create one for every request). Tried on a request to nowhere."""
    send = inspect.unwrap(client_reqrep.ClientRequest.send)
    loop: Any = _ProbeLoop()
    conn = _ProbeConnection()
    try:
        request = client_reqrep.ClientRequest(
            "POST", URL("http://probe.invalid/"), loop=loop
        )
        request.response_class = _ProbeResponse  # type: ignore[assignment]
        # A body write is the answer "no": stopped before a coroutine exists.
        request.write_bytes = _probe_write_bytes  # type: ignore[method-assign,assignment]
        coro = send(request, conn)
        try:
            coro.send(None)
        except StopIteration as stop:
            response = stop.value
        else:  # pragma: no cover - send() does not suspend here
            coro.close()
            return False
    except Exception:  # noqa: BLE001 - _Tasked, or a send() unlike 3.11's
        return False
    return (
        isinstance(response, _ProbeResponse)
        and response.writer is None
        and len(conn.protocol.transport.writes) == 1
    )


def _send_starts_task_eagerly() -> bool:
    """Whether ``ClientRequest.send`` starts its write task eagerly (3.10+
    on Python 3.12+): the task then runs inside send() and, done there, costs
    no loop callbacks, and a write under load goes out inside send()."""
    if tuple(sys.version_info[:2]) < (3, 12):  # (not a mypy platform check)
        return False
    code = inspect.unwrap(client_reqrep.ClientRequest.send).__code__
    return any(isinstance(c, tuple) and "eager_start" in c for c in code.co_consts)


def taskless_send() -> bool:
    """Whether this fix sends small requests under load without a write task
    (``_build_send``): where send() has the branch without a task (3.11) and
    starts its task lazily (below Python 3.12; with an eager task there is
    little to save, and the write would move from inside send() to the next
    loop iteration)."""
    return (
        "set_eof" in dir(http_writer.StreamWriter)
        and _serialize is not None
        and not _send_starts_task_eagerly()
        and _send_ends_without_task()
    )


def _patches() -> Sequence[Patch]:
    patches = [
        Patch(http_writer.StreamWriter, "write_headers", _build_write_headers),
        Patch(client_reqrep.ClientRequest, "write_bytes", _build_write_bytes),
    ]
    if taskless_send():
        patches.append(Patch(client_reqrep.ClientRequest, "send", _build_send))
    return patches


FIX = Fix(
    id="coalesced-headers",
    upstream="aio-libs/aiohttp PR #10991 (3.12.0)",
    summary="a small request's head and body go out in one transport write",
    affected=((3, 9, 0), (3, 12, 0)),
    probe=_probe,
    patches=_patches,
)
