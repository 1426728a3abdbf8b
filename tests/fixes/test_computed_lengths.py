"""computed-lengths: the Content-Length aiohttp computes itself is true.

As released, a text file is declared by its size on disk while its re-encoded
text is sent (a Latin-1 file with non-ASCII characters overruns; CRLF newlines
read as LF leave it short), and a file whose size is reported as 0 (/proc,
/sys, some FUSE files, a file that grows after the request is built) is
declared empty: 3.9-3.11 then write its content as garbage onto the
connection, 3.12 and the limit send nothing. Here such bodies are sent
chunked, exactly as read: the server receives exactly the content.
"""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import IO, Any, Iterator, List, Optional

import aiohttp
import pytest
from conftest import ConnectionCounter, FixState, RawHTTPServer, RawRequest

from aiohttp_payloadfix import ContentLengthError

from .contract_support import PayloadfixLog, captured_log, reports_overlong

FIX_ID = "computed-lengths"
#: A safety net for a failing test (the fix reverted): nothing waits for it.
SAFETY = aiohttp.ClientTimeout(total=30)
#: Characters every encoding below has; beyond ASCII, with CRLF newlines.
LATIN = "Gr\xfc\xdfe, caf\xe9 na\xefve \xa9 \xbd\r\n"
#: And some that Latin-1 has not.
WIDE = "\u20ac \u2014 \u0436 \U0001f600\r\n"
ENCODINGS = {
    "latin-1": LATIN,
    "cp1252": LATIN + "\u20ac\r\n",
    "utf-8": LATIN + WIDE,
    "utf-16": LATIN + WIDE,
}
#: Large enough for several reads (64 KiB each).
REPEAT = 5000


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


@pytest.fixture
def log() -> Iterator[PayloadfixLog]:
    with captured_log() as capture:
        yield capture


@pytest.fixture
def opened() -> Iterator[List[IO[Any]]]:
    files: List[IO[Any]] = []
    yield files
    for f in files:
        f.close()


def write_text(path: Path, text: str, encoding: str) -> None:
    with open(path, "w", encoding=encoding, newline="") as f:  # CRLF kept
        f.write(text)


def read_text(path: Path, encoding: str, newline: Optional[str]) -> str:
    with open(path, encoding=encoding, newline=newline) as f:
        return f.read()


async def post(
    server: RawHTTPServer,
    data: Any,
    connections: Optional[ConnectionCounter] = None,
    **kwargs: Any,
) -> RawRequest:
    """POST ``data``; the one request the server got."""
    session = (
        connections.session(timeout=SAFETY)
        if connections is not None
        else aiohttp.ClientSession(timeout=SAFETY)
    )
    async with session:
        async with session.post(server.url("/upload"), data=data, **kwargs) as resp:
            assert resp.status == 200
    await server.settle()
    server.assert_clean()
    [request] = server.requests
    return request


# --------------------------------------------------------------------------
# Text files: what is sent is the text re-encoded, not the file's bytes.


def text_params() -> Iterator[Any]:
    for encoding in ENCODINGS:
        for newline in (None, "", "\r\n"):
            yield pytest.param(encoding, newline, id=f"{encoding}-newline={newline!r}")


@pytest.mark.parametrize(("encoding", "newline"), list(text_params()))
async def test_text_file_arrives_exactly(
    encoding: str,
    newline: Optional[str],
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    opened: List[IO[Any]],
    tmp_path: Path,
) -> None:
    path = tmp_path / "text.txt"
    write_text(path, ENCODINGS[encoding] * REPEAT, encoding)
    # aiohttp sends the text as read (newlines translated or not), encoded
    # in the charset of its Content-Type: UTF-8.
    expected = read_text(path, encoding, newline).encode("utf-8")
    body = open(path, encoding=encoding, newline=newline)
    opened.append(body)
    request = await post(raw_server, body)
    assert request.header("Content-Type") == "text/plain; charset=utf-8"
    assert (request.chunked, request.header("Content-Length")) == (True, None)
    assert (request.body, request.complete) == (expected, True)
    assert log.records == []


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
async def test_text_file_with_its_true_length(
    encoding: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    opened: List[IO[Any]],
    tmp_path: Path,
) -> None:
    """The caller declares the encoded length: it is not taken for a short or
    an over-long body because the file on disk has another size."""
    path = tmp_path / "text.txt"
    write_text(path, ENCODINGS[encoding] * REPEAT, encoding)
    expected = read_text(path, encoding, None).encode("utf-8")
    body = open(path, encoding=encoding)
    opened.append(body)
    request = await post(
        raw_server, body, headers={"Content-Length": str(len(expected))}
    )
    assert request.header("Content-Length") == str(len(expected))
    assert (request.body, request.complete) == (expected, True)
    assert log.records == []


