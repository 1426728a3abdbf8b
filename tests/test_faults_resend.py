"""Faults that make aiohttp send a file body again (issue 6): a stale pooled
connection (aiohttp >= 3.10 retries PUT and DELETE once), 307/308 redirects,
and both in one call. The rule: every attempt that reached the server
complete carried the whole body, and the call ends with a correct response
or a clear error, never a truncated or empty body.

test_file_payload_reuse.py holds the first cases (PUT of a file on a stale
connection, POST redirects); these extend them to DELETE, text files, BytesIO,
pipes, early answers and a redirect whose target connection is stale.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Tuple,
)

import aiohttp
import pytest
from conftest import ConnectionCounter, RawRequest, Reply, content, fix_needed
from faults_support import (  # with the shared pytest fixtures
    SAFETY,
    UPSTREAM_TRUNCATES_RETRIES,
    FaultServer,
    Opened,
    QueuedRoutes,
    assert_complete_bodies,
    assert_never_reused_in_doubt,
    eventually_closed,
    next_request_works,
    opened,
    released,
    server,
)

import aiohttp_payloadfix
from aiohttp_payloadfix._fix import AIOHTTP_VERSION

RETRIES = AIOHTTP_VERSION >= (3, 10, 0)
RESEND_FIX = "file-resend" if AIOHTTP_VERSION >= (3, 12, 0) else "file-payload-reuse"
#: 3.12.0-3.12.7 close a BytesIO body after its first write.
BYTESIO_CLOSED_AFTER_WRITE = (3, 12, 0) <= AIOHTTP_VERSION < (3, 12, 8)
UNTOUCHED_RETRY = (
    f"aiohttp {aiohttp.__version__} retries a file with what the first attempt"
    " left of it (fixed upstream in 3.14.4; the package changes nothing on 3.13+)"
)

Opener = Callable[[Path], IO[Any]]


def _binary(path: Path) -> IO[Any]:
    return open(path, "rb")


def _text(path: Path) -> IO[Any]:
    return open(path, encoding="utf-8")


def _bytesio(path: Path) -> IO[Any]:
    return io.BytesIO(path.read_bytes())


OPENERS: Dict[str, Opener] = {
    "open(rb)": _binary,
    "open(r)": _text,
    "BytesIO": _bytesio,
}


def to(server: FaultServer, target: str) -> List[RawRequest]:
    return [r for r in server.requests if r.target == target]


async def after_call(body: IO[Any]) -> None:
    """A file the call closes is closed; a BytesIO is left open (but
    3.12.0-3.12.7 close it after writing it)."""
    if isinstance(body, io.BytesIO):
        assert body.closed == BYTESIO_CLOSED_AFTER_WRITE
    else:
        await eventually_closed([body])


async def call(
    server: FaultServer,
    connections: ConnectionCounter,
    method: str,
    body: IO[Any],
    *,
    warm: bool,
) -> Optional[BaseException]:
    """``method /upload`` with ``body`` (after a GET that leaves a pooled
    connection if ``warm``), then a follow-up on the same session."""
    error: Optional[BaseException] = None
    async with connections.session(timeout=SAFETY) as session:
        if warm:
            async with session.get(server.url("/warm")) as resp:
                assert resp.status == 200
        try:
            async with session.request(method, server.url("/upload"), data=body) as r:
                assert r.status == 200
                await r.read()
        except (ValueError, aiohttp.ClientError) as exc:
            error = exc
        await next_request_works(session, server)
    await server.settle()
    return error


def assert_closed_bytesio_error(error: Optional[BaseException]) -> None:
    """3.12.0-3.12.7 closed the BytesIO after the first write: the resend
    fails. With FileBodyError when the file was closed before the resend was
    built; when the redirect came before the first write had ended (and
    closed it), with aiohttp's own "I/O operation on closed file"."""
    if isinstance(error, aiohttp_payloadfix.FileBodyError):
        assert "closed" in str(error)
    else:
        assert isinstance(error, aiohttp.ClientConnectionError)
        assert "closed file" in str(error)


