"""short-body-error: a body shorter than its Content-Length fails at once.

As released, every aiohttp waits for the server, which waits for the rest of
the body, until the total timeout (300 s by default) and then reports a bare
TimeoutError. Here the server never answers a short upload (it waits for the
rest, like a real one), and the client has a 30 s safety timeout: only a
prompt ContentLengthError passes, nothing is asserted about time.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Iterator, List, Tuple

import aiohttp
import pytest
import pytest_asyncio
from conftest import ConnectionCounter, FixState, RawConnection, RawHTTPServer, Reply

import aiohttp_payloadfix
from aiohttp_payloadfix import ContentLengthError

from .contract_support import SIZED, HoldingServer, holding_server, names_sent
from .test_content_length_limit import KIND_BY_NAME, KINDS, Ctx, Kind, body_bytes

FIX_ID = "short-body-error"
#: A safety net for a failing test (the fix reverted): nothing waits for it.
SAFETY = aiohttp.ClientTimeout(total=30)
#: (body size, bytes missing from the declared length)
SHORTFALLS = [(0, 1), (1, 65536), (70_000, 1)]


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    context = Ctx(tmp_path, monkeypatch, [])
    yield context
    for f in context.opened:
        f.close()


@pytest_asyncio.fixture
async def held() -> AsyncIterator[HoldingServer]:
    """A raw server that never answers ``/upload``."""
    async with holding_server() as server:
        yield server


def uploads(conn: RawConnection) -> List[Tuple[str, bool]]:
    return [(r.target, r.complete) for r in conn.requests]


async def next_request(session: aiohttp.ClientSession, server: RawHTTPServer) -> None:
    async with session.post(server.url("/next"), data=b"next") as resp:
        assert resp.status == 200


def assert_discarded(server: RawHTTPServer, connections: ConnectionCounter) -> bytes:
    """The short upload's connection was closed, the next request had a new
    one, nothing on the wire was garbage; returns the upload's body bytes."""
    server.assert_clean()
    assert connections.created == 2
    first, second = server.connections
    # 3.12+ sends the head with the first body byte: none, no head.
    assert uploads(first) in ([], [("/upload", False)])
    assert [(r.target, r.body, r.complete) for r in second.requests] == [
        ("/next", b"next", True)
    ]
    return b"".join(r.body for r in first.requests)


# --------------------------------------------------------------------------
# Every kind of body.


def short_params() -> Iterator[Any]:
    for kind in KINDS:
        for size, missing in SHORTFALLS:
            yield pytest.param(kind, size, missing, id=f"{kind.name}-{size}-{missing}")


@pytest.mark.parametrize(("kind", "size", "missing"), list(short_params()))
async def test_short_body_fails_at_once(
    kind: Kind,
    size: int,
    missing: int,
    fixed: FixState,
    held: HoldingServer,
    connections: ConnectionCounter,
    ctx: Ctx,
) -> None:
    size -= size % kind.granularity
    body = await kind.make(body_bytes(size, size), ctx)
    declared = len(body.wire) + missing
    async with connections.session(timeout=SAFETY, **body.session) as session:
        with pytest.raises(ContentLengthError) as info:
            async with session.post(
                held.url("/upload"),
                headers={"Content-Length": str(declared)},
                **body.request,
            ):
                pass  # pragma: no cover
        await next_request(session, held)
    await held.settle()
    message = str(info.value)
    assert isinstance(info.value, aiohttp.ClientConnectionError)
    assert f"declared {declared} bytes" in message
    assert names_sent(message, len(body.wire)), message
    assert re.search(r"\b[A-Z]\w*(?:Payload|Writer)\b", message)  # the body type
    sent = assert_discarded(held, connections)
    if kind.name in SIZED:
        assert sent == b""  # refused before any body byte
    else:
        assert body.wire.startswith(sent)


@pytest.mark.parametrize("name", ["bytes", "async-generator"])
async def test_short_body_hangs_as_released(
    name: str, unfixed: FixState, raw_server: RawHTTPServer, ctx: Ctx
) -> None:
    """Without the fix the client waits for an answer that cannot come."""
    body = await KIND_BY_NAME[name].make(b"0123456789", ctx)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=0.3)
    ) as session:
        with pytest.raises(asyncio.TimeoutError) as info:
            async with session.post(
                raw_server.url("/upload"),
                headers={"Content-Length": "11"},
                **body.request,
            ):
                pass  # pragma: no cover
    assert not isinstance(info.value, ContentLengthError)
    await raw_server.settle()
    raw_server.assert_clean()


# --------------------------------------------------------------------------
# The length changes, or the server does not wait.


