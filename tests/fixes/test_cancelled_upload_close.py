"""cancelled-upload-close: a body write cut short never ends the message and
never goes back to the pool.

aio-libs/aiohttp#7599, fixed by PR #8992 in 3.10.6. On 3.9.0-3.10.5, when the
body write task is cancelled part-way (aiohttp cancels it when the response
reaches its end while the body is still being sent), ``write_bytes`` swallows
the cancellation and writes the end of the message: for a chunked body the
terminating ``0`` chunk, so the server takes a truncated body as complete; and
the half-sent connection goes back to the pool, where the next request is read
by the server as the rest of the previous body (issue 7599: it times out when
that rest is longer than the request).

Reproduced here with the strict raw server of conftest, which answers early
(after the request head, or after the first body bytes) while the body, an
async generator, is stalled; then a second request goes out on the same
session. Each scenario runs with this fix and file-payload-reuse, which it
requires, and the other fixes reverted (short-body-error also closes a
Content-Length connection left short), so that it shows what this fix does;
and with every fix reverted, as aiohttp was released.

What cannot be made to fail: a write cancelled after its last body byte
(the generator stalls before it ends). 3.10.5 then ends the message and reuses
the connection, which is harmless because the body is complete; the fix, like
3.10.6, closes the connection because the client cannot know that.
"""

from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional

import aiohttp
import pytest
from conftest import (
    PATCHED_CLASSES,
    ConnectionCounter,
    FixState,
    RawHTTPServer,
    RawRequest,
    Reply,
    WebServer,
    content,
)

import aiohttp_payloadfix
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import LEDGER, MARKER
from aiohttp_payloadfix.fixes import by_id

FIX_ID = "cancelled-upload-close"
#: The follow-up request. Its request line, "POST /next", is 10 bytes: what a
#: server still owed REST body bytes reads as the end of the previous body.
NEXT_BODY = b"next request"
REST = len(b"POST /next")
#: Bounds a hang in a failing test; nothing is asserted about time.
SAFETY = aiohttp.ClientTimeout(total=20)
#: 3.12 sends the request head together with the first body chunk: a body
#: that stalls before its first byte stalls the head too, and the server
#: cannot answer early.
HEAD_WAITS_FOR_BODY = AIOHTTP_VERSION >= (3, 12, 0)


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


def only(*fix_ids: str) -> None:
    """Revert every applied fix but ``fix_ids`` and what they require (this
    fix requires file-payload-reuse, which only touches file bodies); the
    ``fixed``/``unfixed`` fixture puts them back after the test."""
    keep = {r for i in fix_ids for r in (i, *by_id(i).requires)}
    others = [i for i in LEDGER.applied() if i not in keep]
    if others:
        aiohttp_payloadfix.revert(others)
    assert set(LEDGER.applied()) <= keep


# --------------------------------------------------------------------------
# A body that stalls, and the scenario around it.


@dataclass
class StalledBody:
    """An async generator body: ``sent`` bytes of ``data``, then it waits
    until cancelled (the rest is never produced)."""

    data: bytes
    sent: int
    cancelled: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.sent:
            yield self.data[: self.sent]
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        yield self.data[self.sent :]  # pragma: no cover - never resumed


#: Where the write is when the response cuts it short.
POINTS = ("before the first byte", "mid-body")


@dataclass
class Scenario:
    framing: str  # "chunked" or "content-length"
    point: str
    #: The server answers with "Connection: close".
    close: bool = False

    @property
    def chunked(self) -> bool:
        return self.framing == "chunked"

    def body(self) -> StalledBody:
        sent = 0 if self.point == "before the first byte" else 1000
        if self.point == "after the body":
            return StalledBody(content(3000), 3000)
        if self.chunked:
            return StalledBody(content(3000), sent)
        # Content-Length: the server still owes REST bytes after the stall.
        return StalledBody(content(sent + REST), sent)

    def reply(self, body: StalledBody) -> Reply:
        # A chunked body can only be answered after its head; a
        # Content-Length body after exactly the bytes that were sent.
        return Reply(answer_after=0 if self.chunked else body.sent, close=self.close)


@dataclass
class Outcome:
    body: StalledBody
    #: The cut-short upload, as the server saw it.
    upload: RawRequest
    #: Index of the server connection each request arrived on.
    where: Dict[str, int]
    connections_opened: int
    #: What the follow-up request raised, if anything.
    error: Optional[BaseException] = None
    responses: List[int] = field(default_factory=list)


