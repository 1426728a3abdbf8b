"""Shared fixtures: a strict raw HTTP/1.1 server, an aiohttp.web server, a
connection counter, fix switches and the guard that no test leaves aiohttp
patched differently from how it found it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http
import logging
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    NoReturn,
    Optional,
    Set,
    Tuple,
    Union,
)

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import client, client_reqrep, payload, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict
from yarl import URL

import aiohttp_payloadfix
from aiohttp_payloadfix import _api
from aiohttp_payloadfix._ledger import LEDGER, Patch
from aiohttp_payloadfix.fixes import FIXES, by_id

# --------------------------------------------------------------------------
# Nothing a test does to aiohttp outlives the test.


def _patched_classes() -> Tuple[type, ...]:
    """Every class a fix writes to: those known today, and any other that a
    fix in the registry names."""
    classes: List[type] = [
        payload.IOBasePayload,
        payload.TextIOPayload,
        payload.BytesIOPayload,
        payload.AsyncIterablePayload,
        client_reqrep.ClientRequest,
        client.ClientSession,
    ]
    for fix in FIXES:
        with contextlib.suppress(Exception):  # a fix this release cannot take
            classes.extend(p.owner for p in fix.patches())
    return tuple(dict.fromkeys(classes))


PATCHED_CLASSES = _patched_classes()


def _snapshot() -> Dict[type, Dict[str, Any]]:
    return {cls: dict(vars(cls)) for cls in PATCHED_CLASSES}


@pytest.fixture(autouse=True)
def _aiohttp_left_as_found() -> Iterator[None]:
    """Fail a test after which any attribute of a patched class is not the very
    object it was before (autouse fixtures are torn down last)."""
    before = _snapshot()
    yield
    after = _snapshot()
    problems: List[str] = []
    for cls in PATCHED_CLASSES:
        old, new = before[cls], after[cls]
        for name in sorted(old.keys() | new.keys()):
            if name not in new:
                problems.append(f"{cls.__qualname__}.{name} was deleted")
            elif name not in old:
                problems.append(f"{cls.__qualname__}.{name} was added")
            elif old[name] is not new[name]:
                problems.append(f"{cls.__qualname__}.{name} was replaced")
    assert not problems, "the test left aiohttp changed: " + "; ".join(problems)


class _Recorder(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _no_unreported_errors() -> Iterator[None]:
    """Fail a test that leaves an error only a log would show: asyncio's
    "Task exception was never retrieved" or "Exception in callback", or this
    package's report of a file close that failed."""
    watched = {
        logging.getLogger("asyncio"): _Recorder(logging.ERROR),
        logging.getLogger("aiohttp_payloadfix"): _Recorder(logging.WARNING),
    }
    for logger, recorder in watched.items():
        logger.addHandler(recorder)
    try:
        yield
        gc.collect()  # finalizers report tasks that were never awaited
    finally:
        for logger, recorder in watched.items():
            logger.removeHandler(recorder)
    messages = [r.getMessage() for rec in watched.values() for r in rec.records]
    assert messages == []


# --------------------------------------------------------------------------
# Bodies.

#: ASCII without CR, so that text and binary files carry the same bytes.
FILLER = b"0123456789abcdefghijklmnopqrstuvwxyz\n"


