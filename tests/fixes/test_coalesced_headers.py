"""coalesced-headers: a request's head and first body bytes in one write.

What is counted is the client's calls to its socket transport's ``write`` (a
TCP segment boundary on the server side is not something a test can rely on).
Releases before 3.12 write the head on its own; with the fix, or on 3.12+, the
head is the start of the first write that carries body bytes.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import functools
import inspect
import io
import socket
import ssl
import sys
import zlib
from asyncio import selector_events
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import aiohttp
import pytest
from aiohttp import client_proto, client_reqrep, http_writer, web
from conftest import (
    ConnectionCounter,
    FixState,
    RawHTTPServer,
    Reply,
    WebServer,
    switched,
)
from multidict import CIMultiDict
from yarl import URL

import aiohttp_payloadfix
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import LEDGER, MARKER
from aiohttp_payloadfix.fixes import by_id, coalesced_headers

from .contract_support import captured_log

FIX_ID = "coalesced-headers"
SAFETY = aiohttp.ClientTimeout(total=30)
KiB = 1024
AFFECTED = AIOHTTP_VERSION < (3, 12, 0)


def _send_starts_write_eagerly() -> bool:
    """aiohttp 3.10.5+ on Python 3.12+ start the body write as an eager task:
    it runs inside send(), whatever the loop has ready."""
    if tuple(sys.version_info[:2]) < (3, 12):  # (not a mypy platform check)
        return False
    code = inspect.unwrap(client_reqrep.ClientRequest.send).__code__
    return any(isinstance(c, tuple) and "eager_start" in c for c in code.co_consts)


#: The write task runs after send() returns (the timing these tests observe).
LAZY_TASK = AFFECTED and not _send_starts_write_eagerly()

#: send() ends a request without a body with no write task (3.11) and starts
#: its task lazily (below Python 3.12), so the fix sends a small whole request
#: under load without a task.
TASKLESS = AFFECTED and coalesced_headers.taskless_send()


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


@dataclass
class Wire:
    """Every transport write the client made, per connection, in order."""

    writes: List[bytes] = field(default_factory=list)

    def client(self) -> List[bytes]:
        return list(self.writes)


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wire]:
    """Records the writes of client transports (those whose protocol is
    aiohttp's client ResponseHandler) on asyncio's socket transport."""
    log = Wire()
    cls: Any = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009
    write = cls.write
    writelines = cls.writelines
    inside = [False]

    def is_client(transport: Any) -> bool:
        return isinstance(transport.get_protocol(), client_proto.ResponseHandler)

    def recording_write(self: Any, data: Any) -> None:
        if not inside[0] and is_client(self):
            log.writes.append(bytes(data))
        write(self, data)

    def recording_writelines(self: Any, chunks: Any) -> None:
        chunks = list(chunks)
        if is_client(self):
            log.writes.append(b"".join(chunks))
        inside[0] = True  # 3.11's writelines calls write
        try:
            writelines(self, chunks)
        finally:
            inside[0] = False

    monkeypatch.setattr(cls, "write", recording_write)
    monkeypatch.setattr(cls, "writelines", recording_writelines)
    yield log


def head_of(data: bytes) -> Tuple[bytes, bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete head in {data[:80]!r}"
    return head + sep, rest


async def post(server: RawHTTPServer, data: Any, **kwargs: Any) -> None:
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(server.url("/upload"), data=data, **kwargs) as resp:
            assert resp.status == 200
            await resp.read()


def one_request(server: RawHTTPServer) -> bytes:
    server.assert_clean()
    (request,) = server.requests
    assert request.complete
    return request.body


# --------------------------------------------------------------------------
# The common case: a small body goes out with the head.

SMALL_BODIES: Dict[str, Callable[[], Union[bytes, bytearray, io.BytesIO]]] = {
    "bytes": lambda: b"x" * KiB,
    "bytearray": lambda: bytearray(b"y" * KiB),
    "BytesIO": lambda: io.BytesIO(b"z" * KiB),
    "16 KiB bytes": lambda: b"w" * (16 * KiB),
}


@pytest.mark.parametrize("kind", list(SMALL_BODIES))
async def test_small_body_goes_out_with_the_head(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire, kind: str
) -> None:
    body = SMALL_BODIES[kind]()
    # Before the request: 3.12.0-3.12.7 close a BytesIO body after its write.
    expected = bytes(body.getvalue() if isinstance(body, io.BytesIO) else body)
    await post(raw_server, body)
    assert one_request(raw_server) == expected
    (write,) = wire.client()
    head, rest = head_of(write)
    assert head.startswith(b"POST /upload HTTP/1.1\r\n")
    assert rest == expected


@pytest.mark.skipif(not AFFECTED, reason="3.12+ coalesces: nothing to reproduce")
async def test_bug_reproduces_unfixed(
    unfixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    await post(raw_server, b"x" * KiB)
    assert one_request(raw_server) == b"x" * KiB
    head, body = wire.client()
    assert head_of(head)[1] == b""
    assert body == b"x" * KiB


async def test_large_chunk_is_not_copied_into_the_head(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    body = b"L" * (256 * KiB)
    await post(raw_server, body)
    assert one_request(raw_server) == body
    writes = wire.client()
    if AIOHTTP_VERSION >= (3, 12, 0):
        return  # upstream's choice, not ours: head joined or written alongside
    head, data = writes
    assert head_of(head)[1] == b""
    assert data == body


async def test_file_like_body_larger_than_a_read(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    """A 200 KiB BytesIO is read 64 KiB at a time: the head goes with the
    first read, the rest follows."""
    body = bytes(range(256)) * 800
    await post(raw_server, io.BytesIO(body))
    assert one_request(raw_server) == body
    first, *_ = wire.client()
    head, rest = head_of(first)
    assert rest and body.startswith(rest)
    assert b"".join(wire.client()) == head + body


async def test_chunked_body(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b"first"
        yield b"second"

    await post(raw_server, gen())
    assert one_request(raw_server) == b"firstsecond"
    first, *_ = wire.client()
    head, rest = head_of(first)
    assert b"transfer-encoding: chunked" in head.lower()
    assert rest.startswith(b"5\r\nfirst\r\n")


async def test_compressed_body(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    body = b"compress me " * 100
    await post(raw_server, body, compress="deflate")
    sent = one_request(raw_server)
    assert zlib.decompress(sent) == body
    first, *_ = wire.client()
    head, rest = head_of(first)
    assert b"content-encoding: deflate" in head.lower()
    assert rest, "the head went out without body bytes"


# --------------------------------------------------------------------------
# Where the head must go out alone.


async def test_request_without_body(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.get(raw_server.url("/")) as resp:
            assert resp.status == 200
    raw_server.assert_clean()
    (request,) = raw_server.requests
    assert (request.method, request.complete) == ("GET", True)
    (write,) = wire.client()
    assert head_of(write)[1] == b""


async def test_empty_file_like_body(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    await post(raw_server, io.BytesIO())
    assert one_request(raw_server) == b""
    (write,) = wire.client()
    assert head_of(write)[1] == b""


async def test_expect_continue_sends_the_head_first(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    """The server answers 100 only after the head: a head held for the body
    would wait for ever (here: until the safety timeout)."""
    await post(raw_server, b"x" * KiB, expect100=True)
    assert one_request(raw_server) == b"x" * KiB
    head, body = wire.client()
    assert b"expect: 100-continue" in head.lower()
    assert head_of(head)[1] == b""
    assert body == b"x" * KiB


async def test_many_requests_on_one_connection(
    fixed: FixState,
    raw_server: RawHTTPServer,
    wire: Wire,
    connections: ConnectionCounter,
) -> None:
    async with connections.session(timeout=SAFETY) as session:
        for i in range(5):
            data = (b"%d" % i) * 100
            async with session.post(raw_server.url("/upload"), data=data) as resp:
                await resp.read()
            async with session.get(raw_server.url("/")) as resp:
                await resp.read()
    raw_server.assert_clean()
    assert connections.created == 1
    assert [r.method for r in raw_server.requests] == ["POST", "GET"] * 5
    assert len(wire.client()) == 10


# --------------------------------------------------------------------------
# When the request goes out. Holding the head must not make it later than
# the unpatched client's head: with an idle loop a small in-memory body goes
# out, with its head, before send() returns; under load (other callbacks
# ready) it goes with the write task, as aiohttp's body does.


@dataclass
class SendWatch:
    """The client's writes as they stood when each ``send()`` returned."""

    wire: Wire
    at_return: List[List[bytes]] = field(default_factory=list)
    busy: bool = False
    #: Called when send() has returned, before the write task runs.
    after: Optional[Callable[[], None]] = None
    #: Give the request a loop that does not show its ready callbacks.
    hide_ready: bool = False


class _LoopHidingReady:
    """The running loop, as a loop without ``_ready`` (such as uvloop's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        if name == "_ready":
            raise AttributeError(name)
        return getattr(self._loop, name)


@pytest.fixture
def send_watch(monkeypatch: pytest.MonkeyPatch, wire: Wire) -> SendWatch:

    watch = SendWatch(wire)
    send = client_reqrep.ClientRequest.send

    async def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if watch.busy:
            # Another callback ready in this iteration: a loop under load.
            asyncio.get_running_loop().call_soon(lambda: None)
        if watch.hide_ready:
            self.loop = _LoopHidingReady(self.loop)
        resp = await send(self, *args, **kwargs)
        watch.at_return.append(wire.client())
        if watch.after is not None:
            watch.after()
        return resp

    monkeypatch.setattr(client_reqrep.ClientRequest, "send", watched)
    return watch


IN_MEMORY: Dict[str, Callable[[], Any]] = {
    "empty bytes": lambda: b"",
    "bytes": lambda: b"x" * KiB,
    "str": lambda: "s" * KiB,
    "bytearray": lambda: bytearray(b"y" * KiB),
    "BytesIO": lambda: io.BytesIO(b"z" * KiB),
    "64 KiB BytesIO": lambda: io.BytesIO(b"w" * (64 * KiB)),
    "1 MiB bytes": lambda: b"m" * (1024 * KiB),
}


def content(data: Any) -> bytes:
    if isinstance(data, io.BytesIO):
        return data.getvalue()
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


@pytest.mark.skipif(not AFFECTED, reason="3.12+: aiohttp's own timing")
@pytest.mark.parametrize("kind", list(IN_MEMORY))
async def test_in_memory_body_goes_out_before_send_returns(
    fixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch, kind: str
) -> None:
    data = IN_MEMORY[kind]()
    expected = content(data)
    await post(raw_server, data)
    assert one_request(raw_server) == expected
    (at_return,) = send_watch.at_return
    assert b"".join(at_return) == b"".join(send_watch.wire.client())
    head, rest = head_of(b"".join(at_return))
    assert rest == expected
    # One write, unless the body is above 16 KiB: it then follows its head.
    assert len(at_return) == (1 if len(expected) <= 16 * KiB else 2)
    if len(at_return) == 2:
        assert head_of(at_return[0])[1] == b""


@pytest.mark.skipif(not AFFECTED, reason="3.12+: aiohttp's own writes")
@pytest.mark.parametrize("loop", ["idle", "busy"])
@pytest.mark.parametrize(
    "kind", ["16 KiB bytes", "64 KiB bytes", "64 KiB BytesIO", "1 MiB bytes"]
)
async def test_on_an_idle_loop_a_body_above_16_kib_follows_its_head(
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    kind: str,
    loop: str,
) -> None:
    """A sequential request's head goes out on its own when its body is above
    16 KiB, the body right after it, both inside send(): the server reads the
    head while the client hands over the body, as with unpatched aiohttp.
    Under load (other callbacks ready) head and body go in one write, the
    body joined to the head up to 64 KiB; above that, not copied."""
    if loop == "busy":
        if not hasattr(asyncio.get_running_loop(), "_ready"):
            pytest.skip("this event loop does not show its ready callbacks")
        send_watch.busy = True
    bodies: Dict[str, Callable[[], Any]] = {
        "16 KiB bytes": lambda: b"a" * (16 * KiB),
        "64 KiB bytes": lambda: b"b" * (64 * KiB),
        "64 KiB BytesIO": lambda: io.BytesIO(b"c" * (64 * KiB)),
        "1 MiB bytes": lambda: b"d" * (1024 * KiB),
    }
    data = bodies[kind]()
    expected = content(data)
    await post(raw_server, data)
    assert one_request(raw_server) == expected
    writes = send_watch.wire.client()
    if loop == "idle":
        (at_return,) = send_watch.at_return
        assert at_return == writes
    apart = len(expected) > 64 * KiB or (loop == "idle" and len(expected) > 16 * KiB)
    if apart:
        head, body = writes
        assert head_of(head)[1] == b""
        assert body == expected
    else:
        (write,) = writes
        assert head_of(write)[1] == expected


@pytest.mark.skipif(not AFFECTED, reason="3.12+: aiohttp's own timing")
@pytest.mark.parametrize("declared", ["by aiohttp", "by the caller"])
async def test_an_empty_declared_body_sends_its_head_from_write_headers(
    declared: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Content-Length: 0 on an idle loop: nothing can join the head, so it is
    written where aiohttp's own write_headers writes it, before the body's
    write_bytes is even called; the empty body then ends without aiohttp's
    body write (whose last step is the writer's write_eof)."""
    after_head: List[List[bytes]] = []
    before_body: List[List[bytes]] = []
    write_headers = http_writer.StreamWriter.write_headers
    write_bytes = client_reqrep.ClientRequest.write_bytes
    write_eof = http_writer.StreamWriter.write_eof
    eofs: List[Any] = []

    def watched_headers(self: Any, *args: Any) -> Any:
        result = write_headers(self, *args)
        after_head.append(send_watch.wire.client())
        return result

    def watched(self: Any, *args: Any) -> Any:
        before_body.append(send_watch.wire.client())
        return write_bytes(self, *args)

    def counted_eof(self: Any, *args: Any) -> Any:
        eofs.append(self)
        return write_eof(self, *args)

    monkeypatch.setattr(http_writer.StreamWriter, "write_headers", watched_headers)
    monkeypatch.setattr(client_reqrep.ClientRequest, "write_bytes", watched)
    monkeypatch.setattr(http_writer.StreamWriter, "write_eof", counted_eof)
    headers = {"Content-Length": "0"} if declared == "by the caller" else None
    await post(raw_server, b"", headers=headers)
    assert one_request(raw_server) == b""
    ((write,),) = after_head
    head, rest = head_of(write)
    assert b"\r\nContent-Length: 0\r\n" in head and rest == b""
    assert send_watch.at_return == after_head
    # The write task starts with the head already out.
    assert before_body == after_head
    assert eofs == []


@pytest.mark.skipif(not LAZY_TASK, reason="the body write starts inside send()")
async def test_bug_reproduces_unfixed_the_body_waits_for_the_task(
    unfixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch
) -> None:
    await post(raw_server, b"x" * KiB)
    (at_return,) = send_watch.at_return
    assert [head_of(w)[1] for w in at_return] == [b""]  # the head only


@pytest.mark.skipif(not LAZY_TASK, reason="the body write starts inside send()")
@pytest.mark.parametrize("loop", ["busy", "hiding its ready callbacks"])
@pytest.mark.parametrize("kind", ["bytes", "BytesIO", "empty bytes"])
async def test_under_load_the_body_goes_with_the_task(
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    kind: str,
    loop: str,
) -> None:
    """Other callbacks ready (or a loop that cannot tell): the request waits
    for the write task, as aiohttp's body does."""
    if loop == "busy":
        if not hasattr(asyncio.get_running_loop(), "_ready"):
            pytest.skip("this event loop does not show its ready callbacks")
        send_watch.busy = True
    else:
        send_watch.hide_ready = True
    data = IN_MEMORY[kind]()
    expected = content(data)
    await post(raw_server, data)
    assert one_request(raw_server) == expected
    assert send_watch.at_return == [[]]  # nothing yet, not even the head
    (write,) = send_watch.wire.client()
    assert head_of(write)[1] == expected


@pytest.mark.skipif(not LAZY_TASK or TASKLESS, reason="the body is taken inside send()")
@pytest.mark.parametrize("kind", ["bytearray", "BytesIO"])
async def test_a_body_resized_before_the_task_runs_takes_aiohttps_path(
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    kind: str,
) -> None:
    """Under load the body is read when the task runs: one that another task
    grew meanwhile is not sent whole but goes through the Content-Length
    fixes (the declared bytes are sent, the excess is reported)."""
    if not hasattr(asyncio.get_running_loop(), "_ready"):
        pytest.skip("this event loop does not show its ready callbacks")
    send_watch.busy = True
    data: Any = bytearray(b"r" * KiB) if kind == "bytearray" else io.BytesIO(b"r" * KiB)

    def grow() -> None:
        if isinstance(data, io.BytesIO):
            position = data.tell()
            data.seek(0, io.SEEK_END)
            data.write(b"+" * 10)
            data.seek(position)
        else:
            data.extend(b"+" * 10)

    send_watch.after = grow
    with captured_log() as log:
        await post(raw_server, data)
    assert one_request(raw_server) == b"r" * KiB
    (record,) = log.records
    assert "longer than its Content-Length" in record.getMessage()


@pytest.mark.skipif(not LAZY_TASK, reason="the body write starts inside send()")
async def test_a_body_not_sent_whole_waits_for_the_task(
    fixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch
) -> None:
    """Only a plain in-memory body of its declared length goes at once; a
    chunked one (like a compressed one, or one with Expect) is written by the
    task, its head with its first chunk."""
    await post(raw_server, b"x" * KiB, chunked=True)
    assert one_request(raw_server) == b"x" * KiB
    assert send_watch.at_return == [[]]
    first, *_ = send_watch.wire.client()
    assert head_of(first)[1].startswith(b"400\r\nxxx")


# --------------------------------------------------------------------------
# 3.11: a small whole request is written without a write task.


@dataclass
class BodyWrites:
    """The calls of ClientRequest.write_bytes (each one is a write task)."""

    calls: int = 0


@pytest.fixture
def body_writes(monkeypatch: pytest.MonkeyPatch) -> BodyWrites:
    writes = BodyWrites()
    write_bytes = client_reqrep.ClientRequest.write_bytes

    def counted(self: Any, *args: Any) -> Any:
        writes.calls += 1
        return write_bytes(self, *args)

    monkeypatch.setattr(client_reqrep.ClientRequest, "write_bytes", counted)
    return writes


TASKLESS_BODIES: Dict[str, Callable[[], Any]] = {
    kind: IN_MEMORY[kind]
    for kind in ("empty bytes", "bytes", "str", "bytearray", "BytesIO")
}
TASKLESS_BODIES["16 KiB BytesIO"] = lambda: io.BytesIO(b"w" * (16 * KiB))


def recording_request_class(requests: List[Any]) -> Any:
    """A ``request_class`` that appends each request it makes to ``requests``."""

    class Request(client_reqrep.ClientRequest):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            requests.append(self)

    return Request


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
@pytest.mark.parametrize("loop", ["busy", "hiding its ready callbacks", "idle"])
@pytest.mark.parametrize("kind", list(TASKLESS_BODIES))
async def test_under_load_a_small_whole_request_needs_no_write_task(
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    body_writes: BodyWrites,
    kind: str,
    loop: str,
) -> None:
    """With other callbacks ready the request goes out in one write in the
    next loop iteration, as the write task's would, and no write task is made
    for it. On an idle loop it goes out in one write from send(), and the
    (then empty) write task stays: the loop would otherwise block for the
    answer right after the write, and on the benchmark machine sequential
    requests were 10-15% slower that way. A loop that does not show its ready
    callbacks (uvloop) keeps the task, which writes the request. The body is
    back on the request afterwards."""
    if loop == "busy":
        send_watch.busy = True
    elif loop != "idle":
        send_watch.hide_ready = True
    data = TASKLESS_BODIES[kind]()
    expected = content(data)
    requests: List[Any] = []
    Request = recording_request_class(requests)
    async with aiohttp.ClientSession(timeout=SAFETY, request_class=Request) as s:
        async with s.post(raw_server.url("/upload"), data=data) as resp:
            assert resp.status == 200
            await resp.read()
    assert one_request(raw_server) == expected
    assert body_writes.calls == (0 if loop == "busy" else 1)
    (write,) = send_watch.wire.client()
    assert head_of(write)[1] == expected
    (at_return,) = send_watch.at_return
    if loop == "idle":
        assert at_return == [write]
    elif expected:
        assert at_return == []  # (an empty body's head goes at once)
    (request,) = requests
    assert type(request.body).__name__.endswith("Payload")
    if isinstance(data, io.BytesIO):
        assert data.tell() == len(expected)


@pytest.mark.skipif(
    not (AFFECTED and _send_starts_write_eagerly()),
    reason="send() starts its write task lazily here",
)
def test_an_eager_write_task_keeps_aiohttps_send(fixed: FixState) -> None:
    """Python 3.12+: the write task runs inside send() and costs no loop
    callbacks, so send() is left as it is (the write stays inside it)."""
    assert not coalesced_headers.taskless_send()
    assert getattr(client_reqrep.ClientRequest.send, MARKER, None) != FIX_ID


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
@pytest.mark.parametrize("left", ["a request", "a written mark"])
@pytest.mark.parametrize("then", ["GET", "a 20 KiB POST"])
async def test_a_request_left_on_the_connection_is_not_taken_for_the_next(
    fixed: FixState, raw_server: RawHTTPServer, then: str, left: str
) -> None:
    """send() leaves a small request on its connection's protocol for
    write_headers. One left there by a request that failed before its head
    (aiohttp closes that connection, so this is a guard) must not be written
    for the next request on the connection, here one that send() leaves
    nothing for: each request is known by its headers object."""
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(raw_server.url("/upload"), data=b"first") as resp:
            await resp.read()
        # The pooled connection (3.11's pool: key -> [(protocol, time)]).
        pool = session.connector._conns  # type: ignore[union-attr]
        protocol: Any
        ((protocol, _),) = [entry for entries in pool.values() for entry in entries]
        stale: Tuple[Any, ...] = (b"stale!", None, 6, URL("http://x/"), CIMultiDict())
        protocol._payloadfix_whole = (
            (*stale, False) if left == "a request" else coalesced_headers._SENT
        )
        if then == "GET":
            request = session.get(raw_server.url("/"))
        else:
            request = session.post(raw_server.url("/upload"), data=b"b" * (20 * KiB))
        async with request as resp:
            assert resp.status == 200
            await resp.read()
    raw_server.assert_clean()
    expected = b"" if then == "GET" else b"b" * (20 * KiB)
    assert [r.body for r in raw_server.requests] == [b"first", expected]
    assert protocol._payloadfix_whole is None


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
@pytest.mark.parametrize("kind", ["empty bytes", "bytes", "BytesIO"])
async def test_on_an_idle_loop_write_headers_writes_the_whole_request(
    fixed: FixState,
    raw_server: RawHTTPServer,
    wire: Wire,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Sequential small requests: write_headers writes head and body at once
    (the writer never holds the head), and nothing is left on the protocol."""
    taken: List[int] = []
    write_headers = http_writer.StreamWriter.write_headers

    def spy(writer: Any, status_line: str, headers: Any) -> Any:
        protocol = writer._protocol
        before = len(wire.client())
        done = write_headers(writer, status_line, headers)
        # Written whole, now: the write task finds the mark.
        taken.append(len(wire.client()) - before)
        assert type(writer) is http_writer.StreamWriter
        assert protocol._payloadfix_whole is coalesced_headers._SENT
        return done

    monkeypatch.setattr(http_writer.StreamWriter, "write_headers", spy)
    data = IN_MEMORY[kind]()
    await post(raw_server, data)
    assert one_request(raw_server) == content(data)
    assert taken == [1]
    (write,) = wire.client()
    assert head_of(write)[1] == content(data)


class _ClosingRequest(client_reqrep.ClientRequest):
    """A request class that keeps no connection alive (it writes its body
    aiohttp's way, so the fix's send() still takes it)."""

    def keep_alive(self) -> bool:
        return False


#: Request shapes: (written whole by send() itself on an idle loop, session
#: arguments, request arguments). send() writes a request before aiohttp's
#: send() runs only where that send() leaves the head as built (no header
#: added or replaced, the target the URL's path and query); the others are
#: written from write_headers. Every one goes out as the unpatched client
#: sends it.
SHAPES: Dict[str, Tuple[bool, Callable[[], Dict[str, Any]], Dict[str, Any]]] = {
    "POST": (True, dict, {}),
    "PUT with a query": (True, dict, {"method": "PUT", "params": {"q": "a b/ä"}}),
    "GET with a body": (True, dict, {"method": "GET"}),
    "the caller's Content-Type": (
        True,
        dict,
        {"headers": {"content-type": "text/plain", "X-Other": "1"}},
    ),
    "the caller's Content-Length": (True, dict, {"headers": {"Content-Length": ""}}),
    "the caller's Connection": (False, dict, {"headers": {"connection": "keep-alive"}}),
    "no automatic Content-Type": (False, dict, {"skip_auto_headers": ["Content-Type"]}),
    "HTTP/1.0": (False, lambda: {"version": aiohttp.HttpVersion10}, {}),
    "a closing connector": (
        False,
        lambda: {"connector": aiohttp.TCPConnector(force_close=True)},
        {},
    ),
    # 3.11.0-3.11.6 ask keep_alive() whether to add "Connection: close".
    "a request class of its own": (
        False,
        lambda: {"request_class": _ClosingRequest},
        {},
    ),
}


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
@pytest.mark.parametrize("kind", ["empty bytes", "bytes", "BytesIO"])
@pytest.mark.parametrize("shape", list(SHAPES))
async def test_on_an_idle_loop_send_writes_a_request_aiohttp_leaves_as_built(
    fixed: FixState,
    web_server: WebServer,
    connections: ConnectionCounter,
    wire: Wire,
    monkeypatch: pytest.MonkeyPatch,
    shape: str,
    kind: str,
) -> None:
    """Sequential small requests: send() writes head and body in one write as
    soon as it is called, before aiohttp's send() builds the writer, where
    that send() would send the head as it stands; the bytes on the wire are
    the unpatched client's, and the connection is reused as unpatched."""
    early, session_args, request_args = SHAPES[shape]
    request_args = dict(request_args)
    method = request_args.pop("method", "POST")
    url = web_server.url / "upload"

    async def requests() -> None:
        async with connections.session(timeout=SAFETY, **session_args()) as session:
            for _ in range(2):
                data = IN_MEMORY[kind]()
                args = dict(request_args)
                if "Content-Length" in args.get("headers", {}):
                    args["headers"] = {"Content-Length": str(len(content(data)))}
                async with session.request(method, url, data=data, **args) as resp:
                    assert resp.status == 200
                    await resp.read()

    with switched(FIX_ID, applied=False):
        await requests()
    unpatched = (wire.client(), connections.created)
    del wire.writes[:]
    connections.created = 0
    at_call: List[List[bytes]] = []
    send = client_reqrep.ClientRequest.send

    def watched(self: Any, conn: Any) -> Any:
        before = len(wire.writes)
        coro = send(self, conn)
        at_call.append(wire.writes[before:])
        return coro

    monkeypatch.setattr(client_reqrep.ClientRequest, "send", watched)
    await requests()
    patched = wire.client()
    body = content(IN_MEMORY[kind]())
    assert [r[2] for r in web_server.received] == [body] * 4
    # The same bytes, each request in one write; as many connections.
    assert b"".join(patched) == b"".join(unpatched[0])
    assert len(patched) == 2
    assert connections.created == unpatched[1]
    # The second request, on the pooled connection, finds an idle loop. (The
    # first may find the loop busy with the new connection's callbacks: it
    # then goes in the next loop iteration, without a write task.)
    assert at_call[1] == ([patched[1]] if early else [])
    assert at_call[0] in ([], [patched[0]] if early else [])


@pytest.mark.skipif(not AFFECTED, reason="3.12+: aiohttp's own writes")
@pytest.mark.parametrize("kind", ["bytes", "BytesIO"])
@pytest.mark.parametrize("size", [KiB, 16 * KiB, 64 * KiB, 1024 * KiB])
async def test_over_tls_a_large_body_goes_beside_its_head(
    fixed: FixState, monkeypatch: pytest.MonkeyPatch, size: int, kind: str
) -> None:
    """Under load, over asyncio's TLS transport, a whole body above 16 KiB is
    handed over with its head in one ``writelines`` (encrypted one after the
    other, sent in one socket write), not copied into one buffer with it; a
    smaller one is joined to the head. On an idle loop (sequential requests)
    a body above 16 KiB follows its head in a second write. (Below Python
    3.11 the TLS transport joins what ``writelines`` gets: a body under load
    is then written as before.)"""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    client_ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ssl)
    received: List[bytes] = []

    async def record(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(body=b"")

    app = web.Application(client_max_size=2 * size)
    app.router.add_post("/upload", record)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = URL.build(scheme="https", host="127.0.0.1", port=sock.getsockname()[1])
    calls: List[Tuple[str, List[int]]] = []
    transport_class: Any = asyncio.sslproto._SSLProtocolTransport
    write = transport_class.write
    writelines = transport_class.writelines

    def client(transport: Any) -> bool:
        return isinstance(transport.get_protocol(), client_proto.ResponseHandler)

    def recording_write(self: Any, data: Any) -> None:
        if client(self):
            calls.append(("write", [len(data)]))
        write(self, data)

    def recording_writelines(self: Any, parts: Any) -> None:
        parts = list(parts)
        if client(self):
            calls.append(("writelines", [len(p) for p in parts]))
        writelines(self, parts)

    monkeypatch.setattr(transport_class, "write", recording_write)
    monkeypatch.setattr(transport_class, "writelines", recording_writelines)
    body = b"t" * size
    busy = [False]
    send = client_reqrep.ClientRequest.send

    async def loaded_send(self: Any, *args: Any) -> Any:
        if busy[0]:  # another callback ready: a loop under load
            asyncio.get_running_loop().call_soon(lambda: None)
        return await send(self, *args)

    monkeypatch.setattr(client_reqrep.ClientRequest, "send", loaded_send)

    def data() -> Any:
        return io.BytesIO(body) if kind == "BytesIO" else body

    try:
        await web.SockSite(runner, sock, ssl_context=server_ssl).start()
        connector = aiohttp.TCPConnector(ssl=client_ssl)
        async with aiohttp.ClientSession(connector=connector, timeout=SAFETY) as s:

            async def one() -> None:
                async with s.post(url / "upload", data=data()) as resp:
                    assert resp.status == 200
                    await resp.read()

            for _ in range(2):
                await one()
            busy[0] = True
            await asyncio.gather(*(one() for _ in range(4)))
    finally:
        await runner.cleanup()
        sock.close()
    assert received == [body] * 6
    whole = size > 16 * KiB and (kind == "bytes" or size <= 64 * KiB)
    if whole and coalesced_headers._TLS_TRANSPORT is not None:
        # Per request: "beside" (one writelines, the head beside the body)
        # or "apart" (a write of the head, then one of the body).
        ways = []
        while calls:
            call, *calls = calls
            if call[0] == "writelines":
                assert call[1][0] < KiB and call[1][1:] == [size]
                ways.append("beside")
            else:
                assert call[1][0] < KiB and calls[0] == ("write", [size])
                calls = calls[1:]
                ways.append("apart")
        # The first request may find the loop busy with the new connection's
        # callbacks; the second, on the pooled connection, finds it idle.
        assert ways[0] in ("beside", "apart")
        assert ways[1:] == ["apart"] + ["beside"] * 4
    elif coalesced_headers._TLS_TRANSPORT is None:
        assert "writelines" not in {c[0] for c in calls}
    elif size <= 16 * KiB:
        assert [c[0] for c in calls] == ["write"] * 6
        assert {c[1][0] > size for c in calls} == {True}  # joined
    else:  # a 1 MiB BytesIO: read in parts, aiohttp's way
        assert received == [body] * 6


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
async def test_a_request_aiohttp_cannot_send_is_not_written_early(
    fixed: FixState, raw_server: RawHTTPServer, wire: Wire
) -> None:
    """A session version that only looks like HTTP/1.1 (a plain tuple)
    fails inside aiohttp's send() before anything is written: it must not
    reach the server first."""
    with pytest.raises(AttributeError):
        async with aiohttp.ClientSession(
            timeout=SAFETY,
            version=(1, 1),  # type: ignore[arg-type]
        ) as session:
            for _ in range(2):  # (the second on an idle loop)
                async with session.post(raw_server.url("/"), data=b"a") as resp:
                    await resp.read()
    assert wire.client() == []
    await raw_server.settle()
    assert raw_server.requests == []


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
async def test_a_bytes_io_subclass_is_not_written_whole(
    fixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch
) -> None:
    """A BytesIO subclass may read or size itself otherwise than BytesIO:
    it goes through the payload's write, after send() returns."""

    class Chunky(io.BytesIO):
        def read(self, size: Optional[int] = -1) -> bytes:
            return super().read(size if size is None or size < 0 else min(size, 100))

    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        for _ in range(2):
            data = Chunky(b"c" * KiB)
            async with session.post(raw_server.url("/upload"), data=data) as resp:
                assert resp.status == 200
                await resp.read()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [b"c" * KiB] * 2
    # When each send() returned, no write of its own request had gone out.
    first, second = send_watch.at_return
    assert first == []
    assert b"".join(second) == b"".join(send_watch.wire.client()[: len(second)])
    assert b"".join(second).count(b"POST /upload") == 1


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
async def test_a_head_changed_after_send_wrote_it_fails_the_request(
    fixed: FixState,
    raw_server: RawHTTPServer,
    wire: Wire,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guard: send() writes a request early only where aiohttp's send()
    leaves its head as built. Should the head change after all, the request
    on the wire is not the one aiohttp meant: the request fails, and its
    connection is not reused."""
    send = client_reqrep.ClientRequest.send

    def changed_later(self: Any, conn: Any) -> Any:
        coro = send(self, conn)
        self.headers["X-Late"] = "1"
        return coro

    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        with monkeypatch.context() as m:
            m.setattr(client_reqrep.ClientRequest, "send", changed_later)
            with pytest.raises(
                aiohttp.ClientOSError, match="aiohttp_payloadfix wrote a request"
            ):
                async with session.post(raw_server.url("/upload"), data=b"a") as resp:
                    await resp.read()
        async with session.post(raw_server.url("/upload"), data=b"b") as resp:
            assert resp.status == 200
            await resp.read()
    await raw_server.settle()
    raw_server.assert_clean()
    assert [[r.body for r in c.requests] for c in raw_server.connections] == [
        [b"a"],
        [b"b"],
    ]
    assert raw_server.requests[0].header("X-Late") is None


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
async def test_a_request_written_whole_on_an_idle_loop_starts_its_read_timeout(
    fixed: FixState,
) -> None:
    """A request written whole on an idle loop still has a read timeout: a
    server that never answers is a ``sock_read`` timeout, not a wait for the
    total timeout. (The write task that finds the request written restarts
    it after the write, as aiohttp's body write does; aiohttp also starts it
    when the connection is taken, so this does not tell the two apart.)"""
    received = asyncio.Event()
    stop = asyncio.Event()
    handlers: List[asyncio.Task[None]] = []

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set()
        await stop.wait()  # never answers
        writer.close()

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.ensure_future(silent(reader, writer))
        handlers.append(task)
        await task

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        timeout = aiohttp.ClientTimeout(total=20, sock_read=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(aiohttp.ServerTimeoutError):
                await asyncio.wait_for(
                    session.post(f"http://127.0.0.1:{port}/", data=b"x" * KiB), 10
                )
        assert received.is_set()
    finally:
        stop.set()
        await asyncio.gather(*handlers, return_exceptions=True)
        server.close()
        await server.wait_closed()


@pytest.mark.skipif(not TASKLESS, reason="send() leaves no request on the connection")
async def test_a_write_bytes_put_on_top_gets_the_held_head(
    fixed: FixState,
    raw_server: RawHTTPServer,
    wire: Wire,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an idle loop write_headers writes a small request whole only while
    this fix's write_bytes is the one send() calls (it finds the request
    written). A write_bytes another library put on top, which writes the
    body itself, must not send it a second time: it gets the held head."""

    async def own_write_bytes(self: Any, writer: Any, conn: Any, *args: Any) -> None:
        await writer.write(self.body._value)
        await writer.write_eof()
        conn.protocol.start_timeout()

    monkeypatch.setattr(client_reqrep.ClientRequest, "write_bytes", own_write_bytes)
    await post(raw_server, b"x" * KiB)
    assert one_request(raw_server) == b"x" * KiB
    # Nothing else went out: the head, joined to the body's one write.
    (write,) = wire.client()
    assert head_of(write)[1] == b"x" * KiB


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
async def test_bug_reproduces_unfixed_every_request_makes_a_write_task(
    unfixed: FixState, raw_server: RawHTTPServer, body_writes: BodyWrites
) -> None:
    await post(raw_server, b"x" * KiB)
    assert body_writes.calls == 1


def _chunk_traced() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def on_chunk(*_: Any) -> None:
        pass

    trace.on_request_chunk_sent.append(on_chunk)
    return trace


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
@pytest.mark.parametrize(
    "case",
    [
        "above 16 KiB",
        "chunked",
        "compressed",
        "expect 100-continue",
        "a chunk signal receiver",
        "longer than declared",
        "a memoryview",
    ],
)
async def test_other_requests_keep_the_write_task(
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    body_writes: BodyWrites,
    case: str,
) -> None:
    send_watch.busy = True
    data: Any = b"k" * KiB
    kwargs: Dict[str, Any] = {}
    traces: List[aiohttp.TraceConfig] = []
    expected = data
    if case == "above 16 KiB":
        data = expected = b"k" * (16 * KiB + 1)
    elif case == "chunked":
        kwargs["chunked"] = True
    elif case == "compressed":
        kwargs["compress"] = "deflate"
    elif case == "expect 100-continue":
        kwargs["expect100"] = True
    elif case == "a chunk signal receiver":
        traces.append(_chunk_traced())
    elif case == "longer than declared":
        kwargs["headers"] = {"Content-Length": "10"}
        expected = data[:10]
    else:
        data = memoryview(data)
    async with aiohttp.ClientSession(timeout=SAFETY, trace_configs=traces) as s:
        with captured_log():
            async with s.post(raw_server.url("/upload"), data=data, **kwargs) as r:
                assert r.status == 200
                await r.read()
    body = one_request(raw_server)
    if case == "compressed":
        body = zlib.decompress(body)
    assert body == expected
    assert body_writes.calls == 1


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
@pytest.mark.parametrize("override", ["write_bytes", "body"])
async def test_a_request_class_writing_its_own_body_keeps_its_write_bytes(
    fixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch, override: str
) -> None:
    """A ``request_class`` whose ``write_bytes`` (or ``body``) is its own:
    send() must not skip it."""
    send_watch.busy = True
    calls: List[str] = []

    class Request(client_reqrep.ClientRequest):
        pass

    if override == "write_bytes":

        async def write_bytes(self: Any, *args: Any) -> None:
            calls.append("write_bytes")
            await client_reqrep.ClientRequest.write_bytes(self, *args)

        Request.write_bytes = write_bytes  # type: ignore[method-assign,assignment]
    else:

        def get(self: Any) -> Any:
            calls.append("body")
            return vars(self).get("_my_body", b"")

        def put(self: Any, value: Any) -> None:
            vars(self)["_my_body"] = value

        Request.body = property(get, put)

    async with aiohttp.ClientSession(timeout=SAFETY, request_class=Request) as s:
        async with s.post(raw_server.url("/upload"), data=b"o" * KiB) as resp:
            assert resp.status == 200
            await resp.read()
    assert one_request(raw_server) == b"o" * KiB
    assert override in calls


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
async def test_a_small_body_is_taken_inside_send(
    fixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch
) -> None:
    """Under load the write waits for the next loop iteration, but the body
    was taken inside send(): a bytearray grown after send() returned is sent
    as it was, with the length its head declares (nothing over-long)."""
    send_watch.busy = True
    data = bytearray(b"r" * KiB)
    send_watch.after = lambda: data.extend(b"+" * 10)
    with captured_log() as log:
        await post(raw_server, data)
    assert one_request(raw_server) == b"r" * KiB
    assert log.records == []


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
async def test_a_connection_lost_before_the_deferred_write_fails_the_request(
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    connections: ConnectionCounter,
) -> None:
    """The connection is aborted after send() returned, before the loop's
    next iteration writes the request: the request fails with aiohttp's own
    error for an unwritable body, nothing reaches the server, and the next
    request gets a new connection."""
    send_watch.busy = True
    transports: List[Any] = []
    send = client_reqrep.ClientRequest.send

    async def capturing(self: Any, conn: Any) -> Any:
        transports.append(conn.transport)
        return await send(self, conn)

    def abort() -> None:
        if len(transports) == 1:
            transports[0].abort()

    send_watch.after = abort
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client_reqrep.ClientRequest, "send", capturing)
        async with connections.session(timeout=SAFETY) as session:
            with pytest.raises(aiohttp.ClientOSError, match="Can not write request"):
                async with session.post(raw_server.url("/lost"), data=b"l" * KiB):
                    pass  # pragma: no cover
            send_watch.busy = False
            async with session.post(raw_server.url("/next"), data=b"next") as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [(r.target, r.body) for r in raw_server.requests] == [("/next", b"next")]
    assert connections.created == 2


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
async def test_a_failed_send_leaves_the_body_on_the_request(
    fixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch
) -> None:
    """A header aiohttp refuses to serialise fails send() before the head:
    the request still has its body, and nothing reached the server."""
    send_watch.busy = True
    requests: List[Any] = []
    Request = recording_request_class(requests)
    async with aiohttp.ClientSession(timeout=SAFETY, request_class=Request) as s:
        with pytest.raises(ValueError):
            await s.post(
                raw_server.url("/upload"),
                data=b"f" * KiB,
                headers={"X-Bad": "one\r\ntwo"},
            )
    (request,) = requests
    assert request.body._value == b"f" * KiB
    await raw_server.settle()
    assert raw_server.requests == []


@pytest.mark.skipif(not TASKLESS, reason="send() has no branch without a task")
async def test_a_replaced_head_writer_fails_the_request_instead_of_the_body(
    fixed: FixState,
    raw_server: RawHTTPServer,
    send_watch: SendWatch,
    monkeypatch: pytest.MonkeyPatch,
    connections: ConnectionCounter,
) -> None:
    """Something put aiohttp's own write_headers back over the fix's after it
    was applied: the writer never holds the head, so nothing ends the request
    with its body. It fails with a clear error instead of sending a head
    without its body, and its connection is not reused."""
    send_watch.busy = True
    original = inspect.unwrap(http_writer.StreamWriter.write_headers)
    async with connections.session(timeout=SAFETY) as session:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(http_writer.StreamWriter, "write_headers", original)
            with pytest.raises(aiohttp.ClientOSError, match="request writer replaced"):
                async with session.post(raw_server.url("/upload"), data=b"h" * KiB):
                    pass  # pragma: no cover
        async with session.post(raw_server.url("/next"), data=b"next") as resp:
            assert resp.status == 200
    await raw_server.settle()
    assert [r.body for r in raw_server.requests if r.complete] == [b"next"]
    assert connections.created == 2


@pytest.mark.skipif(not AFFECTED, reason="3.12+: aiohttp's own timing")
async def test_a_session_tracing_other_signals_still_sends_at_once(
    fixed: FixState, raw_server: RawHTTPServer, send_watch: SendWatch
) -> None:
    """Trace configs make aiohttp set the writer's signal callbacks; with no
    receiver for the head or chunk signals nothing waits on them."""
    started: List[str] = []
    trace = aiohttp.TraceConfig()

    async def on_start(*args: Any) -> None:
        started.append(args[2].method)

    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(timeout=SAFETY, trace_configs=[trace]) as s:
        async with s.post(raw_server.url("/upload"), data=b"t" * KiB) as resp:
            await resp.read()
    assert started == ["POST"]
    (at_return,) = send_watch.at_return
    (write,) = at_return
    assert head_of(write)[1] == b"t" * KiB


@pytest.mark.skipif(not AFFECTED, reason="3.12+: aiohttp's own timing")
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_a_large_body_under_backpressure_starts_the_read_timeout_after_it(
    fixed: FixState,
) -> None:
    """8 MiB against a server that reads only after 0.6 s, with a 0.3 s read
    timeout: the timeout starts once the transport has taken the body (as
    aiohttp's write_eof does), not when the body was handed over."""
    body = b"b" * (8 * 1024 * KiB)
    received = asyncio.Event()
    done = asyncio.Event()

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.6)
        assert b"content-length: %d" % len(body) in head.lower()
        await reader.readexactly(len(body))
        received.set()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        timeout = aiohttp.ClientTimeout(total=30, sock_read=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(f"http://127.0.0.1:{port}/", data=body) as resp:
                assert resp.status == 200
        assert received.is_set()
        await asyncio.wait_for(done.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------
# Tracing signals: the same calls, with the same content, in the same order.


async def traced_post(
    server: RawHTTPServer, data: Any, signals: Sequence[str] = ("headers", "chunk")
) -> List[Tuple[str, Any]]:
    events: List[Tuple[str, Any]] = []
    trace = aiohttp.TraceConfig()

    # (session, trace context, params), spelled with *args as in conftest.
    async def on_headers(*args: Any) -> None:
        events.append(("headers", dict(args[2].headers)))

    async def on_chunk(*args: Any) -> None:
        events.append(("chunk", bytes(args[2].chunk)))

    if "headers" in signals:
        trace.on_request_headers_sent.append(on_headers)
    if "chunk" in signals:
        trace.on_request_chunk_sent.append(on_chunk)
    async with aiohttp.ClientSession(timeout=SAFETY, trace_configs=[trace]) as s:
        async with s.post(server.url("/upload"), data=data) as resp:
            await resp.read()
    return events


async def test_trace_signals_unchanged(raw_server: RawHTTPServer) -> None:
    def body() -> Any:
        async def gen() -> AsyncIterator[bytes]:
            yield b"one"
            yield b"two"

        return gen()

    with switched(FIX_ID, applied=False):
        before = await traced_post(raw_server, body())
    with switched(FIX_ID, applied=True):
        after = await traced_post(raw_server, body())
    assert before == after
    kinds = [kind for kind, _ in after]
    assert kinds == ["headers", "chunk", "chunk"]
    assert [c for k, c in after if k == "chunk"] == [b"one", b"two"]


@pytest.mark.parametrize("signals", [("headers",), ("chunk",), ("headers", "chunk")])
@pytest.mark.parametrize("kind", ["bytes", "BytesIO"])
async def test_trace_signals_unchanged_for_a_whole_body(
    raw_server: RawHTTPServer, wire: Wire, signals: Tuple[str, ...], kind: str
) -> None:
    """A receiver for either signal alone still gets what aiohttp sends it
    for a body the fix writes whole (one check in write_headers covers both
    signals when neither has a receiver), and the head still goes with the
    body."""

    def body() -> Any:
        return b"whole" if kind == "bytes" else io.BytesIO(b"whole")

    with switched(FIX_ID, applied=False):
        before = await traced_post(raw_server, body(), signals)
    sent = len(wire.client())
    with switched(FIX_ID, applied=True):
        after = await traced_post(raw_server, body(), signals)
    assert after == before
    assert [k for k, _ in after] == [s for s in ("headers", "chunk") if s in signals]
    assert raw_server.requests[-1].body == b"whole"
    if AFFECTED:
        (write,) = wire.client()[sent:]
        assert head_of(write)[1] == b"whole"


async def test_one_check_answers_for_both_callbacks_of_one_request() -> None:
    """The shared check is only for aiohttp's own pair of callbacks: a
    callback of another kind, or of another request, is asked about on its
    own (and so fires)."""
    loop = asyncio.get_running_loop()
    quiet = client_reqrep.ClientRequest("POST", URL("http://quiet.invalid/"), loop=loop)
    other = client_reqrep.ClientRequest("POST", URL("http://other.invalid/"), loop=loop)

    def callbacks(request: Any) -> Tuple[Any, Any]:
        return (
            functools.partial(request._on_headers_request_sent, "POST", request.url),
            functools.partial(request._on_chunk_request_sent, "POST", request.url),
        )

    async def custom(chunk: bytes) -> None:
        pass

    headers_sent, chunk_sent = callbacks(quiet)
    check = coalesced_headers._callbacks_quiet
    assert check(headers_sent, chunk_sent)
    assert check(headers_sent, None)
    assert check(None, chunk_sent)
    assert not check(headers_sent, custom)
    assert not check(custom, chunk_sent)
    assert not check(headers_sent, callbacks(other)[1])


# --------------------------------------------------------------------------
# A body that never produces its first chunk.


async def test_cancelled_before_the_first_chunk(
    fixed: FixState,
    raw_server: RawHTTPServer,
    wire: Wire,
    connections: ConnectionCounter,
) -> None:
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        started.set()
        await asyncio.Event().wait()
        yield b"never"  # pragma: no cover

    async with connections.session(timeout=SAFETY) as session:
        task = asyncio.ensure_future(
            session.post(raw_server.url("/upload"), data=stalled())
        )
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with session.post(raw_server.url("/next"), data=b"next") as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    # The upload's connection is not reused for the next request.
    assert connections.created == 2
    assert [(r.target, r.body) for r in raw_server.requests if r.complete] == [
        ("/next", b"next")
    ]
    if AFFECTED:
        # Nothing of the stalled request reached the wire.
        (write,) = wire.client()
        assert head_of(write)[1] == b"next"


class BodyError(Exception):
    pass


async def test_body_fails_before_the_first_chunk(
    fixed: FixState,
    raw_server: RawHTTPServer,
    wire: Wire,
    connections: ConnectionCounter,
) -> None:
    started = False

    async def broken() -> AsyncIterator[bytes]:
        if not started:
            raise BodyError("no data")
        yield b""  # pragma: no cover

    async with connections.session(timeout=SAFETY) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(raw_server.url("/upload"), data=broken()):
                pass  # pragma: no cover
        async with session.post(raw_server.url("/next"), data=b"next") as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert connections.created == 2
    assert [(r.target, r.body) for r in raw_server.requests if r.complete] == [
        ("/next", b"next")
    ]
    if AFFECTED and aiohttp_payloadfix.is_applied(FIX_ID):
        (write,) = wire.client()
        assert head_of(write)[1] == b"next"


# --------------------------------------------------------------------------
# The web server's own writers are left alone.


async def test_server_response_head_is_not_held(fixed: FixState) -> None:
    """A streamed response whose handler waits after prepare(): the client
    gets the head before any body byte (a held head would never arrive)."""
    go = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await go.wait()
        await resp.write(b"late")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession(timeout=SAFETY) as session:
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.status == 200
                go.set()
                assert await resp.read() == b"late"
    finally:
        await runner.cleanup()


class FakeTransport:
    def __init__(self) -> None:
        self.writes: List[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))


class FakeServerProtocol:
    connected = True  # read by 3.9-3.10's _write

    def __init__(self) -> None:
        self.transport = FakeTransport()


async def test_only_client_writers_hold_the_head(fixed: FixState) -> None:
    if not AFFECTED:
        pytest.skip("3.12+ buffers every head itself")
    headers: CIMultiDict[str] = CIMultiDict(Host="x")
    server_protocol = FakeServerProtocol()
    writer = http_writer.StreamWriter(
        server_protocol,  # type: ignore[arg-type]
        asyncio.get_running_loop(),
    )
    await writer.write_headers("HTTP/1.1 200 OK", headers)
    assert len(server_protocol.transport.writes) == 1
    assert type(writer) is http_writer.StreamWriter

    loop = asyncio.get_running_loop()
    client_protocol = client_proto.ResponseHandler(loop)
    transport = FakeTransport()
    client_protocol.transport = transport  # type: ignore[assignment]
    writer = http_writer.StreamWriter(client_protocol, loop)
    await writer.write_headers("POST / HTTP/1.1", headers)
    assert transport.writes == []
    await writer.write(b"body")
    (data,) = transport.writes
    assert head_of(data)[1] == b"body"
    # Once the head is out, the writer is aiohttp's own class again.
    assert type(writer) is http_writer.StreamWriter


async def test_a_failing_trace_signal_leaves_a_plain_writer(fixed: FixState) -> None:
    if not AFFECTED:
        pytest.skip("3.12+ buffers the head itself")

    async def boom(_headers: Any) -> None:
        raise BodyError("signal")

    loop = asyncio.get_running_loop()
    protocol = client_proto.ResponseHandler(loop)
    transport = FakeTransport()
    protocol.transport = transport  # type: ignore[assignment]
    writer = http_writer.StreamWriter(protocol, loop, on_headers_sent=boom)
    with pytest.raises(BodyError):
        await writer.write_headers("POST / HTTP/1.1", CIMultiDict(Host="x"))
    assert type(writer) is http_writer.StreamWriter
    await writer.write(b"body")
    assert transport.writes == [b"body"]


# --------------------------------------------------------------------------
# Probe, range, revert.


def test_probe_matches_the_range() -> None:
    fix = by_id(FIX_ID)
    assert (fix.probe() is not None) == AFFECTED
    assert fix.in_range() == AFFECTED


def test_revert_restores_the_original() -> None:
    owner = http_writer.StreamWriter
    original = LEDGER.get_original(owner, "write_headers")
    with switched(FIX_ID, applied=False):
        assert vars(owner)["write_headers"] is original
    with switched(FIX_ID, applied=True) as state:
        current = vars(owner)["write_headers"]
        if state.applied:
            assert current is not original
            assert current.__wrapped__ is original
            assert getattr(current, MARKER) == FIX_ID
        else:
            assert current is original


async def test_reply_after_early_response(
    fixed: FixState, raw_server: RawHTTPServer
) -> None:
    """An early 413 (answered after the head): the client still completes."""
    raw_server.script.append(Reply(status=413, answer_after=0, close=True))
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(raw_server.url("/upload"), data=b"x" * KiB) as resp:
            assert resp.status == 413
    raw_server.assert_clean()