async def run(
    scenario: Scenario, raw_server: RawHTTPServer, connections: ConnectionCounter
) -> Outcome:
    body = scenario.body()
    raw_server.routes["/upload"] = scenario.reply(body)
    headers = None
    if not scenario.chunked:
        headers = {"Content-Length": str(len(body.data))}
    error: Optional[BaseException] = None
    responses: List[int] = []
    async with connections.session(timeout=SAFETY) as session:
        async with session.post(
            raw_server.url("/upload"), data=body.chunks(), headers=headers
        ) as resp:
            responses.append(resp.status)
            assert await resp.read() == b""
        try:
            async with session.post(raw_server.url("/next"), data=NEXT_BODY) as resp:
                responses.append(resp.status)
                await resp.read()
        except aiohttp.ClientError as exc:
            error = exc
    await raw_server.settle()
    where = {
        r.target: index
        for index, conn in enumerate(raw_server.connections)
        for r in conn.requests
    }
    [upload] = [r for r in raw_server.requests if r.target == "/upload"]
    return Outcome(body, upload, where, connections.created, error, responses)


def assert_closed_cleanly(outcome: Outcome) -> None:
    """What the fix promises: the connection of the cut-short upload is
    closed without ending the message, and the next request is unharmed."""
    body, upload = outcome.body, outcome.upload
    assert body.cancelled
    assert outcome.error is None
    assert outcome.responses == [200, 200]
    # Never a truncated body that the server takes as complete.
    assert not upload.complete
    assert upload.body == body.data[: body.sent]
    # The follow-up went on a new connection.
    assert outcome.connections_opened == 2
    assert outcome.where == {"/upload": 0, "/next": 1}


SCENARIOS = [
    Scenario(framing, point)
    for framing in ("chunked", "content-length")
    for point in POINTS
]


def _ids(scenario: Scenario) -> str:
    return f"{scenario.framing}, {scenario.point}"


def skip_if_head_waits(scenario: Scenario) -> None:
    head_waits = HEAD_WAITS_FOR_BODY or LEDGER.is_applied("coalesced-headers")
    if head_waits and scenario.point == "before the first byte":
        pytest.skip(
            "3.12 (and coalesced-headers) send the head with the first body"
            " chunk: nothing to answer before the body starts"
        )


# --------------------------------------------------------------------------
# The response ends while the body is being written.


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
async def test_cut_short_upload_closes_connection(
    scenario: Scenario,
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
) -> None:
    only(FIX_ID)
    skip_if_head_waits(scenario)
    outcome = await run(scenario, raw_server, connections)
    raw_server.assert_clean()
    assert_closed_cleanly(outcome)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
async def test_cut_short_upload_bug_reproduces(
    scenario: Scenario,
    unfixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
) -> None:
    only()
    skip_if_head_waits(scenario)
    outcome = await run(scenario, raw_server, connections)
    if not unfixed.needed:
        # 3.10.6 and newer close the connection themselves.
        raw_server.assert_clean()
        assert_closed_cleanly(outcome)
        return
    body, upload = outcome.body, outcome.upload
    # The half-sent connection went back to the pool and was used again.
    assert outcome.connections_opened == 1
    if scenario.chunked:
        # The terminating chunk made the truncated body look complete.
        assert upload.complete
        assert upload.body == body.data[: body.sent]
        assert len(upload.body) < len(body.data)
        assert outcome.where == {"/upload": 0, "/next": 0}
        raw_server.assert_clean()
    else:
        # The server read the next request line as the rest of the body and
        # the remainder of that request as garbage.
        assert upload.body == body.data[: body.sent] + b"POST /next"
        assert raw_server.failures != []
        assert isinstance(outcome.error, aiohttp.ServerDisconnectedError)


@pytest.mark.parametrize("point", POINTS)
async def test_cut_short_chunked_upload_with_every_fix(
    point: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
) -> None:
    """The same with the package as imported (every fix it applies)."""
    scenario = Scenario("chunked", point)
    skip_if_head_waits(scenario)
    outcome = await run(scenario, raw_server, connections)
    raw_server.assert_clean()
    assert_closed_cleanly(outcome)