def content(size: int) -> bytes:
    """``size`` bytes of FILLER, repeated."""
    return (FILLER * (size // len(FILLER) + 1))[:size]


@pytest.fixture
def body_path(tmp_path: Path) -> Callable[[int], Tuple[Path, bytes]]:
    """Writes ``content(size)`` to a file: ``(its path, the bytes)``."""

    def make(size: int) -> Tuple[Path, bytes]:
        data = content(size)
        path = tmp_path / f"body-{size}.txt"
        path.write_bytes(data)
        return path, data

    return make


# --------------------------------------------------------------------------
# Fix switches.


@dataclass(frozen=True)
class FixState:
    """What a test got from the ``fixed`` / ``unfixed`` fixtures."""

    id: str
    #: The installed aiohttp needs the fix (the bug can be reproduced here).
    needed: bool
    #: The fix is applied for the duration of the test.
    applied: bool


def fix_needed(fix_id: str) -> bool:
    for record in aiohttp_payloadfix.status().fixes:
        if record.id == fix_id:
            return record.needed
    raise LookupError(fix_id)


Installed = List[Tuple[str, List[Tuple[type, str, Any]]]]


def _installed() -> Installed:
    """Every applied fix, in the order applied, with its replacement objects."""
    return [
        (fix_id, [(r.owner, r.name, r.replacement) for r in LEDGER._records[fix_id]])
        for fix_id in LEDGER.applied()
    ]


def _restore(installed: Installed) -> None:
    """Back to exactly ``installed``: revert everything, then put the very
    replacement objects back in their order (apply() would build new ones;
    a fix stacked on another one wraps that one's replacement)."""

    def same(obj: Any) -> Callable[[Any], Any]:
        return lambda _current: obj

    LEDGER.revert_all()
    for fix_id, replacements in installed:
        LEDGER.apply(
            fix_id, [Patch(owner, name, same(obj)) for owner, name, obj in replacements]
        )


@contextlib.contextmanager
def switched(fix_id: str, applied: bool) -> Iterator[FixState]:
    """Apply or revert ``fix_id`` inside the block, then restore exactly the
    state found (the same replacement objects, the same status bookkeeping)."""
    installed = _installed()
    reverted_before = set(_api._reverted)
    failed_before = dict(_api._failed)
    blocked_before = dict(_api._blocked)
    order = [i for i, _ in installed]
    try:
        if applied and fix_id not in order:
            aiohttp_payloadfix.apply([fix_id])
        elif not applied and fix_id in order:
            # Fixes applied later may wrap this one's replacements: take them
            # off first and put them back, rebuilt, on aiohttp's originals.
            above = order[order.index(fix_id) + 1 :]
            aiohttp_payloadfix.revert([*above, fix_id])
            aiohttp_payloadfix.apply(above)
        yield FixState(
            id=fix_id,
            needed=fix_needed(fix_id),
            applied=aiohttp_payloadfix.is_applied(fix_id),
        )
    finally:
        _restore(installed)
        _api._reverted.clear()
        _api._reverted.update(reverted_before)
        _api._failed.clear()
        _api._failed.update(failed_before)
        # Reverting a fix holds back those that require it (apply() notes why).
        _api._blocked.clear()
        _api._blocked.update(blocked_before)


@pytest.fixture
def fix_id() -> str:
    """Overridden by each tests/fixes/test_<fix>.py module."""
    pytest.fail("define a `fix_id` fixture in the test module")


@pytest.fixture
def fixed(fix_id: str) -> Iterator[FixState]:
    """The module's fix is applied if the installed aiohttp needs it (on a
    release that does not, ``applied`` is False and nothing is patched)."""
    with switched(fix_id, applied=True) as state:
        assert state.applied == state.needed
        if not state.applied and by_id(fix_id).probe() is not None:
            pytest.skip(
                f"aiohttp {aiohttp.__version__} still behaves as {fix_id} fixes, but"
                " 3.13 and newer are left untouched by design"
            )
        yield state


@pytest.fixture
def unfixed(fix_id: str) -> Iterator[FixState]:
    """The module's fix is reverted: aiohttp as released."""
    with switched(fix_id, applied=False) as state:
        assert not state.applied
        yield state


# --------------------------------------------------------------------------
# A stream writer that is not aiohttp's.


class MemoryWriter(AbstractStreamWriter):
    """A third-party writer: collects the bytes and leaves ``length`` at
    AbstractStreamWriter's class default (0), an attribute that in aiohttp
    only its own StreamWriter reads."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: Union[bytes, bytearray, memoryview]) -> None:
        self.data += chunk

    async def write_eof(self, chunk: bytes = b"") -> None:
        self.data += chunk

    async def drain(self) -> None:
        pass

    def enable_compression(
        self, encoding: str = "deflate", strategy: Optional[int] = None
    ) -> None:
        raise NotImplementedError

    def enable_chunking(self) -> None:
        raise NotImplementedError

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------
# Counting the connections a client session opens.


@dataclass
class ConnectionCounter:
    trace_config: aiohttp.TraceConfig
    created: int = 0

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(trace_configs=[self.trace_config], **kwargs)


@pytest.fixture
def connections() -> ConnectionCounter:
    counter = ConnectionCounter(aiohttp.TraceConfig())

    # (session, trace context, TraceConnectionCreateEndParams); spelled with
    # *args because aiohttp's signal annotations differ between releases.
    async def on_create_end(*_args: Any) -> None:
        counter.created += 1

    counter.trace_config.on_connection_create_end.append(on_create_end)
    return counter


def pooled(session: aiohttp.ClientSession) -> List[int]:
    """Idle pooled connections per connection key (``[1]``: one, reusable)."""
    connector = session.connector
    assert connector is not None
    return [len(conns) for conns in connector._conns.values()]


# --------------------------------------------------------------------------
# A strict raw HTTP/1.1 server that records what reached the wire.

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/\S*) HTTP/1\.1")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\r\n]*?)[ \t]*")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Test bodies embed request lines to this path: the server seeing one means
#: body bytes were parsed as a request.
SMUGGLED_PATH = "/smuggled"
_LINE_LIMIT = 2**16


@dataclass
class RawRequest:
    method: str
    target: str
    headers: List[Tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False
    #: The whole body (by Content-Length or up to the last chunk) arrived.
    complete: bool = False
    #: The status the server answered with (None: not answered).
    status: Optional[int] = None

    def header_values(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> Optional[str]:
        values = self.header_values(name)
        return values[0] if values else None


@dataclass
class RawConnection:
    requests: List[RawRequest] = field(default_factory=list)
    #: Bytes that arrived where a request line was expected and are not one.
    stray: bytes = b""


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: Tuple[Tuple[str, str], ...] = ()
    body: bytes = b""
    #: Send ``Connection: close`` and close after the request.
    close: bool = False
    #: Answer after this many body bytes (0: right after the head, e.g. an
    #: early 413), then go on reading the body. None: after the whole body.
    answer_after: Optional[int] = None
    #: Read the request (with ``answer_after``: that many body bytes), then
    #: close the connection without answering.
    drop: bool = False

    def render(self) -> bytes:
        head = [
            f"HTTP/1.1 {self.status} {http.HTTPStatus(self.status).phrase}",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        if self.close:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


class _Abort(Exception):
    """The connection cannot go on (EOF, reset, or a protocol violation)."""


class RawHTTPServer:
    """``asyncio.start_server`` on 127.0.0.1, port 0, parsing HTTP/1.1 strictly.

    Per TCP connection it records the requests (method, target, headers, exact
    body bytes) and any stray bytes. ``failures`` collects what must never
    happen: garbage where a request line belongs, a request line made of body
    bytes (``GET /smuggled``), broken framing.
    """

    def __init__(self) -> None:
        self.default = Reply()
        self.routes: Dict[str, Reply] = {}
        #: Replies for the next requests, in order, before routes and default.
        self.script: List[Reply] = []
        #: Answer this many requests per connection; the next one is read in
        #: full and the connection closed without an answer (a keep-alive
        #: connection that the server dropped while it sat in the pool).
        self.drop_after: Optional[int] = None
        self.connections: List[RawConnection] = []
        self.failures: List[str] = []
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set[asyncio.Task[None]] = set()
        self._writers: Set[asyncio.StreamWriter] = set()
        self.port = 0

    # setup ---------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, limit=_LINE_LIMIT
        )
        sockets = self._server.sockets
        assert sockets
        self.port = sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def url(self, path: str = "/") -> URL:
        return URL.build(scheme="http", host="127.0.0.1", port=self.port, path=path)

    # results -------------------------------------------------------------
    @property
    def requests(self) -> List[RawRequest]:
        return [r for conn in self.connections for r in conn.requests]

    @property
    def stray(self) -> bytes:
        return b"".join(conn.stray for conn in self.connections)

    async def settle(self) -> None:
        """Wait until every connection has ended (call after the client
        session is closed): what was on the wire has then been parsed."""
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=30)
            assert not pending, "the client left connections to the server open"

    def assert_clean(self) -> None:
        assert self.failures == []
        assert self.stray == b""

    # serving -------------------------------------------------------------
    def _fail(self, message: str) -> None:
        self.failures.append(message)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = RawConnection()
        self.connections.append(conn)
        try:
            while await self._one_request(reader, writer, conn):
                pass
        except _Abort:
            pass
        except Exception as exc:  # recorded: a test asserts on failures
            self._fail(f"server error: {exc!r}")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_line(
        self, reader: asyncio.StreamReader, conn: RawConnection, *, first: bool
    ) -> Optional[bytes]:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as exc:
            if first and not exc.partial:
                return None  # clean end between requests
            if first:
                conn.stray += exc.partial
                self._fail(f"stray bytes at the end of a connection: {exc.partial!r}")
            else:
                self._fail("connection ended inside a request head")
            raise _Abort from None
        except asyncio.LimitOverrunError:
            data = await reader.read(_LINE_LIMIT)
            if first:
                conn.stray += data
            self._fail(f"line longer than {_LINE_LIMIT} bytes: {data[:60]!r}...")
            raise _Abort from None
        except ConnectionError:
            raise _Abort from None
        return line[:-2]

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            raise _Abort from None

    async def _bad_request(self, writer: asyncio.StreamWriter, why: str) -> NoReturn:
        self._fail(why)
        await self._send(writer, Reply(status=400, close=True).render())
        raise _Abort

    async def _one_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: RawConnection,
    ) -> bool:
        line = await self._read_line(reader, conn, first=True)
        if line is None:
            return False
        match = _REQUEST_LINE.fullmatch(line)
        if match is None or match[1].decode() not in _METHODS:
            conn.stray += line + b"\r\n"
            self._fail(f"not a request line: {line[:80]!r}")
            raise _Abort
        request = RawRequest(method=match[1].decode(), target=match[2].decode())
        conn.requests.append(request)
        if request.target.startswith(SMUGGLED_PATH):
            self._fail(f"request line made of body bytes: {line!r}")

        while True:
            header = await self._read_line(reader, conn, first=False)
            assert header is not None
            if not header:
                break
            hmatch = _HEADER_LINE.fullmatch(header)
            if hmatch is None:
                await self._bad_request(writer, f"malformed header line {header!r}")
            request.headers.append(
                (hmatch[1].decode("ascii"), hmatch[2].decode("latin-1"))
            )

        lengths = request.header_values("Content-Length")
        encodings = request.header_values("Transfer-Encoding")
        length = 0
        if encodings:
            if lengths:
                await self._bad_request(writer, "both Content-Length and chunked")
            if [e.lower() for e in encodings] != ["chunked"]:
                await self._bad_request(writer, f"Transfer-Encoding {encodings!r}")
            request.chunked = True
        elif lengths:
            if len(lengths) > 1:
                await self._bad_request(writer, f"Content-Length given {lengths!r}")
            if not re.fullmatch(r"[0-9]{1,18}", lengths[0]):
                await self._bad_request(writer, f"Content-Length {lengths[0]!r}")
            length = int(lengths[0])

        index = len(conn.requests)
        if self.drop_after is not None and index > self.drop_after:
            await self._read_body(reader, request, length, None)
            return False
        if self.script:
            reply = self.script.pop(0)
        else:
            reply = self.routes.get(request.target.split("?")[0], self.default)
        if reply.drop:
            await self._read_body(reader, request, length, reply.answer_after)
            return False
        expect = request.header("Expect")
        if expect is not None and expect.lower() == "100-continue":
            await self._send(writer, b"HTTP/1.1 100 Continue\r\n\r\n")
        if reply.answer_after is None:
            await self._read_body(reader, request, length, None)
            await self._answer(writer, request, reply)
        else:
            await self._read_body(reader, request, length, reply.answer_after)
            await self._answer(writer, request, reply)
            await self._read_body(reader, request, length, None)
        return not reply.close

    async def _answer(
        self, writer: asyncio.StreamWriter, request: RawRequest, reply: Reply
    ) -> None:
        request.status = reply.status
        await self._send(writer, reply.render())

    async def _read_body(
        self,
        reader: asyncio.StreamReader,
        request: RawRequest,
        length: int,
        upto: Optional[int],
    ) -> None:
        """Read the body (or, with ``upto``, at most that many bytes of it)."""
        if request.complete:
            return
        if request.chunked:
            if upto == 0:
                return
            await self._read_chunked(reader, request)
            return
        want = length - len(request.body)
        if upto is not None:
            want = min(want, upto - len(request.body))
        try:
            request.body += await reader.readexactly(max(want, 0))
        except asyncio.IncompleteReadError as exc:
            request.body += exc.partial
            raise _Abort from None
        except ConnectionError:
            raise _Abort from None
        if len(request.body) == length:
            request.complete = True

    async def _read_chunked(
        self, reader: asyncio.StreamReader, request: RawRequest
    ) -> None:
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                match = _CHUNK_SIZE_LINE.fullmatch(line[:-2])
                if match is None:
                    self._fail(f"malformed chunk size line {line!r}")
                    raise _Abort
                size = int(match[1], 16)
                if size == 0:
                    break
                request.body += await reader.readexactly(size)
                if await reader.readexactly(2) != b"\r\n":
                    self._fail("chunk data not followed by CRLF")
                    raise _Abort
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise _Abort from None
        except ConnectionError:
            raise _Abort from None
        request.complete = True


@pytest_asyncio.fixture
async def raw_server() -> AsyncIterator[RawHTTPServer]:
    server = RawHTTPServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


# --------------------------------------------------------------------------
# aiohttp's own server, as in the upstream report.


@dataclass
class WebServer:
    url: URL
    #: (method, path, body) of every request the handler saw.
    received: List[Tuple[str, str, bytes]] = field(default_factory=list)


@pytest_asyncio.fixture
async def web_server() -> AsyncIterator[WebServer]:
    """An aiohttp.web server on 127.0.0.1 port 0 that records each request
    body and answers 200 with an empty body; ``/empty`` answers without
    reading the body (the seed report's handler)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = WebServer(URL.build(scheme="http", host="127.0.0.1", port=port))

    async def record(request: web.Request) -> web.Response:
        server.received.append((request.method, request.path, await request.read()))
        return web.Response(body=b"")

    async def empty(_request: web.Request) -> web.Response:
        return web.Response(body=b"")

    app = web.Application()
    app.router.add_post("/empty", empty)
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield server
    finally:
        await runner.cleanup()
        sock.close()
