"""expect-continue-close: a request whose body was never sent, because the
server answered an ``Expect: 100-continue`` with a final status, does not go
back to the pool.

Found by the desync property test (tests/test_desync.py). The server answers
413 right after the head and goes on reading the declared body, as RFC 9110
(section 10.1.1) allows. As released (3.9.0-3.14.3), the end of that answer
cancels the body write while it waits for the 100, and the connection is
pooled with the body unsent: the server reads the next request as the body.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio
from conftest import FixState, Reply, switched
from soak_support import CONTINUE, TrackingServer

from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix.fixes import by_id

FIX_ID = "expect-continue-close"
#: A safety net for a failing test; nothing waits for it.
SAFETY = aiohttp.ClientTimeout(total=30)
BODY = b"x" * 50  # shorter than the next request's head


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


class ContinueThen(Reply):
    """``100 Continue`` and the final answer in one write: the client parses
    both before its body write resumes."""

    def render(self) -> bytes:
        return CONTINUE + super().render()


ANSWERS = {
    "final-instead-of-100": Reply(status=413, answer_after=0),
    "100-and-final-at-once": ContinueThen(status=413, answer_after=0),
}


@pytest_asyncio.fixture
async def server() -> AsyncIterator[TrackingServer]:
    srv = TrackingServer()
    await srv.start()
    srv.no_continue.add("/upload")
    try:
        yield srv
    finally:
        await srv.close()


async def upload_then_next(
    server: TrackingServer, answer: str, desync: bool = False
) -> None:
    """The upload, then a GET on the same session; ``desync``: the GET may
    fail (the server took its head for body bytes)."""
    server.routes["/upload"] = ANSWERS[answer]
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=SAFETY) as session:
        async with session.post(
            server.url("/upload"), data=BODY, expect100=True
        ) as resp:
            assert resp.status == 413
        with contextlib.suppress(*((aiohttp.ClientError,) if desync else ())):
            async with session.get(server.url("/next")) as resp:
                await resp.read()
    await server.settle()


@contextlib.contextmanager
def released_behaviour() -> Iterator[None]:
    """aiohttp as released: before 3.10.6 cancelled-upload-close replaces the
    same code path and closes too, so it is reverted with this fix."""
    with switched("cancelled-upload-close", False), switched(FIX_ID, False):
        yield


@pytest.mark.parametrize("answer", sorted(ANSWERS))
async def test_unsent_body_closes_the_connection(
    answer: str, fixed: FixState, server: TrackingServer
) -> None:
    await upload_then_next(server, answer)
    server.assert_clean()
    upload, after = server.connections
    assert [(r.target, r.complete) for r in upload.requests] == [("/upload", False)]
    assert [(r.target, r.complete, r.status) for r in after.requests] == [
        ("/next", True, 200)
    ]


@pytest.mark.parametrize("answer", sorted(ANSWERS))
async def test_bug_reproduces_unfixed(answer: str, server: TrackingServer) -> None:
    if AIOHTTP_VERSION >= (3, 14, 4):
        pytest.skip("fixed upstream in aiohttp 3.14.4")
    with released_behaviour():
        await upload_then_next(server, answer, desync=True)
    # The next request's head was read as the body; the rest is garbage.
    assert any("not a request line" in f for f in server.failures)
    conn = server.connections[0]
    assert conn.requests[0].body.startswith(b"GET /next HTTP/1.1\r\n")


def test_probe_matches_the_release() -> None:
    """Needed until 3.14.4, where aiohttp closes the connection itself."""
    needed = by_id(FIX_ID).probe() is not None
    assert needed == (AIOHTTP_VERSION < (3, 14, 4))