# --------------------------------------------------------------------------
# A stale pooled connection.


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
@pytest.mark.parametrize("cut", [None, 100_000], ids=["after the body", "mid-body"])
async def test_stale_connection_resend(
    method: str,
    opener: Opener,
    cut: Optional[int],
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """The server drops the kept-alive connection when the upload arrives on
    it (after reading all of it, or part of it)."""
    if UPSTREAM_TRUNCATES_RETRIES:
        pytest.skip(UNTOUCHED_RETRY)
    path, data = body_path(500_000)
    server.script = [Reply(), Reply(drop=True, answer_after=cut)]
    body = opened.add(opener(path))
    error = await call(server, connections, method, body, warm=True)
    assert_never_reused_in_doubt(server)
    assert_complete_bodies(to(server, "/upload"), data)
    if not RETRIES:
        assert isinstance(
            error, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
        )
    elif opener is _bytesio and BYTESIO_CLOSED_AFTER_WRITE:
        assert_closed_bytesio_error(error)
    else:
        assert error is None
        first, retry = to(server, "/upload")
        assert (first.status, retry.status) == (None, 200)
        assert retry.body == data
    await after_call(body)


@pytest.mark.skipif(not RETRIES, reason="aiohttp retries a stale connection since 3.10")
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
async def test_stale_connection_resend_bug_reproduces(
    method: str,
    opener: Opener,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    if not (fix_needed(RESEND_FIX) or UPSTREAM_TRUNCATES_RETRIES):
        pytest.skip(f"aiohttp {aiohttp.__version__} resends the whole file")
    path, data = body_path(500_000)
    server.script = [Reply(), Reply(drop=True)]
    body = opened.add(opener(path))
    with released():
        error = await call(server, connections, method, body, warm=True)
    retried = [r.body for r in to(server, "/upload")[1:]]
    # As released: the retry fails ("I/O operation on closed file") or
    # carries what the first attempt left of the file (nothing).
    assert error is not None or retried != [data]


async def test_stale_connection_pipe_is_a_clear_error(
    server: FaultServer, connections: ConnectionCounter, opened: Opened
) -> None:
    if UPSTREAM_TRUNCATES_RETRIES:
        pytest.skip(UNTOUCHED_RETRY)
    data = content(4096)  # fits in the pipe's buffer
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    body = opened.add(open(read_fd, "rb"))
    server.script = [Reply(), Reply(drop=True)]
    error = await call(server, connections, "PUT", body, warm=True)
    assert_never_reused_in_doubt(server)
    assert [r.body for r in to(server, "/upload")] == [data]
    # Never resent empty: the pipe cannot be read again.
    assert error is not None
    if RETRIES and fix_needed(RESEND_FIX):
        assert isinstance(error, aiohttp_payloadfix.FileBodyError)
        assert "seekable" in str(error)
    if aiohttp_payloadfix.is_applied(RESEND_FIX):
        # (3.14.5, untouched, leaves this pipe open after the failed retry.)
        await eventually_closed([body])


# --------------------------------------------------------------------------
# 307/308.


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
@pytest.mark.parametrize("early", [False, True], ids=["after the body", "early"])
async def test_redirected_put(
    status: int,
    opener: Opener,
    early: bool,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """A PUT redirected after its body, or before the server read any of it
    (the redirected request is built while the first write may still run)."""
    path, data = body_path(500_000)
    server.routes["/upload"] = Reply(
        status=status, headers=(("Location", "/to"),), answer_after=0 if early else None
    )
    body = opened.add(opener(path))
    error: Optional[BaseException] = None
    async with connections.session(timeout=SAFETY) as session:
        try:
            async with session.put(server.url("/upload"), data=body) as resp:
                assert resp.status == 200
        except (ValueError, aiohttp.ClientError) as exc:
            error = exc
        await next_request_works(session, server)
    await server.settle()
    assert_never_reused_in_doubt(server)
    assert_complete_bodies([r for r in server.requests if r.target != "/next"], data)
    if opener is _bytesio and BYTESIO_CLOSED_AFTER_WRITE:
        assert_closed_bytesio_error(error)
        assert [r.complete for r in to(server, "/to")] in ([], [False])
    else:
        assert error is None
        assert [(r.status, r.body) for r in to(server, "/to")] == [(200, data)]
    await after_call(body)


@pytest.mark.skipif(not RETRIES, reason="aiohttp retries a stale connection since 3.10")
@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
async def test_redirect_then_stale_connection(
    opener: Opener,
    server: FaultServer,
    connections: ConnectionCounter,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """One call sends the body three times: the 307, the redirected request on
    the same (now stale) connection, which the server drops, and its retry."""
    path, data = body_path(500_000)
    server.routes = QueuedRoutes(
        {
            "/upload": [Reply(status=307, headers=(("Location", "/to"),))],
            "/to": [Reply(drop=True, answer_after=100_000)],
        }
    )
    body = opened.add(opener(path))
    error = await call(server, connections, "PUT", body, warm=False)
    assert_never_reused_in_doubt(server)
    assert_complete_bodies([r for r in server.requests if r.target != "/next"], data)
    if opener is _bytesio and BYTESIO_CLOSED_AFTER_WRITE:
        assert_closed_bytesio_error(error)
    else:
        assert error is None
        assert [r.status for r in to(server, "/to")] == [None, 200]
        assert to(server, "/to")[-1].body == data
    await after_call(body)
