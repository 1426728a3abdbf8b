"""Helpers for the fault tests (tests/test_faults*.py): a raw server that can
also hang, read slowly, hash instead of keeping bodies and speak TLS; body
files that block at a chosen read or in their close; and the invariants every
fault must leave intact."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import io
import ssl
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional

import aiohttp
import pytest
import pytest_asyncio
from conftest import RawHTTPServer, RawRequest, Reply, _Abort, switched
from yarl import URL

import aiohttp_payloadfix
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import LEDGER

#: aiohttp 3.9.0 only (fixed in 3.9.1): ``ClientResponse.close()`` releases
#: the connection to the pool instead of closing it, so a request cancelled or
#: timed out before its response arrived leaves its connection pooled, and the
#: next request on it reads the previous request's answer. Not a request-body
#: bug, so no fix here patches it; the tests it breaks are skipped there.
RESPONSE_CLOSE_POOLS = "_release_connection()" in inspect.getsource(
    aiohttp.ClientResponse.close
)
POOLS_REASON = (
    "aiohttp 3.9.0's ClientResponse.close() puts the connection back in the"
    " pool (fixed in 3.9.1): a cancelled or timed-out request's connection is"
    " reused, outside this package's scope"
)

#: Bounds a hang in a failing test; nothing is asserted about time.
SAFETY = aiohttp.ClientTimeout(total=30)

# The package changes nothing on 3.13+: where those releases behave otherwise
# than the fixed releases, the tests expect what upstream does, as measured.

#: Measured here: 3.13.0, 3.13.5, 3.14.0 and 3.14.1 close a file body only when
#: the request got its response; a request that failed before (cancelled, timed
#: out, connection lost) leaves the file open. 3.14.2 closes it in every case.
UPSTREAM_LEAVES_FAILED_FILE_OPEN = (3, 13, 0) <= AIOHTTP_VERSION < (3, 14, 2)

#: Measured here: 3.13.0, 3.13.5 and 3.14.0-3.14.3 retry a file body on a lost
#: connection (a stale pooled one, or one the server closed mid-upload) with
#: what the first attempt left of it (3.14.4 fixed it). The package changes
#: nothing on 3.13+, so there the bug is upstream's, untouched.
UPSTREAM_TRUNCATES_RETRIES = (3, 13, 0) <= AIOHTTP_VERSION < (3, 14, 4)


@contextlib.contextmanager
def released() -> Iterator[None]:
    """aiohttp as released: every fix reverted inside the block, the state
    found put back exactly afterwards."""
    with switched("file-payload-reuse", applied=False):
        applied = list(LEDGER.applied())
        if applied:
            aiohttp_payloadfix.revert(applied)
        assert LEDGER.applied() == ()
        yield


# --------------------------------------------------------------------------
# The server.


@dataclass(frozen=True)
class Hang(Reply):
    """Read the request (with ``answer_after``: that many body bytes), then
    never answer; the connection stays open until the client gives up."""


class QueuedRoutes(Dict[str, Reply]):
    """``RawHTTPServer.routes`` with replies used once each, per target, before
    the route or the default (the server looks replies up with ``get``)."""

    def __init__(self, queues: Dict[str, List[Reply]]) -> None:
        super().__init__()
        self.queues = queues

    def get(self, key: str, default: Any = None) -> Any:
        queue = self.queues.get(key)
        if queue:
            return queue.pop(0)
        return super().get(key, default)


@dataclass
class Digest:
    size: int = 0
    sha256: str = ""


class FaultServer(RawHTTPServer):
    """The strict raw server of conftest, plus: ``Hang`` replies, slow reads
    (``slow``: at most that many bytes per read, with a pause after each) and
    ``hash_bodies`` (a body is hashed, not kept: ``digests``). With ``tls``,
    it speaks HTTPS."""

    def __init__(self, tls: Optional[ssl.SSLContext] = None) -> None:
        super().__init__()
        self.tls = tls
        self.slow: Optional[int] = None
        #: Slow reads apply to these targets only; ``give_up`` ends them.
        self.slow_targets = {"/upload"}
        self.give_up = False
        self.pause = 0.0005
        self.hash_bodies = False
        self.digests: Dict[int, Digest] = {}
        self.released = asyncio.Event()
        self._readers: Dict[int, asyncio.StreamReader] = {}

    async def start(self) -> None:
        if self.tls is None:
            await super().start()
            return
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, limit=2**16, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.released.set()
        await super().close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.tls is not None and sys.version_info < (3, 11):
            # Before 3.11 asyncio's TLS transport closes only once the peer
            # answers its close_notify, which a client that has already given
            # up on the connection never does: end it after a grace period.
            transport = writer.transport
            loop = asyncio.get_running_loop()

            def close() -> None:
                transport.close()
                loop.call_later(0.5, transport.abort)

            writer.close = close  # type: ignore[method-assign]
        await super()._serve(reader, writer)

    def url(self, path: str = "/") -> URL:
        scheme = "http" if self.tls is None else "https"
        return URL.build(scheme=scheme, host="127.0.0.1", port=self.port, path=path)

    def digest(self, request: RawRequest) -> Digest:
        return self.digests[id(request)]

    async def _answer(
        self, writer: asyncio.StreamWriter, request: RawRequest, reply: Reply
    ) -> None:
        if isinstance(reply, Hang):
            # Until the client closes the connection (or the server stops).
            reader = self._readers.pop(id(request))
            stop = asyncio.ensure_future(self.released.wait())
            try:
                while not stop.done():
                    read = asyncio.ensure_future(reader.read(2**16))
                    await asyncio.wait(
                        [read, stop], return_when=asyncio.FIRST_COMPLETED
                    )
                    if not read.done():
                        read.cancel()
                        break
                    if read.exception() is not None or not read.result():
                        break
            finally:
                stop.cancel()
            raise _Abort
        await super()._answer(writer, request, reply)

    async def _read_body(
        self,
        reader: asyncio.StreamReader,
        request: RawRequest,
        length: int,
        upto: Optional[int],
    ) -> None:
        self._readers[id(request)] = reader
        slow = self.slow if request.target in self.slow_targets else None
        if request.chunked and slow is not None:
            # Slowest for a chunked body: nothing read until the test gives up.
            while not self.give_up:
                await asyncio.sleep(self.pause)
            raise _Abort
        if request.chunked or (slow is None and not self.hash_bodies):
            await super()._read_body(reader, request, length, upto)
            return
        if request.complete:
            return
        digest = self.digests.setdefault(id(request), Digest())
        hasher = hashlib.sha256()
        want = length if upto is None else min(length, upto)
        while digest.size < want:
            step = want - digest.size
            if slow is not None:
                step = min(step, slow)
            try:
                chunk = await reader.read(step)
            except ConnectionError:
                raise _Abort from None
            if not chunk:
                raise _Abort
            digest.size += len(chunk)
            if self.hash_bodies:
                hasher.update(chunk)
            else:
                request.body += chunk
            if slow is not None:
                await asyncio.sleep(self.pause)
                if self.give_up:
                    raise _Abort
        if self.hash_bodies:
            digest.sha256 = hasher.hexdigest()
        if digest.size == length:
            request.complete = True


def assert_never_reused_in_doubt(server: RawHTTPServer) -> None:
    """On every connection, only the last request may be incomplete: a
    connection whose request was cut short never carries another one. And
    nothing was parsed out of body bytes."""
    server.assert_clean()
    for index, conn in enumerate(server.connections):
        cut = [r.target for r in conn.requests[:-1] if not r.complete]
        assert cut == [], f"connection {index} was reused after a half request"


def assert_complete_bodies(requests: List[RawRequest], data: bytes) -> None:
    """What reached the server complete is the whole body; what did not is
    a prefix of it."""
    for r in requests:
        where = f"{r.method} {r.target}: {len(r.body)} of {len(data)} bytes"
        if r.complete:
            assert r.body == data, f"{where}, complete but not the body"
        else:
            assert data.startswith(r.body), f"{where}, not a prefix of the body"


# --------------------------------------------------------------------------
# Bodies.


class GatedFile(io.BufferedReader):
    """A file whose read number ``block_read`` (1-based) or whose close waits
    in its thread until the test opens ``gate``. ``reached`` is set when it
    starts waiting."""

    def __init__(
        self,
        path: Path,
        *,
        block_read: Optional[int] = None,
        block_close: bool = False,
    ) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.block_read = block_read
        self.block_close = block_close
        self.gate = threading.Event()
        self.reached = threading.Event()
        self.reads = 0

    def read(self, size: Optional[int] = -1, /) -> bytes:
        self.reads += 1
        if self.reads == self.block_read:
            self.reached.set()
            self.gate.wait(timeout=30)
        return super().read(size)

    def close(self) -> None:
        if self.block_close and not self.closed:
            self.reached.set()
            self.gate.wait(timeout=30)
        super().close()


async def wait_for(event: threading.Event, task: asyncio.Future[Any]) -> bool:
    """Until ``event`` is set (True) or ``task`` has ended (False)."""
    for _ in range(30_000):
        if event.is_set():
            return True
        if task.done():
            return event.is_set()
        await asyncio.sleep(0.001)
    raise AssertionError("neither the stage nor the end of the request came")


async def eventually_closed(files: List[Any]) -> None:
    """Let scheduled closes run (the request does not await them)."""
    for _ in range(10_000):
        if all(f.closed for f in files):
            return
        await asyncio.sleep(0.001)
    assert [f.closed for f in files] == [True] * len(files), "file left open"


async def closed_after(files: List[Any], *, failed: bool) -> None:
    """``files``, the bodies of requests that ended, are closed; except where
    upstream leaves the file of a request that failed before its response
    open (UPSTREAM_LEAVES_FAILED_FILE_OPEN): then none was closed, even given
    the time a scheduled close takes."""
    if not (failed and UPSTREAM_LEAVES_FAILED_FILE_OPEN):
        await eventually_closed(files)
        return
    await asyncio.sleep(0.1)
    assert [f.closed for f in files] == [False] * len(files), "file closed"


def assert_retry_carries_the_rest(requests: List[RawRequest], data: bytes) -> None:
    """UPSTREAM_TRUNCATES_RETRIES: the first attempt was cut short and the
    retry, answered, carried only what the first left of the file (a suffix
    no longer than the part not read by then; empty if it read all)."""
    first, retry = requests
    assert (first.status, retry.status) == (None, 200)
    assert not first.complete
    assert data.startswith(first.body)
    assert retry.complete
    assert data.endswith(retry.body)
    assert len(first.body) + len(retry.body) <= len(data)


@dataclass
class Opened:
    """Files a test opened; closed at teardown whatever aiohttp did."""

    files: List[Any] = field(default_factory=list)

    def add(self, f: Any) -> Any:
        self.files.append(f)
        return f

    def close_all(self) -> None:
        for f in self.files:
            if isinstance(f, GatedFile):
                f.gate.set()
                f.block_close = False
            f.close()


# --------------------------------------------------------------------------
# Fixtures and steps the fault test modules share (imported there by name).

NEXT_BODY = b"next request"


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FaultServer]:
    srv = FaultServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
def opened() -> Iterator[Opened]:
    files = Opened()
    yield files
    files.close_all()


async def next_request_works(
    session: aiohttp.ClientSession, server: FaultServer
) -> None:
    """The session's next request succeeds (on a new or a sound connection)."""
    async with session.post(server.url("/next"), data=NEXT_BODY) as resp:
        assert resp.status == 200
        await resp.read()