@pytest.mark.parametrize(
    ("encoding", "newline"),
    [("latin-1", ""), ("utf-16", ""), ("utf-8", None), ("latin-1", None)],
)
async def test_text_file_length_bug_reproduces(
    encoding: str,
    newline: Optional[str],
    unfixed: FixState,
    raw_server: RawHTTPServer,
    opened: List[IO[Any]],
    tmp_path: Path,
) -> None:
    """As released, the file's size on disk is declared: non-ASCII text
    encodes longer and is cut (the limit, or 3.12), CRLF read as LF is short
    (short-body-error fails it; aiohttp alone would hang)."""
    path = tmp_path / "text.txt"
    write_text(path, ENCODINGS[encoding] * REPEAT, encoding)
    expected = read_text(path, encoding, newline).encode("utf-8")
    body = open(path, encoding=encoding, newline=newline)
    opened.append(body)
    outcome: Any
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=2)
        ) as session:
            async with session.post(raw_server.url("/upload"), data=body) as resp:
                outcome = resp.status
    except (ContentLengthError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
        outcome = exc
    await raw_server.settle()
    [request] = raw_server.requests
    assert request.header("Content-Length") == str(path.stat().st_size)
    assert len(expected) != path.stat().st_size
    # Cut, or short (failed, or hung until the timeout).
    assert request.body != expected or outcome != 200, outcome


# --------------------------------------------------------------------------
# Files that report size 0.

PROC_CMDLINE = Path("/proc/self/cmdline")
needs_proc = pytest.mark.skipif(
    not PROC_CMDLINE.exists(), reason="no /proc file system here"
)


@needs_proc
@pytest.mark.parametrize("mode", ["rb", "r"])
async def test_proc_file_arrives_whole(
    mode: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    opened: List[IO[Any]],
) -> None:
    # The command line of this very process: the same on every read.
    expected = PROC_CMDLINE.read_bytes()
    assert expected and os.stat(PROC_CMDLINE).st_size == 0
    body = open(PROC_CMDLINE, mode)
    opened.append(body)
    request = await post(raw_server, body)
    assert (request.chunked, request.header("Content-Length")) == (True, None)
    assert (request.body, request.complete) == (expected, True)
    assert log.records == []


@needs_proc
async def test_proc_status_arrives_whole(
    fixed: FixState, raw_server: RawHTTPServer, opened: List[IO[Any]]
) -> None:
    body = open("/proc/self/status", "rb")
    opened.append(body)
    request = await post(raw_server, body)
    assert request.chunked and request.complete
    assert request.body.startswith(b"Name:\t")
    assert f"\nPid:\t{os.getpid()}\n".encode() in request.body
    assert request.body.endswith(b"\n")


@needs_proc
async def test_proc_file_bug_reproduces(
    unfixed: FixState, raw_server: RawHTTPServer, opened: List[IO[Any]]
) -> None:
    """Declared empty: 3.12 and the limit send nothing, and nobody is told
    (3.9-3.11 alone would write the content after an empty request)."""
    body = open(PROC_CMDLINE, "rb")
    opened.append(body)
    request = await post(raw_server, body)
    assert (request.header("Content-Length"), request.body) == ("0", b"")


async def test_file_filled_after_the_request_is_built(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    log: PayloadfixLog,
    opened: List[IO[Any]],
    tmp_path: Path,
) -> None:
    """Empty when the request is built; written once the connection is open,
    before the body is sent: all of it arrives (as for a /proc file)."""
    path = tmp_path / "filled.bin"
    path.write_bytes(b"")
    content = b"written late\r\n" * 10_000

    async def fill(*_args: Any) -> None:
        path.write_bytes(content)

    connections.trace_config.on_connection_create_end.append(fill)
    body = open(path, "rb")
    opened.append(body)
    request = await post(raw_server, body, connections)
    assert (request.chunked, request.body, request.complete) == (True, content, True)
    assert log.records == []


async def test_file_filled_after_the_request_is_built_bug_reproduces(
    unfixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    log: PayloadfixLog,
    opened: List[IO[Any]],
    tmp_path: Path,
) -> None:
    """Declared empty and sent empty; overlong-body-warning at least reports
    it (the file has grown by the time the body is written)."""
    path = tmp_path / "filled.bin"
    path.write_bytes(b"")

    async def fill(*_args: Any) -> None:
        path.write_bytes(b"written late\r\n")

    connections.trace_config.on_connection_create_end.append(fill)
    body = open(path, "rb")
    opened.append(body)
    request = await post(raw_server, body, connections)
    assert (request.header("Content-Length"), request.body) == ("0", b"")
    assert len(log.records) == (1 if reports_overlong() else 0)


async def test_text_file_appended_after_the_request_is_built(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    log: PayloadfixLog,
    opened: List[IO[Any]],
    tmp_path: Path,
) -> None:
    path = tmp_path / "grows.txt"
    write_text(path, LATIN * 100, "latin-1")

    async def append(*_args: Any) -> None:
        with open(path, "a", encoding="latin-1", newline="") as f:
            f.write(LATIN * 100)

    connections.trace_config.on_connection_create_end.append(append)
    body = open(path, encoding="latin-1", newline="")
    opened.append(body)
    request = await post(raw_server, body, connections)
    assert request.chunked
    assert (request.body, request.complete) == ((LATIN * 200).encode("utf-8"), True)
    assert log.records == []


# --------------------------------------------------------------------------
# Sizes that are true stay as they are.


@pytest.mark.parametrize("size", [0, 1, 70_000])
async def test_true_sizes_are_still_declared(
    size: int,
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    log: PayloadfixLog,
    opened: List[IO[Any]],
    tmp_path: Path,
) -> None:
    """BytesIO and binary files with a size keep their Content-Length; an
    empty file is sent chunked, empty (its size of 0 cannot be told from a
    /proc file's)."""
    data = (b"0123456789" * (size // 10 + 1))[:size]
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    binary = open(path, "rb")
    opened.append(binary)
    async with connections.session(timeout=SAFETY) as session:
        for body in (io.BytesIO(data), binary, data):
            async with session.post(raw_server.url("/upload"), data=body) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert connections.created == 1
    lengths = [r.header("Content-Length") for r in raw_server.requests]
    if size:
        assert lengths == [str(size)] * 3
    else:
        assert lengths == ["0", None, "0"]
        assert raw_server.requests[1].chunked
    assert [(r.body, r.complete) for r in raw_server.requests] == [(data, True)] * 3
    assert log.records == []
