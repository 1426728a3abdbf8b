"""chunked-file-reads: a file upload is read 64 KiB at a time, whatever its
size and Content-Length.

aiohttp 3.12.0-3.12.8 ask the file for the whole remaining size in one read
when the size or the Content-Length is known (aio-libs/aiohttp#11138, fixed by
PR #11139 in 3.12.9): a 200 MiB upload grows the process by about 600 MiB.
Nothing here measures memory: the files below record the ``size`` argument of
every read the payload makes, and the strict raw server of conftest checks
that the whole file, and nothing else, reached the wire.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Type, Union

import aiohttp
import pytest
from aiohttp import payload
from conftest import PATCHED_CLASSES, FixState, RawHTTPServer, content

import aiohttp_payloadfix
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import LEDGER, MARKER

FIX_ID = "chunked-file-reads"
#: aiohttp's READ_SIZE, the bound every release before 3.12 and 3.12.9+ keep.
READ_SIZE = 2**16
#: Far more than one read, and not a multiple of READ_SIZE.
SIZE = 15 * READ_SIZE + 12_345


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


# --------------------------------------------------------------------------
# Files that record what each read asks for. Reads run in executor threads;
# list.append is atomic.


class RecordingReader(io.BufferedReader):
    """``open(path, "rb")``, as aiohttp's BufferedReaderPayload sees it."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.asked: List[Optional[int]] = []

    def read(self, size: Optional[int] = -1, /) -> bytes:
        self.asked.append(size)
        return super().read(size)


class RecordingRandom(io.BufferedRandom):
    """``open(path, "r+b")``: BufferedRandom, the payload's other file type."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "r+"))
        self.asked: List[Optional[int]] = []

    def read(self, size: Optional[int] = -1, /) -> bytes:
        self.asked.append(size)
        return super().read(size)


class RecordingText(io.TextIOWrapper):
    """``open(path, encoding="utf-8")``: TextIOPayload, which has its own reads
    (``size`` counts characters there)."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.BufferedReader(io.FileIO(path, "rb")), encoding="utf-8")
        self.asked: List[Optional[int]] = []

    def read(self, size: Optional[int] = -1, /) -> str:
        self.asked.append(size)
        return super().read(size)


Recording = Union[RecordingReader, RecordingRandom, RecordingText]

KINDS: Dict[str, Callable[[Path], Recording]] = {
    "open(rb)": RecordingReader,
    "open(r+b)": RecordingRandom,
    "open(r)": RecordingText,
}
EXPECTED_PAYLOAD: Dict[str, Type[payload.Payload]] = {
    "open(rb)": payload.BufferedReaderPayload,
    "open(r+b)": payload.BufferedReaderPayload,
    "open(r)": payload.TextIOPayload,
}
#: How the request is framed: the length aiohttp computes from the file, an
#: explicit Content-Length, or chunked.
MODES: Dict[str, Callable[[int], Dict[str, Any]]] = {
    "computed": lambda size: {},
    "declared": lambda size: {"headers": {"Content-Length": str(size)}},
    "chunked": lambda size: {"chunked": True},
}


def bound() -> int:
    """The most one read may ask for: READ_SIZE, or on 3.9-3.11 the 256 KiB
    that file-payload-reuse reads (as aiohttp 3.14 does)."""
    if AIOHTTP_VERSION < (3, 12, 0) and LEDGER.is_applied("file-payload-reuse"):
        return 4 * READ_SIZE
    return READ_SIZE


def unbounded(asked: List[Optional[int]]) -> List[Optional[int]]:
    """The reads that asked for more than ``bound()``, or for everything."""
    limit = bound()
    return [s for s in asked if s is None or s < 0 or s > limit]


@pytest.fixture
def body_file(tmp_path: Path) -> Iterator[Callable[[int], bytes]]:
    path = tmp_path / "body.txt"

    def make(size: int) -> bytes:
        data = content(size)
        path.write_bytes(data)
        return data

    yield make


@pytest.fixture
def opened() -> Iterator[List[IO[Any]]]:
    files: List[IO[Any]] = []
    yield files
    for f in files:
        f.close()


async def closed_by_aiohttp(f: IO[Any]) -> None:
    """Wait for the close aiohttp schedules in its executor after an upload
    (closing it here at the same time could race it)."""
    for _ in range(5000):
        if f.closed:
            return
        await asyncio.sleep(0.001)
    assert f.closed, "aiohttp left the file body open"


async def upload(raw_server: RawHTTPServer, f: Recording, mode: str, size: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            raw_server.url("/upload"), data=f, **MODES[mode](size)
        ) as resp:
            assert resp.status == 200
            await resp.read()
    await raw_server.settle()
    await closed_by_aiohttp(f)