@pytest.mark.parametrize("point", POINTS)
async def test_truncated_chunked_body_not_ended_when_server_closes(
    point: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
) -> None:
    """The server answers with "Connection: close": the connection is not
    reused either way, but 3.9.0-3.10.5 still end the truncated body with the
    terminating chunk, and the server takes it as complete."""
    scenario = Scenario("chunked", point, close=True)
    only(FIX_ID)
    skip_if_head_waits(scenario)
    outcome = await run(scenario, raw_server, connections)
    raw_server.assert_clean()
    assert_closed_cleanly(outcome)


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_cut_after_the_last_byte(
    framing: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
) -> None:
    """All of the body is out, the generator has not ended yet. Harmless
    with the fix and without it: the server gets the whole body and the next
    request is unharmed (the connection may or may not be reused)."""
    only(FIX_ID)
    outcome = await run(Scenario(framing, "after the body"), raw_server, connections)
    raw_server.assert_clean()
    assert outcome.error is None
    assert outcome.responses == [200, 200]
    assert outcome.upload.body == outcome.body.data
    if not outcome.upload.complete:
        # Cut before the terminating chunk: that connection was not reused.
        assert framing == "chunked"
        assert outcome.where["/next"] != outcome.where["/upload"]


# --------------------------------------------------------------------------
# A file body, cut short while a read is pending in the executor.


class GatedFile(io.BufferedReader):
    """A file whose second read blocks (in its executor thread) until the
    test opens the gate, so that the answer comes while the write is
    mid-body."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.gate = gate
        self.reads = 0
        self.blocked = threading.Event()

    def read(self, size: Optional[int] = -1, /) -> bytes:
        self.reads += 1
        if self.reads == 2:
            self.blocked.set()
            self.gate.wait(timeout=30)
        return super().read(size)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # free the executor thread whatever the test did


async def test_cut_short_file_upload_closes_connection(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    tmp_path: Path,
    gate: threading.Event,
) -> None:
    """A file body goes through file-payload-reuse's write on 3.9.0-3.11."""
    only(FIX_ID)  # with file-payload-reuse, which it requires
    first = 2**16  # one read's worth goes out before the gated read
    data = content(first + REST)
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    raw_server.routes["/upload"] = Reply(status=413, answer_after=first)
    f = GatedFile(path, gate)
    error: Optional[BaseException] = None
    try:
        async with connections.session(timeout=SAFETY) as session:
            async with session.post(raw_server.url("/upload"), data=f) as resp:
                assert resp.status == 413
            try:
                async with session.post(
                    raw_server.url("/next"), data=NEXT_BODY
                ) as resp:
                    assert resp.status == 200
            except aiohttp.ClientError as exc:
                error = exc
        await raw_server.settle()
    finally:
        gate.set()
        f.close()
    raw_server.assert_clean()
    assert error is None
    upload, follow_up = raw_server.requests
    assert (follow_up.target, follow_up.body) == ("/next", NEXT_BODY)
    if upload.complete:
        # Only where the write was not cut short: 3.12.0-3.12.8 as released
        # read the whole file at once, before the answer.
        assert not f.blocked.is_set()
        assert upload.body == data
    else:
        # Cut short mid-body (at the gated read, or while draining the
        # first chunk): a prefix went out, and that connection was closed.
        assert 0 < len(upload.body) < len(data)
        assert upload.body == data[: len(upload.body)]
        assert connections.created == 2


# --------------------------------------------------------------------------
# What the caller sees.


async def test_release_and_wait_for_close_do_not_raise(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
) -> None:
    """On 3.9.0-3.10.5 ``read()``, ``release()`` and ``wait_for_close()``
    await the write task: the cancellation must not reach the caller."""
    only(FIX_ID)
    raw_server.routes["/upload"] = Reply(body=b"early", answer_after=0)
    body = StalledBody(content(3000), 1000)
    async with connections.session(timeout=SAFETY) as session:
        resp = await session.post(raw_server.url("/upload"), data=body.chunks())
        assert resp.status == 200
        assert await resp.read() == b"early"
        resp.release()
        await resp.wait_for_close()
        assert body.cancelled
        async with session.post(raw_server.url("/next"), data=NEXT_BODY) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    upload, follow_up = raw_server.requests
    assert not upload.complete
    assert (follow_up.target, follow_up.body) == ("/next", NEXT_BODY)
    assert connections.created == 2