async def test_file_shrunk_after_the_request_is_built(
    fixed: FixState,
    held: HoldingServer,
    connections: ConnectionCounter,
    tmp_path: Path,
) -> None:
    """Content-Length is taken from the file when the request is built; the
    file is cut to 400 bytes once the connection is open, before the body
    is written."""
    path = tmp_path / "shrinks.bin"
    path.write_bytes(body_bytes(1000, 1000))

    async def shrink(*_args: Any) -> None:
        os.truncate(path, 400)

    connections.trace_config.on_connection_create_end.append(shrink)
    with open(path, "rb") as f:
        async with connections.session(timeout=SAFETY) as session:
            with pytest.raises(ContentLengthError) as info:
                async with session.post(held.url("/upload"), data=f):
                    pass  # pragma: no cover
            await next_request(session, held)
    await held.settle()
    message = str(info.value)
    assert "declared 1000 bytes" in message
    assert names_sent(message, 400), message
    assert assert_discarded(held, connections) == b""


async def test_generator_ending_early(
    fixed: FixState, held: HoldingServer, connections: ConnectionCounter
) -> None:
    """A generator stops after 3 of the 5 chunks its caller counted on."""
    pulled: List[int] = []

    async def chunks() -> AsyncGenerator[bytes, None]:
        for i in range(3):
            pulled.append(i)
            yield b"%d" % i * 1000

    async with connections.session(timeout=SAFETY) as session:
        with pytest.raises(ContentLengthError) as info:
            async with session.post(
                held.url("/upload"),
                data=chunks(),
                headers={"Content-Length": "5000"},
            ):
                pass  # pragma: no cover
        await next_request(session, held)
    await held.settle()
    assert "declared 5000 bytes" in str(info.value)
    assert names_sent(str(info.value), 3000)
    assert assert_discarded(held, connections) == b"0" * 1000 + b"1" * 1000 + (
        b"2" * 1000
    )
    assert pulled == [0, 1, 2]


@pytest.mark.parametrize("name", ["bytes", "open-rb", "async-generator"])
async def test_short_body_after_expect_continue(
    name: str,
    fixed: FixState,
    held: HoldingServer,
    connections: ConnectionCounter,
    ctx: Ctx,
) -> None:
    body = await KIND_BY_NAME[name].make(body_bytes(70_000, 70_000), ctx)
    declared = len(body.wire) + 1
    async with connections.session(timeout=SAFETY) as session:
        with pytest.raises(ContentLengthError) as info:
            async with session.post(
                held.url("/upload"),
                headers={"Content-Length": str(declared)},
                expect100=True,
                **body.request,
            ):
                pass  # pragma: no cover
        await next_request(session, held)
    await held.settle()
    assert f"declared {declared} bytes" in str(info.value)
    sent = assert_discarded(held, connections)
    assert [r.header("Expect") for r in held.connections[0].requests] in (
        [],
        ["100-continue"],
    )
    assert sent == (b"" if name in SIZED else body.wire)


async def test_server_answering_early_gets_its_answer(
    fixed: FixState, raw_server: RawHTTPServer, connections: ConnectionCounter
) -> None:
    """The server answers 413 after the head, without reading the body, while
    the body (shorter than declared) is still being produced: the caller gets
    the 413, the body is not pulled further, the socket is discarded."""
    raw_server.routes["/upload"] = Reply(status=413, answer_after=0, body=b"too large")
    never = asyncio.Event()
    pulled: List[str] = []

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            pulled.append("x")
            yield b"x" * 100
            await never.wait()
            pulled.append("y")  # pragma: no cover
            yield b"y" * 100  # pragma: no cover
        finally:
            pulled.append("closed")

    generator = chunks()
    async with connections.session(timeout=SAFETY) as session:
        async with session.post(
            raw_server.url("/upload"),
            data=generator,
            headers={"Content-Length": "1000"},
        ) as resp:
            assert resp.status == 413
            assert await resp.read() == b"too large"
        await next_request(session, raw_server)
    await raw_server.settle()
    assert pulled == ["x", "closed"]  # not left suspended
    raw_server.assert_clean()
    assert connections.created == 2
    first, second = raw_server.connections
    [upload] = first.requests
    assert (upload.status, upload.complete) == (413, False)
    assert upload.body in (b"", b"x" * 100)
    assert [r.target for r in second.requests] == ["/next"]


# --------------------------------------------------------------------------
# What stays as it was.


@pytest.mark.parametrize("name", ["bytes", "open-rb", "async-generator", "streamer"])
async def test_exact_length_keeps_the_connection(
    name: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    ctx: Ctx,
) -> None:
    async with connections.session(timeout=SAFETY) as session:
        for _ in range(3):
            body = await KIND_BY_NAME[name].make(body_bytes(70_000, 70_000), ctx)
            async with session.post(
                raw_server.url("/upload"),
                headers={"Content-Length": str(len(body.wire))},
                **body.request,
            ) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert connections.created == 1
    assert [r.body for r in raw_server.requests] == [body.wire] * 3


def test_content_length_error_is_a_client_connection_error() -> None:
    assert issubclass(ContentLengthError, aiohttp.ClientConnectionError)
    assert aiohttp_payloadfix.ContentLengthError is ContentLengthError
