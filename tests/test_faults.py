"""Faults around a request body write (issue 6): the caller cancelling at
every await point, the server answering early, closing mid-upload, never
answering or reading slowly, and a 50 MiB upload under backpressure.

Each fault must end with a clear error or a correct response; a connection in
doubt is never used again (on every server connection only the last request
may be incomplete); a file body the package closes is closed, a ``BytesIO``
stays open (as on 3.12.15); and the session's next request works. Leaked
tasks, never-retrieved task exceptions and unclosed files fail the test
through conftest's autouse checks and ``filterwarnings = error``.

Resends (stale pooled connection, 307/308) are in test_faults_resend.py,
TLS in test_faults_tls.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, List, Optional, Tuple

import aiohttp
import pytest
from aiohttp import base_protocol
from conftest import ConnectionCounter, Reply, content, fix_needed
from faults_support import (  # with the shared pytest fixtures
    POOLS_REASON,
    RESPONSE_CLOSE_POOLS,
    SAFETY,
    UPSTREAM_LEAVES_FAILED_FILE_OPEN,
    UPSTREAM_TRUNCATES_RETRIES,
    FaultServer,
    GatedFile,
    Hang,
    Opened,
    assert_complete_bodies,
    assert_never_reused_in_doubt,
    assert_retry_carries_the_rest,
    closed_after,
    eventually_closed,
    next_request_works,
    opened,
    released,
    server,
    wait_for,
)

import aiohttp_payloadfix
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import LEDGER

#: 3.12 sends the request head with the first body chunk, and so does an
#: older release with coalesced-headers applied.
HEAD_WAITS_FOR_BODY = AIOHTTP_VERSION >= (3, 12, 0)


def head_waits_for_body() -> bool:
    return HEAD_WAITS_FOR_BODY or LEDGER.is_applied("coalesced-headers")


def uploads(server: FaultServer) -> List[Any]:
    return [r for r in server.requests if r.target == "/upload"]


# --------------------------------------------------------------------------
# Body kinds.


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[Path, bytes], Any]
    #: Closed once the request is over (BytesIO stays open, as in 3.12.15).
    closes: bool = False
    #: Kept open by the test; checked for "still open" afterwards.
    stays_open: bool = False


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 50_000):
        await asyncio.sleep(0)
        yield data[i : i + 50_000]


KINDS = (
    Kind("bytes", lambda _p, d: d),
    Kind("BytesIO", lambda _p, d: io.BytesIO(d), stays_open=True),
    Kind("open(rb)", lambda p, _d: open(p, "rb"), closes=True),
    Kind("open(r)", lambda p, _d: open(p, encoding="utf-8"), closes=True),
    Kind("async generator", lambda _p, d: _chunks(d)),
)
FILE_KINDS = tuple(k for k in KINDS if k.closes or k.stays_open)


def _kid(kind: Kind) -> str:
    return kind.name


#: 3.12.0-3.12.7 close a BytesIO body after writing it (3.12.8 stopped).
BYTESIO_CLOSED_AFTER_WRITE = (3, 12, 0) <= AIOHTTP_VERSION < (3, 12, 8)


async def check_body_object(kind: Kind, body: Any, *, failed: bool = False) -> None:
    """``failed``: the request ended in an error before its response came."""
    if kind.closes:
        await closed_after([body], failed=failed)
    if kind.stays_open and not BYTESIO_CLOSED_AFTER_WRITE:
        assert not body.closed


# --------------------------------------------------------------------------
# Cancellation after n event-loop iterations, n = 0, 1, 2, ... until the
# request completes before the cancellation comes.

#: Bounds the sweep; a request takes far fewer iterations than this.
MAX_ITERATIONS = 5000


async def cancel_sweep(
    kind: Kind,
    server: FaultServer,
    connections: ConnectionCounter,
    path: Path,
    data: bytes,
    opened: Opened,
) -> int:
    """Upload, cancelled after n loop iterations, for n = 0, 1, 2, ... until
    the upload completes first; after each, the next request must work.
    Returns how many uploads were cancelled."""
    cancelled = 0
    #: Cancelled before their response, on releases that leave them open.
    unanswered: List[Any] = []
    async with connections.session(timeout=SAFETY) as session:
        started: List[Any] = []
        answered: List[Any] = []

        async def upload(body: Any) -> int:
            started.append(body)
            async with session.post(server.url("/upload"), data=body) as resp:
                answered.append(body)
                await resp.read()
                return resp.status

        for n in range(MAX_ITERATIONS):
            body = kind.make(path, data)
            if kind.closes or kind.stays_open:
                opened.add(body)
            task = asyncio.ensure_future(upload(body))
            for _ in range(n):
                if task.done():
                    break
                await asyncio.sleep(0)
            finished = task.done()
            task.cancel()
            try:
                assert await task == 200
            except asyncio.CancelledError:
                assert not finished
                cancelled += 1
            await next_request_works(session, server)
            if started and started[-1] is body:
                # (A task cancelled before it ran never handed over the body.)
                was_answered = bool(answered) and answered[-1] is body
                if (
                    kind.closes
                    and UPSTREAM_LEAVES_FAILED_FILE_OPEN
                    and not was_answered
                ):
                    unanswered.append(body)  # checked together, below
                else:
                    await check_body_object(kind, body)
            if finished:
                break
        else:
            pytest.fail(f"the upload never completed within {MAX_ITERATIONS} steps")
    await server.settle()
    if unanswered:
        await closed_after(unanswered, failed=True)
    return cancelled


@pytest.mark.skipif(RESPONSE_CLOSE_POOLS, reason=POOLS_REASON)
@pytest.mark.parametrize("kind", KINDS, ids=_kid)
async def test_cancel_after_every_loop_iteration(
    kind: Kind,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(150_000)
    cancelled = await cancel_sweep(kind, server, connections, path, data, opened)
    assert cancelled > 1
    assert_never_reused_in_doubt(server)
    assert_complete_bodies(uploads(server), data)
    assert [r.status for r in uploads(server) if r.complete][-1:] == [200]


@pytest.mark.skipif(RESPONSE_CLOSE_POOLS, reason=POOLS_REASON)
async def test_cancel_after_every_loop_iteration_bug_reproduces(
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """As released, 3.9-3.10.5 end a cancelled write of a chunked body with
    the end of the message on a connection the cancelled request closed: the
    write task fails with nobody to retrieve it."""
    kind = KINDS[-1]
    assert kind.name == "async generator"
    if not fix_needed("cancelled-upload-close"):
        pytest.skip(f"aiohttp {aiohttp.__version__} closes a half-sent connection")
    path, data = body_path(150_000)
    loop = asyncio.get_running_loop()
    reported: List[str] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx["message"]))
    try:
        with released():
            await cancel_sweep(kind, server, connections, path, data, opened)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert "Task exception was never retrieved" in reported


# --------------------------------------------------------------------------
# Cancellation at named stages: the body blocks until the test lets it go.


@dataclass
class StagedBody:
    """An async generator body that stops at ``stage`` until released:
    "before headers" (before its first chunk), "mid-body" (after the first
    of two chunks) or "after the body" (after the last chunk, before it ends)."""

    data: bytes
    stage: str
    reached: asyncio.Event
    release: asyncio.Event
    closed: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        half = len(self.data) // 2
        try:
            if self.stage == "before headers":
                await self._stop()
            yield self.data[:half]
            if self.stage == "mid-body":
                await self._stop()
            yield self.data[half:]
            if self.stage == "after the body":
                await self._stop()
        finally:
            self.closed = True

    async def _stop(self) -> None:
        self.reached.set()
        await self.release.wait()


STAGES = ("before headers", "mid-body", "after the body")


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
@pytest.mark.parametrize("stage", STAGES)
async def test_cancel_at_body_stage(
    stage: str,
    framing: str,
    server: FaultServer,
    connections: ConnectionCounter,
) -> None:
    data = content(30_000)
    body = StagedBody(data, stage, asyncio.Event(), asyncio.Event())
    headers = {"Content-Length": str(len(data))} if framing == "content-length" else {}
    async with connections.session(timeout=SAFETY) as session:

        async def upload() -> int:
            async with session.post(
                server.url("/upload"), data=body.chunks(), headers=headers
            ) as resp:
                return resp.status

        task = asyncio.ensure_future(upload())
        await asyncio.wait_for(body.reached.wait(), 20)
        task.cancel()
        try:
            # Only a complete body can have been answered already.
            assert await task == 200
            assert stage == "after the body"
        except asyncio.CancelledError:
            pass
        await next_request_works(session, server)
        await next_request_works(session, server)
        assert body.closed
    await server.settle()
    assert_never_reused_in_doubt(server)
    assert_complete_bodies(uploads(server), data)
    if head_waits_for_body() and stage == "before headers":
        assert uploads(server) == []  # the head waits for the first chunk
    else:
        [upload_request] = uploads(server)
        if stage != "after the body":
            assert not upload_request.complete
    # The follow-ups never rode on the cut-short upload's connection.
    for conn in server.connections:
        if any(r.target == "/upload" for r in conn.requests):
            assert [r.target for r in conn.requests] == ["/upload"]


FILE_STAGES = {
    "first read": {"block_read": 1},
    "mid-body": {"block_read": 2},
    "after the last byte": {"block_read": 4},  # 150 kB: reads 1-3 carry it
    "file close": {"block_close": True},
}


@pytest.mark.parametrize("stage", FILE_STAGES, ids=list(FILE_STAGES))
async def test_cancel_at_file_stage(
    stage: str,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """A file body blocked (in its executor thread) at a read or in its close
    when the caller is cancelled. A stage aiohttp does not reach (the fix
    never reads after the last byte) lets the request complete."""
    path, data = body_path(150_000)
    body = opened.add(GatedFile(path, **FILE_STAGES[stage]))  # type: ignore[arg-type]
    async with connections.session(timeout=SAFETY) as session:

        async def upload() -> int:
            async with session.post(server.url("/upload"), data=body) as resp:
                await resp.read()
                return resp.status

        task = asyncio.ensure_future(upload())
        reached = await wait_for(body.reached, task)
        task.cancel()
        try:
            assert await task == 200
            completed = True
        except asyncio.CancelledError:
            assert reached
            completed = False
        await next_request_works(session, server)
        body.gate.set()
        await next_request_works(session, server)
        await closed_after([body], failed=not completed)
    await server.settle()
    assert_never_reused_in_doubt(server)
    assert_complete_bodies(uploads(server), data)
    if completed:
        assert uploads(server)[0].complete


# --------------------------------------------------------------------------
# The server answers early (413, 401) while the body is still being written.


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
@pytest.mark.parametrize("status", [413, 401])
@pytest.mark.parametrize("kind", KINDS, ids=_kid)
async def test_early_answer(
    kind: Kind,
    status: int,
    close: bool,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(1_000_000)
    server.routes["/upload"] = Reply(
        status=status, body=b"no", answer_after=0, close=close
    )
    body = kind.make(path, data)
    if kind.closes or kind.stays_open:
        opened.add(body)
    async with connections.session(timeout=SAFETY) as session:
        async with session.post(server.url("/upload"), data=body) as resp:
            assert resp.status == status
            assert await resp.read() == b"no"
        await next_request_works(session, server)
        await next_request_works(session, server)
        await check_body_object(kind, body)
    await server.settle()
    assert_never_reused_in_doubt(server)
    assert_complete_bodies(uploads(server), data)


async def _early_answer_mid_file(
    server: FaultServer,
    connections: ConnectionCounter,
    body: GatedFile,
    timeout: aiohttp.ClientTimeout = SAFETY,
) -> Optional[BaseException]:
    """413 after the head, keep-alive, while the file write is blocked at its
    second read; the gate opens after two more requests went out."""
    server.routes["/upload"] = Reply(status=413, answer_after=0)
    error: Optional[BaseException] = None
    async with connections.session(timeout=timeout) as session:
        async with session.post(server.url("/upload"), data=body) as resp:
            assert resp.status == 413
            await resp.read()
        try:
            await next_request_works(session, server)
            await next_request_works(session, server)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = exc
        body.gate.set()
    await server.settle()
    return error


async def test_early_answer_mid_file(
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(300_000)
    body = opened.add(GatedFile(path, block_read=2))
    error = await _early_answer_mid_file(server, connections, body)
    assert error is None
    assert_never_reused_in_doubt(server)
    assert_complete_bodies(uploads(server), data)
    await eventually_closed([body])


async def test_early_answer_mid_file_bug_reproduces(
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    if not fix_needed("cancelled-upload-close"):
        pytest.skip(f"aiohttp {aiohttp.__version__} closes a half-sent connection")
    path, data = body_path(300_000)
    body = opened.add(GatedFile(path, block_read=2))
    with released():
        # Issue 7599: the follow-up hangs; a short timeout ends it.
        error = await _early_answer_mid_file(
            server, connections, body, aiohttp.ClientTimeout(total=2)
        )
    # 3.9.0-3.10.5: the half-sent connection went back to the pool, and the
    # server read the next request as the rest of the upload's body.
    assert error is not None
    assert connections.created == 1
    assert b"POST /next" in uploads(server)[0].body


# --------------------------------------------------------------------------
# The server closes the connection part-way through the upload.


@pytest.mark.parametrize("kind", KINDS, ids=_kid)
async def test_server_closes_mid_upload(
    kind: Kind,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """POST is not retried: a clear ClientError, and the session goes on."""
    path, data = body_path(1_000_000)
    server.script = [Reply(drop=True, answer_after=100_000)]
    body = kind.make(path, data)
    if kind.closes or kind.stays_open:
        opened.add(body)
    async with connections.session(timeout=SAFETY) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(server.url("/upload"), data=body) as resp:
                await resp.read()  # pragma: no cover - no answer comes
        await next_request_works(session, server)
        await check_body_object(kind, body, failed=True)
    await server.settle()
    assert_never_reused_in_doubt(server)
    [upload_request] = uploads(server)
    # (The raw server reads a chunked body whole before it drops.)
    assert upload_request.status is None
    assert_complete_bodies([upload_request], data)


@pytest.mark.parametrize("kind", FILE_KINDS, ids=_kid)
async def test_server_closes_mid_put_of_file(
    kind: Kind,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """PUT is retried once (3.10+): the retry carries the whole file, or the
    call fails clearly; never a truncated or empty body."""
    path, data = body_path(1_000_000)
    server.script = [Reply(drop=True, answer_after=100_000)]
    body = opened.add(kind.make(path, data))
    error: Optional[BaseException] = None
    async with connections.session(timeout=SAFETY) as session:
        try:
            async with session.put(server.url("/upload"), data=body) as resp:
                assert resp.status == 200
        except (ValueError, aiohttp.ClientError) as exc:
            error = exc
        await next_request_works(session, server)
        await check_body_object(kind, body)
    await server.settle()
    assert_never_reused_in_doubt(server)
    if UPSTREAM_TRUNCATES_RETRIES:
        assert error is None
        assert_retry_carries_the_rest(uploads(server), data)
        return
    assert_complete_bodies(uploads(server), data)
    if kind.stays_open and BYTESIO_CLOSED_AFTER_WRITE:
        assert isinstance(error, aiohttp_payloadfix.FileBodyError)
    elif AIOHTTP_VERSION >= (3, 10, 0):
        assert error is None
        assert uploads(server)[-1].complete
    else:
        assert isinstance(error, aiohttp.ClientError)


# --------------------------------------------------------------------------
# Timeouts.


@pytest.mark.parametrize("kind", KINDS, ids=_kid)
async def test_sock_read_timeout_server_never_answers(
    kind: Kind,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(200_000)
    server.script = [Hang()]
    body = kind.make(path, data)
    if kind.closes or kind.stays_open:
        opened.add(body)
    async with connections.session(timeout=SAFETY) as session:
        with pytest.raises(aiohttp.ServerTimeoutError):
            async with session.post(
                server.url("/upload"),
                data=body,
                timeout=aiohttp.ClientTimeout(total=30, sock_read=0.2),
            ):
                pass  # pragma: no cover - no answer comes
        await next_request_works(session, server)
        await check_body_object(kind, body, failed=True)
    await server.settle()
    assert_never_reused_in_doubt(server)
    # The whole body went out; the connection without an answer was dropped.
    assert [r.body for r in uploads(server)] == [data]
    assert [[r.target for r in c.requests] for c in server.connections] == [
        ["/upload"],
        ["/next"],
    ]


async def _total_timeout(
    kind: Kind,
    server: FaultServer,
    connections: ConnectionCounter,
    path: Path,
    data: bytes,
    opened: Opened,
) -> None:
    server.slow, server.pause = 1024, 0.01  # far slower than the timeout allows
    body = kind.make(path, data)
    if kind.closes or kind.stays_open:
        opened.add(body)
    async with connections.session(timeout=SAFETY) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(
                server.url("/upload"),
                data=body,
                timeout=aiohttp.ClientTimeout(total=0.3),
            ):
                pass  # pragma: no cover - the body never finishes
        server.give_up = True  # rather than read what the kernel buffered
        with contextlib.suppress(aiohttp.ClientError):
            await next_request_works(session, server)
        await check_body_object(kind, body, failed=True)
    await server.settle()


@pytest.mark.skipif(RESPONSE_CLOSE_POOLS, reason=POOLS_REASON)
@pytest.mark.parametrize("kind", KINDS, ids=_kid)
async def test_total_timeout_server_reads_slowly(
    kind: Kind,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(1_000_000)
    await _total_timeout(kind, server, connections, path, data, opened)
    assert_never_reused_in_doubt(server)
    [upload_request] = uploads(server)
    assert upload_request.status is None
    assert_complete_bodies([upload_request], data)
    assert [[r.target for r in c.requests] for c in server.connections] == [
        ["/upload"],
        ["/next"],
    ]


async def test_timed_out_connection_pooled_on_3_9_0(
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """Why the tests above skip 3.9.0: the timed-out upload's connection,
    its answer still owed, carries the next request."""
    if not RESPONSE_CLOSE_POOLS:
        pytest.skip(f"aiohttp {aiohttp.__version__} closes it")
    path, data = body_path(1_000_000)
    await _total_timeout(KINDS[0], server, connections, path, data, opened)
    assert connections.created == 1
    assert len(server.connections) == 1


# --------------------------------------------------------------------------
# A slow server: the client must wait for the socket to drain (backpressure).


@pytest.mark.parametrize("kind", ["open(rb)", "async generator"])
async def test_slow_server_50_mib(
    kind: str,
    server: FaultServer,
    connections: ConnectionCounter,
    tmp_path: Path,
    opened: Opened,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 50 * 2**20
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    path = tmp_path / "big.bin"
    with open(path, "wb") as out:
        for _ in range(size // len(block)):
            out.write(block)
    expected = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            expected.update(chunk)
    server.slow, server.pause = 2**16, 0.0002
    server.hash_bodies = True
    pauses: List[object] = []
    pause_writing = base_protocol.BaseProtocol.pause_writing

    def counted(self: base_protocol.BaseProtocol) -> None:
        pauses.append(self)
        pause_writing(self)

    monkeypatch.setattr(base_protocol.BaseProtocol, "pause_writing", counted)

    async def file_chunks() -> AsyncIterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(2**18):
                yield chunk

    body: Any
    headers = {"Content-Length": str(size)}
    if kind == "open(rb)":
        body = opened.add(open(path, "rb"))
    else:
        body = file_chunks()
    async with connections.session(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(server.url("/upload"), data=body, headers=headers) as r:
            assert r.status == 200
        await next_request_works(session, server)
    await server.settle()
    assert_never_reused_in_doubt(server)
    [upload_request] = uploads(server)
    digest = server.digest(upload_request)
    assert (digest.size, digest.sha256) == (size, expected.hexdigest())
    assert connections.created == 1
    # The client's transport told it to stop writing: backpressure happened.
    # (The server's own protocol is a StreamReaderProtocol, not counted.)
    assert pauses
    if kind == "open(rb)":
        await eventually_closed([body])
