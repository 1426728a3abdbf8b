"""file-payload-reuse: a file-like body no longer costs a TCP connection.

Scenarios from aio-libs/aiohttp#10325 (the seed report) and PR #10915, run
against aiohttp's own server and the strict raw server of conftest.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, List, Optional, Tuple, Union

import aiohttp
import pytest
from aiohttp import payload
from aiohttp.helpers import TimerNoop
from conftest import (
    PATCHED_CLASSES,
    ConnectionCounter,
    FixState,
    MemoryWriter,
    RawHTTPServer,
    RawRequest,
    Reply,
    WebServer,
    content,
    pooled,
    switched,
)
from yarl import URL

import aiohttp_payloadfix
from aiohttp_payloadfix import _filebody
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import MARKER
from aiohttp_payloadfix.fixes import by_id

FIX_ID = "file-payload-reuse"
REQUESTS = 20


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


def closes_connections(state: FixState) -> bool:
    """Whether aiohttp as released loses the connection here: the race exists
    on 3.9.0-3.11.x, and since 3.10.6 (PR #8992) a lost race closes it."""
    return state.needed and AIOHTTP_VERSION >= (3, 10, 6)


# --------------------------------------------------------------------------
# The file-like bodies aiohttp accepts.


def _bytesio(path: Path) -> IO[Any]:
    return io.BytesIO(path.read_bytes())


def _binary(path: Path) -> IO[Any]:
    return open(path, "rb")  # BufferedReader


def _unbuffered(path: Path) -> IO[Any]:
    return open(path, "rb", buffering=0)  # FileIO: the generic IOBasePayload


def _random_access(path: Path) -> IO[Any]:
    return open(path, "r+b")  # BufferedRandom


def _buffered_over_bytesio(path: Path) -> IO[Any]:
    return io.BufferedReader(io.BytesIO(path.read_bytes()))  # no size: chunked


class _ShortReads(io.BytesIO):
    """A BytesIO whose reads return at most 1000 bytes: less than asked
    before its end, as a raw stream may."""

    def read(self, size: Optional[int] = -1) -> bytes:
        return super().read(1000 if size is None or size < 0 else min(size, 1000))


def _short_reads(path: Path) -> IO[Any]:
    return _ShortReads(path.read_bytes())


def _text(path: Path) -> IO[Any]:
    return open(path, encoding="utf-8")  # TextIOWrapper: TextIOPayload


def _stringio(path: Path) -> IO[Any]:
    return io.StringIO(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class FileKind:
    name: str
    size: int
    open: Callable[[Path], IO[Any]]
    #: aiohttp closes it after the request (BytesIO and StringIO stay open).
    closed_after: bool
    #: Its body has a known length, so the server can answer before the
    #: payload's write has finished: the race of issue 10325.
    racy: bool


KINDS = (
    FileKind("BytesIO()", 0, _bytesio, closed_after=False, racy=True),
    FileKind("BytesIO(10 B)", 10, _bytesio, closed_after=False, racy=True),
    FileKind("BytesIO(100 kB)", 100_000, _bytesio, closed_after=False, racy=True),
    FileKind("BytesIO subclass, short reads", 10_000, _short_reads, False, racy=True),
    FileKind("open(rb) empty", 0, _binary, closed_after=True, racy=True),
    FileKind("open(rb)", 100_000, _binary, closed_after=True, racy=True),
    FileKind("open(r+b)", 10_000, _random_access, closed_after=True, racy=True),
    FileKind("open(rb, buffering=0)", 10_000, _unbuffered, True, racy=False),
    FileKind("BufferedReader(BytesIO)", 10_000, _buffered_over_bytesio, True, False),
    FileKind("open(r)", 10_000, _text, closed_after=True, racy=True),
    FileKind("StringIO", 10_000, _stringio, closed_after=False, racy=False),
)
RACY_KINDS = tuple(k for k in KINDS if k.racy)


def _ids(kind: FileKind) -> str:
    return kind.name


@pytest.fixture
def opened() -> Iterator[List[IO[Any]]]:
    """Files a test opened; closed at the end whatever aiohttp did with them
    (the tests assert the closing themselves)."""
    files: List[IO[Any]] = []
    yield files
    for f in files:
        f.close()


async def eventually_closed(files: List[IO[Any]]) -> None:
    """Let scheduled closes run (they are not awaited by the request)."""
    for _ in range(5000):
        if all(f.closed for f in files):
            return
        await asyncio.sleep(0.001)
    assert [f.closed for f in files] == [True] * len(files), "file left open"


async def post_sequentially(
    kind: FileKind,
    url: Any,
    path: Path,
    connections: ConnectionCounter,
    opened: List[IO[Any]],
) -> None:
    async with connections.session() as session:
        for _ in range(REQUESTS):
            body = kind.open(path)
            opened.append(body)
            async with session.post(url, data=body) as resp:
                assert resp.status == 200
                await resp.read()


# --------------------------------------------------------------------------
# The seed report.


async def test_seed_reproduction(fixed: FixState, web_server: WebServer) -> None:
    # The unfixed client loses the race most of the time, not every time.
    for _ in range(REQUESTS):
        async with aiohttp.ClientSession() as session:
            async with session.post(
                web_server.url / "empty", data=b"", headers={"Content-Length": "0"}
            ) as resp:
                resp.raise_for_status()
            assert pooled(session) == [1]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                web_server.url / "empty",
                data=io.BytesIO(),
                headers={"Content-Length": "0"},
            ) as resp:
                resp.raise_for_status()
            assert pooled(session) == [1]


async def test_seed_reproduction_bug_reproduces(
    unfixed: FixState, web_server: WebServer
) -> None:
    outcomes = []
    # coalesced-headers holds an empty body's head until the write has ended,
    # which leaves no response to race with: revert it too, aiohttp as released.
    with switched("coalesced-headers", applied=False):
        for _ in range(REQUESTS):
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    web_server.url / "empty",
                    data=io.BytesIO(),
                    headers={"Content-Length": "0"},
                ) as resp:
                    resp.raise_for_status()
                outcomes.append(pooled(session))
    if closes_connections(unfixed):
        assert [] in outcomes  # the connection was closed, not pooled
    elif not unfixed.needed:
        assert outcomes == [[1]] * REQUESTS
    else:
        pytest.skip("before 3.10.6 a lost race does not close the connection")