def write_tasks() -> List[asyncio.Task[Any]]:
    """The running body write tasks (whichever fix wraps write_bytes)."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__name__", None) == "write_bytes"
    ]


async def cancel_waiting_caller(
    raw_server: RawHTTPServer, connections: ConnectionCounter
) -> List[object]:
    """The caller's task is cancelled while the body is stalled and the server
    has not answered. Returns how each body write task ended (its result or
    exception), retrieved here so that none is left unretrieved."""
    raw_server.routes["/upload"] = Reply()  # answers after the whole body
    body = StalledBody(content(3000), 1000)
    async with connections.session(timeout=SAFETY) as session:

        async def upload() -> None:
            async with session.post(raw_server.url("/upload"), data=body.chunks()):
                pass  # pragma: no cover - the server never answers

        task = asyncio.ensure_future(upload())
        for _ in range(5000):  # until the first body bytes have arrived
            if raw_server.requests and raw_server.requests[0].body:
                break
            await asyncio.sleep(0.001)
        writes = write_tasks()
        assert len(writes) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        outcomes: List[object] = list(
            await asyncio.gather(*writes, return_exceptions=True)
        )
        async with session.post(raw_server.url("/next"), data=NEXT_BODY) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert not raw_server.requests[0].complete
    assert connections.created == 2
    return outcomes


async def test_cancelled_caller_leaves_no_failed_write(
    fixed: FixState, raw_server: RawHTTPServer, connections: ConnectionCounter
) -> None:
    """Swallowing the cancellation inside the write task does not swallow the
    caller's own: it still gets CancelledError. And the write task does not
    end with an exception nobody retrieves ("Task exception was never
    retrieved": ConnectionResetError from writing the end of a chunked body
    to the connection the cancelled request closed)."""
    only(FIX_ID)
    [outcome] = await cancel_waiting_caller(raw_server, connections)
    # None here; 3.10.6+ let the CancelledError out of the task.
    assert outcome is None or isinstance(outcome, asyncio.CancelledError)


async def test_cancelled_caller_bug_reproduces(
    unfixed: FixState, raw_server: RawHTTPServer, connections: ConnectionCounter
) -> None:
    only()
    [outcome] = await cancel_waiting_caller(raw_server, connections)
    if unfixed.needed:
        assert isinstance(outcome, ConnectionResetError)
    else:
        assert isinstance(outcome, asyncio.CancelledError)


# --------------------------------------------------------------------------
# The interplay with file-payload-reuse.


async def test_sequential_file_uploads_keep_one_connection(
    fixed: FixState,
    web_server: WebServer,
    connections: ConnectionCounter,
    tmp_path: Path,
) -> None:
    """Closing a connection on a cancelled write is what turned the file
    payload's race into a new connection per upload in 3.10.6: with the
    package as imported (file-payload-reuse with it) that must not happen."""
    data = content(100_000)
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    files = []
    async with connections.session(timeout=SAFETY) as session:
        for _ in range(20):
            f = open(path, "rb")
            files.append(f)
            async with session.post(web_server.url / "upload", data=f) as resp:
                assert resp.status == 200
    for f in files:
        for _ in range(5000):
            if f.closed:
                break
            await asyncio.sleep(0.001)
        f.close()
    assert web_server.received == [("POST", "/upload", data)] * 20
    assert connections.created == 1


def test_unaffected_release_is_left_alone(fixed: FixState) -> None:
    patched = sorted(
        f"{cls.__qualname__}.{name}"
        for cls in PATCHED_CLASSES
        for name, value in vars(cls).items()
        if any(
            getattr(getattr(v, "__func__", v), MARKER, None) == FIX_ID
            for v in _wrapper_chain(value)
        )
    )
    if fixed.needed:
        assert aiohttp_payloadfix.is_applied(FIX_ID)
        assert patched == ["ClientRequest.write_bytes"]
    else:
        # 3.10.6+ close the connection themselves (PR #8992).
        assert not aiohttp_payloadfix.is_applied(FIX_ID)
        assert patched == []


def _wrapper_chain(value: object) -> Iterator[object]:
    """``value`` and what it wraps (later fixes wrap write_bytes again)."""
    for _ in range(20):
        yield value
        value = getattr(getattr(value, "__func__", value), "__wrapped__", None)
        if value is None:
            return