# --------------------------------------------------------------------------


def test_registry_maps_recording_files_as_assumed(
    tmp_path: Path, opened: List[IO[Any]]
) -> None:
    """The recording files reach the payload classes the fix patches."""
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    for name, make in KINDS.items():
        f = make(path)
        opened.append(f)
        assert type(payload.get_payload(f)) is EXPECTED_PAYLOAD[name]


async def upload_and_check(
    kind: str,
    mode: str,
    raw_server: RawHTTPServer,
    body_file: Callable[[int], bytes],
    tmp_path: Path,
    opened: List[IO[Any]],
) -> Recording:
    """Upload a SIZE-byte file; the server must get exactly it, framed as
    ``mode`` asks. Returns the file, with the reads it was asked for."""
    data = body_file(SIZE)
    f = KINDS[kind](tmp_path / "body.txt")
    opened.append(f)
    await upload(raw_server, f, mode, SIZE)
    raw_server.assert_clean()
    [request] = raw_server.requests
    assert request.complete
    assert request.body == data
    if mode == "declared":
        assert not request.chunked
        assert request.header("Content-Length") == str(SIZE)
    elif mode == "chunked":
        assert request.chunked
    return f


def assert_bounded(f: Recording) -> None:
    assert len(f.asked) >= SIZE // bound()
    assert unbounded(f.asked) == []


@pytest.mark.parametrize("mode", ["computed", "declared"])
@pytest.mark.parametrize("kind", KINDS)
async def test_reads_are_bounded(
    kind: str,
    mode: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    body_file: Callable[[int], bytes],
    tmp_path: Path,
    opened: List[IO[Any]],
) -> None:
    """The size is known (from the file or the header): still every read asks
    for at most 64 KiB, and the server gets exactly the file."""
    f = await upload_and_check(kind, mode, raw_server, body_file, tmp_path, opened)
    assert_bounded(f)


@pytest.mark.parametrize("kind", KINDS)
async def test_chunked_upload_reads_unchanged(
    kind: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    body_file: Callable[[int], bytes],
    tmp_path: Path,
    opened: List[IO[Any]],
) -> None:
    """Chunked uploads never asked for more than 64 KiB; the fix keeps it so."""
    f = await upload_and_check(kind, "chunked", raw_server, body_file, tmp_path, opened)
    assert unbounded(f.asked) == []


@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        ("open(rb)", "computed"),
        ("open(rb)", "declared"),
        ("open(r+b)", "computed"),
        ("open(r+b)", "declared"),
        ("open(r)", "computed"),
        ("open(r)", "declared"),
    ],
)
async def test_whole_file_read_bug_reproduces(
    kind: str,
    mode: str,
    unfixed: FixState,
    raw_server: RawHTTPServer,
    body_file: Callable[[int], bytes],
    tmp_path: Path,
    opened: List[IO[Any]],
) -> None:
    # The bug costs memory, not correctness: the server gets the whole file.
    f = await upload_and_check(kind, mode, raw_server, body_file, tmp_path, opened)
    [request] = raw_server.requests
    if unfixed.needed and not request.chunked:
        # The length is known: one read asks for (nearly) the whole file.
        assert unbounded(f.asked) != []
        assert max(s or 0 for s in f.asked) >= SIZE - READ_SIZE
    elif AIOHTTP_VERSION < (3, 13, 0):
        # Before 3.12, from 3.12.9 on, and whenever aiohttp sends the file
        # chunked (a text file's length is not known in bytes). 3.14 reads
        # 256 KiB at a time by its own choice; 3.13+ is left alone.
        assert_bounded(f)


def ours(value: Any) -> bool:
    """``value`` is this fix's replacement, or wraps it (file-resend wraps the
    same reads on 3.12)."""
    seen = 0
    while value is not None and seen < 10:
        value = getattr(value, "__func__", value)
        if getattr(value, MARKER, None) == FIX_ID:
            return True
        value = getattr(value, "__wrapped__", None)
        seen += 1
    return False


def test_unaffected_release_is_left_alone(fixed: FixState) -> None:
    patched = sorted(
        f"{cls.__qualname__}.{name}"
        for cls in PATCHED_CLASSES
        for name, value in vars(cls).items()
        if ours(value)
    )
    if fixed.needed:
        assert aiohttp_payloadfix.is_applied(FIX_ID)
        assert patched == [
            "IOBasePayload._read",
            "IOBasePayload._read_and_available_len",
            "TextIOPayload._read",
            "TextIOPayload._read_and_available_len",
        ]
    else:
        # Before 3.12 reads were always 64 KiB; 3.12.9 fixed it upstream.
        assert not aiohttp_payloadfix.is_applied(FIX_ID)
        assert patched == []