# --------------------------------------------------------------------------
# 20 sequential POSTs of each kind.


@pytest.mark.parametrize("kind", KINDS, ids=_ids)
async def test_sequential_posts_use_one_connection(
    kind: FileKind,
    fixed: FixState,
    web_server: WebServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(kind.size)
    await post_sequentially(kind, web_server.url / "upload", path, connections, opened)
    assert connections.created == 1
    assert web_server.received == [("POST", "/upload", data)] * REQUESTS
    if kind.closed_after:
        await eventually_closed(opened)


@pytest.mark.parametrize("kind", RACY_KINDS, ids=_ids)
async def test_sequential_posts_bug_reproduces(
    kind: FileKind,
    unfixed: FixState,
    web_server: WebServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(kind.size)
    # computed-lengths sends text files and files of size 0 chunked, and
    # coalesced-headers holds an empty body's head until its write has ended:
    # either leaves no response to race with. Revert them, aiohttp as released.
    with (
        switched("computed-lengths", applied=False),
        switched("coalesced-headers", applied=False),
    ):
        await post_sequentially(
            kind, web_server.url / "upload", path, connections, opened
        )
    assert web_server.received == [("POST", "/upload", data)] * REQUESTS
    if closes_connections(unfixed):
        assert connections.created > 1
    elif not unfixed.needed:
        assert connections.created == 1
    else:
        pytest.skip("before 3.10.6 a lost race does not close the connection")


def test_unaffected_release_is_left_alone(fixed: FixState) -> None:
    patched = [
        f"{cls.__qualname__}.{name}"
        for cls in PATCHED_CLASSES
        for name, value in vars(cls).items()
        if getattr(getattr(value, "__func__", value), MARKER, None) == FIX_ID
    ]
    if fixed.needed:
        assert aiohttp_payloadfix.is_applied(FIX_ID)
        assert "IOBasePayload.write" in patched
    else:
        # 3.12+: upstream has the fix; the package must not touch anything.
        assert not aiohttp_payloadfix.is_applied(FIX_ID)
        assert patched == []


async def test_expect_continue_uses_one_connection(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(10_000)
    async with connections.session() as session:
        for _ in range(REQUESTS):
            body = open(path, "rb")
            opened.append(body)
            async with session.post(
                raw_server.url("/upload"), data=body, expect100=True
            ) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert connections.created == 1
    assert [r.body for r in raw_server.requests] == [data] * REQUESTS
    await eventually_closed(opened)


# --------------------------------------------------------------------------
# Closing the file.


class GatedReader(io.BufferedReader):
    """A file whose close() blocks (in whichever thread runs it) until the
    test opens the gate."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.gate = gate

    def close(self) -> None:
        self.gate.wait(timeout=60)
        super().close()


async def test_close_does_not_delay_the_request(
    fixed: FixState,
    web_server: WebServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
) -> None:
    path, data = body_path(10_000)
    gate = threading.Event()
    body = GatedReader(path, gate)
    try:
        async with connections.session() as session:
            async with session.post(web_server.url / "upload", data=body) as resp:
                assert resp.status == 200
                await resp.read()
            # The request is over and its connection pooled while the file's
            # close is still blocked.
            assert pooled(session) == [1]
            assert not body.closed
            gate.set()
            await eventually_closed([body])
            async with session.post(web_server.url / "upload", data=b"x") as resp:
                assert resp.status == 200
        assert connections.created == 1
        assert [r[2] for r in web_server.received] == [data, b"x"]
    finally:
        gate.set()
        body.close()


async def test_close_after_early_answer(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    """The server answers 413 before reading the body: the write is cut short,
    the file is still closed and nothing is left behind."""
    path, data = body_path(300_000)
    raw_server.routes["/upload"] = Reply(status=413, answer_after=0, close=True)
    body = open(path, "rb")
    opened.append(body)
    async with connections.session() as session:
        async with session.post(raw_server.url("/upload"), data=body) as resp:
            assert resp.status == 413
            await resp.read()
    await raw_server.settle()
    await eventually_closed(opened)
    raw_server.assert_clean()
    [request] = raw_server.requests
    assert data.startswith(request.body)


class ReadRecorder:
    """Records what the loop runs in its executor."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.calls: List[Tuple[Any, Tuple[Any, ...]]] = []
        self._original = loop.run_in_executor

    def __call__(self, executor: Any, func: Any, *args: Any) -> Any:
        self.calls.append((func, args))
        return self._original(executor, func, *args)

    def involving(self, obj: object) -> List[Tuple[Any, Tuple[Any, ...]]]:
        return [
            (func, args)
            for func, args in self.calls
            if getattr(func, "__self__", None) is obj or any(a is obj for a in args)
        ]


@pytest.mark.parametrize("size", [0, 10, 300_000])
async def test_bytesio_is_read_on_the_loop(
    size: int,
    fixed: FixState,
    web_server: WebServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    recorder = ReadRecorder(loop)
    monkeypatch.setattr(loop, "run_in_executor", recorder)
    data = content(size)
    body = io.BytesIO(data)
    async with aiohttp.ClientSession() as session:
        async with session.post(web_server.url / "upload", data=body) as resp:
            assert resp.status == 200
    assert web_server.received == [("POST", "/upload", data)]
    assert recorder.involving(body) == []


async def test_bytesio_read_in_executor_bug_reproduces(
    unfixed: FixState, web_server: WebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    recorder = ReadRecorder(loop)
    monkeypatch.setattr(loop, "run_in_executor", recorder)
    body = io.BytesIO(b"x" * 1000)
    async with aiohttp.ClientSession() as session:
        async with session.post(web_server.url / "upload", data=body) as resp:
            assert resp.status == 200
    if unfixed.needed:
        assert recorder.involving(body) != []
    else:
        assert recorder.involving(body) == []


# --------------------------------------------------------------------------
# Resending a file body: the whole file again, or a clear error.
#
# On 3.9-3.11 file-payload-reuse guards resends (it replaces the write path);
# on 3.12 file-resend does.

RESEND_FIX_ID = "file-resend" if AIOHTTP_VERSION >= (3, 12, 0) else FIX_ID

#: Resent bodies: a file, and a BytesIO (whose resends 3.9-3.11 tell apart
#: by the request call's timer, not by a scope around the call).
RESENT = {"open(rb)": _binary, "BytesIO": _bytesio}


def closes_bytes_io(opener: Callable[[Path], IO[Any]]) -> bool:
    """3.12.0-3.12.7 close a BytesIO body at the end of each write: a resend
    of one can only fail (with FileBodyError, saying why)."""
    return opener is _bytesio and (3, 12, 0) <= AIOHTTP_VERSION < (3, 12, 8)


@pytest.fixture
def resend_fixed() -> Iterator[FixState]:
    with switched(RESEND_FIX_ID, applied=True) as state:
        if not state.applied and by_id(RESEND_FIX_ID).probe() is not None:
            pytest.skip(
                f"aiohttp {aiohttp.__version__} still resends what is left of a"
                " file, but 3.13 and newer are left untouched by design"
            )
        yield state


@pytest.fixture
def resend_unfixed() -> Iterator[FixState]:
    with switched(RESEND_FIX_ID, applied=False) as state:
        yield state


def whole_or_error(
    error: Optional[BaseException], requests: List[RawRequest], data: bytes
) -> bool:
    """The rule for every resend: each attempt that reached the server with
    a complete body carried the whole file, and the call either succeeded or
    failed with an exception."""
    complete = [r.body for r in requests if r.complete]
    return all(body == data for body in complete) and (
        error is not None or bool(complete)
    )


async def upload(
    session: aiohttp.ClientSession, method: str, url: Any, body: IO[Any]
) -> Optional[BaseException]:
    """Send ``body``; None when the answer was 200, else the error it raised."""
    try:
        async with session.request(method, url, data=body) as resp:
            assert resp.status == 200
    except (ValueError, aiohttp.ClientError) as exc:
        return exc
    return None


async def _put_on_stale_connection(
    raw_server: RawHTTPServer, connections: ConnectionCounter, body: IO[Any]
) -> Optional[BaseException]:
    raw_server.drop_after = 1
    async with connections.session() as session:
        async with session.get(raw_server.url("/warm")) as resp:
            assert resp.status == 200
        error = await upload(session, "PUT", raw_server.url("/upload"), body)
    await raw_server.settle()
    return error


@pytest.mark.skipif(
    AIOHTTP_VERSION < (3, 10, 0), reason="aiohttp retries a stale connection since 3.10"
)
@pytest.mark.parametrize("opener", RESENT.values(), ids=RESENT.keys())
async def test_retry_on_stale_connection_resends_whole_file(
    opener: Callable[[Path], IO[Any]],
    resend_fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(300_000)
    body = opener(path)
    opened.append(body)
    error = await _put_on_stale_connection(raw_server, connections, body)
    raw_server.assert_clean()
    if closes_bytes_io(opener):
        assert isinstance(error, aiohttp_payloadfix.FileBodyError)
        return
    assert error is None
    first, second = raw_server.connections
    assert [(r.method, r.target, r.status) for r in first.requests] == [
        ("GET", "/warm", 200),
        ("PUT", "/upload", None),  # read, then dropped without an answer
    ]
    assert [(r.method, r.target, r.body) for r in second.requests] == [
        ("PUT", "/upload", data)
    ]
    assert first.requests[1].body == data
    if opener is not _bytesio:
        await eventually_closed(opened)


@pytest.mark.skipif(
    AIOHTTP_VERSION < (3, 10, 0), reason="aiohttp retries a stale connection since 3.10"
)
async def test_retry_on_stale_connection_bug_reproduces(
    resend_unfixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(300_000)
    body = open(path, "rb")
    opened.append(body)
    error = await _put_on_stale_connection(raw_server, connections, body)
    retried = [r.body for r in raw_server.connections[-1].requests]
    # 3.10/3.11 close the file after the first attempt, so the retry fails
    # ("I/O operation on closed file"); 3.12.15 resends it from where the first
    # attempt stopped: an empty body with "Content-Length: 0". 3.14 fixed it
    # upstream (the package leaves 3.13+ alone).
    if AIOHTTP_VERSION < (3, 14, 0):
        assert error is not None or retried != [data]


@pytest.mark.skipif(
    AIOHTTP_VERSION < (3, 10, 0), reason="aiohttp retries a stale connection since 3.10"
)
@pytest.mark.parametrize("opener", RESENT.values(), ids=RESENT.keys())
async def test_retry_after_partial_upload_resends_whole_file(
    opener: Callable[[Path], IO[Any]],
    resend_fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    """The server drops the pooled connection in the middle of the first
    attempt's body: the retry starts while that write may still be reading."""
    path, data = body_path(1_000_000)
    raw_server.script = [Reply(), Reply(drop=True, answer_after=100_000)]
    body = opener(path)
    opened.append(body)
    async with connections.session() as session:
        async with session.get(raw_server.url("/warm")) as resp:
            assert resp.status == 200
        error = await upload(session, "PUT", raw_server.url("/upload"), body)
    await raw_server.settle()
    raw_server.assert_clean()
    if closes_bytes_io(opener):
        assert isinstance(error, aiohttp_payloadfix.FileBodyError)
        return
    assert error is None
    first, second = raw_server.connections
    assert [r.target for r in first.requests] == ["/warm", "/upload"]
    assert data.startswith(first.requests[1].body)
    assert [(r.target, r.body) for r in second.requests] == [("/upload", data)]
    if opener is not _bytesio:
        await eventually_closed(opened)


async def _redirected_upload(
    raw_server: RawHTTPServer, status: int, body: IO[Any]
) -> Optional[BaseException]:
    raw_server.routes["/upload"] = Reply(status=status, headers=(("Location", "/to"),))
    async with aiohttp.ClientSession() as session:
        error = await upload(session, "POST", raw_server.url("/upload"), body)
    await raw_server.settle()
    return error


REDIRECTED = {"open(rb)": _binary, "open(r)": _text, "BytesIO": _bytesio}


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("opener", REDIRECTED.values(), ids=REDIRECTED.keys())
@pytest.mark.parametrize("start", [0, 1000])
async def test_redirect_resends_whole_file(
    status: int,
    opener: Callable[[Path], IO[Any]],
    start: int,
    resend_fixed: FixState,
    raw_server: RawHTTPServer,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(300_000)
    body = opener(path)
    opened.append(body)
    body.read(start)  # the body is what follows the position at the call
    data = data[start:]
    error = await _redirected_upload(raw_server, status, body)
    raw_server.assert_clean()
    if opener is _bytesio and (3, 12, 0) <= AIOHTTP_VERSION < (3, 12, 8):
        # These releases close a BytesIO body at the end of each write: the
        # resend can only fail, and must say why.
        assert isinstance(error, aiohttp_payloadfix.FileBodyError)
        assert "closed" in str(error)
        assert [r.target for r in raw_server.requests] == ["/upload"]
        return
    assert error is None
    assert [(r.target, r.status, r.body) for r in raw_server.requests] == [
        ("/upload", status, data),
        ("/to", 200, data),
    ]
    if opener is not _bytesio:
        await eventually_closed(opened)


@pytest.mark.parametrize("opener", RESENT.values(), ids=RESENT.keys())
async def test_early_redirect_resends_whole_file(
    opener: Callable[[Path], IO[Any]],
    resend_fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    """The 307 comes before the body has been read: the redirected request is
    built while the first attempt may still be reading the file."""
    path, data = body_path(1_000_000)
    raw_server.routes["/upload"] = Reply(
        status=307, headers=(("Location", "/to"),), answer_after=0
    )
    body = opener(path)
    opened.append(body)
    async with connections.session() as session:
        error = await upload(session, "POST", raw_server.url("/upload"), body)
    await raw_server.settle()
    raw_server.assert_clean()
    first, *_ = raw_server.requests
    assert (first.target, first.status) == ("/upload", 307)
    assert data.startswith(first.body)
    if closes_bytes_io(opener):
        # Closed by the first attempt's write, which the 307 may interrupt:
        # FileBodyError, or aiohttp's own error for the closed file.
        assert error is not None and "closed" in str(error)
        return
    assert error is None
    assert [r.body for r in raw_server.requests if r.target == "/to"] == [data]
    if opener is not _bytesio:
        await eventually_closed(opened)


class SteppedWriter(MemoryWriter):
    """Lets the loop run after each chunk, as a transport's backpressure does."""

    async def write(self, chunk: Union[bytes, bytearray, memoryview]) -> None:
        self.data += chunk
        await asyncio.sleep(0)


async def test_a_resend_stops_the_earlier_attempts_reads(
    fixed: FixState,
) -> None:
    """A request rebuilt from a BytesIO in the same call (same timer: a
    redirect or a retry) rewinds it; a write of the earlier attempt that is
    still running must not read on, or it would take the resend's bytes."""
    if not fixed.applied:
        pytest.skip(f"aiohttp {aiohttp.__version__}: file-resend guards this")
    loop = asyncio.get_running_loop()
    data = content(300_000)
    f = io.BytesIO(data)
    timer = TimerNoop()
    url = URL("http://127.0.0.1/upload")
    first = aiohttp.ClientRequest("POST", url, data=f, timer=timer, loop=loop)
    early = SteppedWriter()
    task = asyncio.ensure_future(first.body.write(early))
    await asyncio.sleep(0)  # the first attempt has read and written a chunk
    assert 0 < len(early.data) < len(data)
    second = aiohttp.ClientRequest("POST", url, data=f, timer=timer, loop=loop)
    assert f.tell() == 0
    await task  # ends without another read
    resent = MemoryWriter()
    await second.body.write(resent)
    assert bytes(resent.data) == data
    assert data.startswith(bytes(early.data))


def test_bytesio_claims_live_with_their_requests(fixed: FixState) -> None:
    """3.9-3.11: each request built from a BytesIO claims it; the claim of
    the latest build is the current one, and the earlier ones are
    superseded. No table keeps claims: once the requests are gone the file
    has no claim and no weak reference left."""
    if not fixed.applied:
        pytest.skip(f"aiohttp {aiohttp.__version__}: no claims here")
    loop = asyncio.new_event_loop()
    try:
        f = io.BytesIO(b"0123456789")
        f.seek(4)
        timer = TimerNoop()
        url = URL("http://127.0.0.1/upload")
        first: Any = aiohttp.ClientRequest("PUT", url, data=f, timer=timer, loop=loop)
        assert _filebody.claim_of(f) is first._payloadfix_claim
        f.read()  # as the first attempt's write leaves it
        second: Any = aiohttp.ClientRequest("PUT", url, data=f, timer=timer, loop=loop)
        assert f.tell() == 4  # a resend: back to where the call started
        assert first._payloadfix_claim.superseded
        assert _filebody.claim_of(f) is second._payloadfix_claim
        f.seek(7)
        other: Any = aiohttp.ClientRequest(
            "PUT", url, data=f, timer=TimerNoop(), loop=loop
        )
        assert f.tell() == 7  # another call takes it where it is
        assert second._payloadfix_claim.superseded
        assert _filebody.claim_of(f) is other._payloadfix_claim
        del first, second, other
        gc.collect()
        assert _filebody.claim_of(f) is None
        assert weakref.getweakrefs(f) == []
    finally:
        loop.close()


@pytest.mark.parametrize("status", [None, 307])
async def test_bytesio_reused_by_a_new_call_starts_where_it_is(
    status: Optional[int],
    resend_fixed: FixState,
    raw_server: RawHTTPServer,
) -> None:
    """Only a resend within one call goes back to where that call's body
    started. A BytesIO passed to a second call is sent from where the first
    left it (its end: an empty body, as aiohttp sends it), and, after the
    caller's own seek, from there; a redirect of the second call goes back
    to the second call's start."""
    if closes_bytes_io(_bytesio):
        pytest.skip("3.12.0-3.12.7 close a BytesIO after its first request")
    if status is not None:
        raw_server.routes["/again"] = Reply(
            status=status, headers=(("Location", "/to"),)
        )
    data = content(200_000)
    body = io.BytesIO(data)
    async with aiohttp.ClientSession() as session:
        for target in ("/first", "/again"):
            async with session.post(raw_server.url(target), data=body) as resp:
                assert resp.status == 200
        body.seek(150_000)
        async with session.post(raw_server.url("/again"), data=body) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    sent = [(r.target, r.body) for r in raw_server.requests]
    if status is None:
        assert sent == [("/first", data), ("/again", b""), ("/again", data[150_000:])]
    else:
        assert sent == [
            ("/first", data),
            ("/again", b""),
            ("/to", b""),
            ("/again", data[150_000:]),
            ("/to", data[150_000:]),
        ]


@pytest.mark.parametrize("status", [307, 308])
async def test_redirect_bug_reproduces(
    status: int,
    resend_unfixed: FixState,
    raw_server: RawHTTPServer,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(300_000)
    body = open(path, "rb")
    opened.append(body)
    error = await _redirected_upload(raw_server, status, body)
    # 3.12.14 made redirects reuse the first attempt's payload, which rewinds.
    if resend_unfixed.needed and not (3, 12, 14) <= AIOHTTP_VERSION:
        resent = [r.body for r in raw_server.requests if r.target == "/to"]
        assert error is not None or resent != [data]
    else:
        assert whole_or_error(error, raw_server.requests, data)


async def test_redirect_of_unseekable_file_is_a_clear_error(
    resend_fixed: FixState, raw_server: RawHTTPServer, opened: List[IO[Any]]
) -> None:
    data = content(4096)  # fits in the pipe's buffer
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    body = open(read_fd, "rb")
    opened.append(body)
    error = await _redirected_upload(raw_server, 307, body)
    raw_server.assert_clean()
    first = raw_server.requests[0]
    assert (first.target, first.body) == ("/upload", data)
    assert error is not None, "resent an unseekable file that was already read"
    assert isinstance(error, ValueError)
    if resend_fixed.needed:
        assert isinstance(error, aiohttp_payloadfix.FileBodyError)
        assert "seekable" in str(error)
    # Nothing, not even an empty body, went to the redirect target.
    assert [r.target for r in raw_server.requests] == ["/upload"]
    await eventually_closed(opened)


def test_registry_maps_the_kinds_as_assumed(tmp_path: Path) -> None:
    """The kinds above exercise the payload classes the fix patches."""
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    expected = {
        _bytesio: payload.BytesIOPayload,
        _binary: payload.BufferedReaderPayload,
        _random_access: payload.BufferedReaderPayload,
        _buffered_over_bytesio: payload.BufferedReaderPayload,
        _unbuffered: payload.IOBasePayload,
        _text: payload.TextIOPayload,
        _stringio: payload.StringIOPayload,
    }
    for opener, cls in expected.items():
        with opener(path) as f:
            assert type(payload.get_payload(f)) is cls


@pytest.mark.parametrize(
    "opener", [_bytesio, _binary, _text], ids=["BytesIO", "rb", "r"]
)
async def test_payload_write_to_writer_without_length(
    opener: Callable[[Path], IO[Any]],
    fixed: FixState,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: List[IO[Any]],
) -> None:
    path, data = body_path(1000)
    f = opener(path)
    opened.append(f)
    writer = MemoryWriter()
    await payload.get_payload(f).write(writer)
    assert bytes(writer.data) == data
