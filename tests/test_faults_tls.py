"""Faults over TLS (issue 6): the same rules as test_faults.py, with a
trustme certificate on 127.0.0.1. A lost connection costs a handshake here,
so reuse matters most: sequential file uploads keep one connection."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path
from typing import AsyncIterator, Callable, List, Optional, Tuple

import aiohttp
import pytest
import pytest_asyncio
import trustme
from conftest import ConnectionCounter, Reply, fix_needed
from faults_support import (  # with the shared pytest fixtures
    SAFETY,
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
    wait_for,
)

from aiohttp_payloadfix._fix import AIOHTTP_VERSION


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


@pytest_asyncio.fixture
async def server(ca: trustme.CA) -> AsyncIterator[FaultServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    srv = FaultServer(tls=context)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


def session(
    connections: ConnectionCounter,
    context: ssl.SSLContext,
    timeout: aiohttp.ClientTimeout = SAFETY,
) -> aiohttp.ClientSession:
    return connections.session(
        connector=aiohttp.TCPConnector(ssl=context), timeout=timeout
    )


async def test_tls_sequential_file_uploads_one_connection(
    server: FaultServer,
    connections: ConnectionCounter,
    client_ssl: ssl.SSLContext,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(100_000)
    async with session(connections, client_ssl) as s:
        for _ in range(20):
            body = opened.add(open(path, "rb"))
            async with s.post(server.url("/upload"), data=body) as resp:
                assert resp.status == 200
    await server.settle()
    assert_never_reused_in_doubt(server)
    assert [r.body for r in server.requests] == [data] * 20
    assert connections.created == 1
    await eventually_closed(opened.files)


async def test_tls_sequential_file_uploads_bug_reproduces(
    server: FaultServer,
    connections: ConnectionCounter,
    client_ssl: ssl.SSLContext,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    if not fix_needed("file-payload-reuse") or AIOHTTP_VERSION < (3, 10, 6):
        pytest.skip("the race closes connections on 3.10.6-3.11.x only")
    path, data = body_path(100_000)
    with released():
        async with session(connections, client_ssl) as s:
            for _ in range(20):
                body = opened.add(open(path, "rb"))
                async with s.post(server.url("/upload"), data=body) as resp:
                    assert resp.status == 200
        await server.settle()
    assert [r.body for r in server.requests] == [data] * 20
    assert connections.created > 1  # a handshake per lost race


async def test_tls_early_answer_mid_file(
    server: FaultServer,
    connections: ConnectionCounter,
    client_ssl: ssl.SSLContext,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    """413 (keep-alive) after the head while the write waits at its second
    read: the connection is not reused; the gate opens after two more
    requests."""
    path, data = body_path(300_000)
    server.routes["/upload"] = Reply(status=413, answer_after=0)
    body = opened.add(GatedFile(path, block_read=2))
    async with session(connections, client_ssl) as s:
        async with s.post(server.url("/upload"), data=body) as resp:
            assert resp.status == 413
        await next_request_works(s, server)
        await next_request_works(s, server)
        body.gate.set()
        await eventually_closed([body])
    await server.settle()
    assert_never_reused_in_doubt(server)
    assert_complete_bodies([r for r in server.requests if r.target == "/upload"], data)


@pytest.mark.parametrize("stage", ["first read", "mid-body"])
async def test_tls_cancel_mid_file(
    stage: str,
    server: FaultServer,
    connections: ConnectionCounter,
    client_ssl: ssl.SSLContext,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(300_000)
    body = opened.add(GatedFile(path, block_read=1 if stage == "first read" else 2))
    async with session(connections, client_ssl) as s:

        async def upload() -> int:
            async with s.post(server.url("/upload"), data=body) as resp:
                return resp.status

        task = asyncio.ensure_future(upload())
        assert await wait_for(body.reached, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await next_request_works(s, server)
        body.gate.set()
        await next_request_works(s, server)
        await closed_after([body], failed=True)
    await server.settle()
    assert_never_reused_in_doubt(server)
    uploads = [r for r in server.requests if r.target == "/upload"]
    assert_complete_bodies(uploads, data)
    assert not any(r.complete for r in uploads)


#: Before Python 3.11, asyncio's TLS transport whose peer dropped the
#: connection is never marked closed (aiohttp's protocol has let go of it by
#: then), and warns "unclosed transport" when collected: not this package's
#: doing, and it happens with every fix reverted too.
OLD_SSLPROTO_WARNING = pytest.mark.filterwarnings(
    "ignore:unclosed transport <asyncio.sslproto:ResourceWarning"
    if sys.version_info < (3, 11)
    else "error"
)


@OLD_SSLPROTO_WARNING
@pytest.mark.skipif(
    AIOHTTP_VERSION < (3, 10, 0), reason="aiohttp retries a stale connection since 3.10"
)
async def test_tls_stale_connection_put_resends_whole_file(
    server: FaultServer,
    connections: ConnectionCounter,
    client_ssl: ssl.SSLContext,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(500_000)
    server.script = [Reply(), Reply(drop=True, answer_after=100_000)]
    body = opened.add(open(path, "rb"))
    async with session(connections, client_ssl) as s:
        async with s.get(server.url("/warm")) as resp:
            assert resp.status == 200
        async with s.put(server.url("/upload"), data=body) as resp:
            assert resp.status == 200
    await server.settle()
    assert_never_reused_in_doubt(server)
    uploads = [r for r in server.requests if r.target == "/upload"]
    if UPSTREAM_TRUNCATES_RETRIES:
        assert_retry_carries_the_rest(uploads, data)
    else:
        assert [r.status for r in uploads] == [None, 200]
        assert_complete_bodies(uploads, data)
        assert uploads[-1].body == data
    await eventually_closed([body])


async def test_tls_sock_read_timeout(
    server: FaultServer,
    connections: ConnectionCounter,
    client_ssl: ssl.SSLContext,
    body_path: Callable[[int], Tuple[Path, bytes]],
    opened: Opened,
) -> None:
    path, data = body_path(200_000)
    server.script = [Hang()]
    body = opened.add(open(path, "rb"))
    error: Optional[BaseException] = None
    async with session(connections, client_ssl) as s:
        try:
            async with s.post(
                server.url("/upload"),
                data=body,
                timeout=aiohttp.ClientTimeout(total=30, sock_read=0.2),
            ):
                pass  # pragma: no cover - no answer comes
        except aiohttp.ServerTimeoutError as exc:
            error = exc
        await next_request_works(s, server)
        await closed_after([body], failed=True)
    await server.settle()
    assert isinstance(error, aiohttp.ServerTimeoutError)
    assert_never_reused_in_doubt(server)
    targets: List[List[str]] = [
        [r.target for r in c.requests] for c in server.connections
    ]
    assert targets == [["/upload"], ["/next"]]
