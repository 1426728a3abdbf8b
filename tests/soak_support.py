"""Helpers of the reliability tests (test_desync.py, test_load.py): hypothesis
profiles, the counts a soak run writes out, a strict raw server that tracks
arrivals and connection ends, and a catalogue of request bodies.

``PAYLOADFIX_SOAK=1`` selects the long session (``nox -s soak``): 25,000
generated requests (``PAYLOADFIX_SOAK_EXAMPLES``) and 5,000 uploads; unset,
the default suite runs a few hundred of each, derandomized.
``PAYLOADFIX_SOAK_REPORT=<file>`` makes the tests merge their counts into that
JSON file.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import platform
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    IO,
    Any,
    AsyncGenerator,
    Callable,
    Dict,
    List,
    Optional,
    Set,
    Tuple,
)

import aiohttp
from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter
from conftest import MemoryWriter, RawConnection, RawHTTPServer, RawRequest
from hypothesis import HealthCheck, settings

ENV_SOAK = "PAYLOADFIX_SOAK"
ENV_REPORT = "PAYLOADFIX_SOAK_REPORT"
SOAK = os.environ.get(ENV_SOAK, "").strip().lower() not in ("", "0", "no", "false")
#: A safety net for a hang; nothing is asserted about time.
SAFETY = 60.0

settings.register_profile(
    "payloadfix-suite",
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "payloadfix-soak",
    max_examples=int(os.environ.get("PAYLOADFIX_SOAK_EXAMPLES", "25000")),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("payloadfix-soak" if SOAK else "payloadfix-suite")


def record_counts(section: str, counts: Dict[str, Any]) -> None:
    """Merge ``counts`` under ``section`` into the ``PAYLOADFIX_SOAK_REPORT``
    file (nothing without it), with what they were measured on."""
    path = os.environ.get(ENV_REPORT)
    if not path:
        return
    report_file = Path(path)
    report: Dict[str, Any] = {}
    if report_file.exists():
        report = json.loads(report_file.read_text())
    report["environment"] = {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "soak": SOAK,
        "argv": sys.argv,
    }
    report[section] = counts
    report_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def open_fds() -> int:
    """Open file descriptors of this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def decoded(request: RawRequest) -> bytes:
    """The body as sent before compression."""
    encoding = (request.header("Content-Encoding") or "").lower()
    if encoding in ("deflate", "gzip"):
        # aiohttp's "deflate" is the zlib format; 32 + 15 accepts zlib and gzip.
        inflate = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)
        return inflate.decompress(request.body) + inflate.flush()
    assert not encoding, f"unexpected Content-Encoding {encoding!r}"
    return request.body


# --------------------------------------------------------------------------
# The strict raw server of conftest, watched.

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class TrackingServer(RawHTTPServer):
    """conftest's strict server, plus: every request in the order its
    handling ended (``arrivals``), which connections have ended, and a way to
    wait for either. ``inspect`` sees each request once it is done."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: List[Tuple[RawConnection, RawRequest]] = []
        self.ended: Set[int] = set()
        self._conn_of: Dict[Any, RawConnection] = {}
        self._changed: Optional[asyncio.Event] = None
        #: Targets whose Expect: 100-continue gets no 100 (an early answer).
        self.no_continue: Set[str] = set()

    async def start(self) -> None:
        self._changed = asyncio.Event()
        await super().start()

    def inspect(self, conn: RawConnection, request: RawRequest) -> None:
        """Called once per request, when the server is done with it."""

    def has_ended(self, conn: RawConnection) -> bool:
        return id(conn) in self.ended

    def live(self) -> List[RawConnection]:
        return [c for c in self.connections if id(c) not in self.ended]

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Wait (at most SAFETY seconds, a safety net) until ``ready()``."""
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SAFETY
        while not ready():
            self._changed.clear()
            remaining = deadline - loop.time()
            assert remaining > 0, f"still waiting for {what}"
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if data == CONTINUE:
            conn = self._conn_of.get(asyncio.current_task())
            if conn and conn.requests and conn.requests[-1].target in self.no_continue:
                return
        await super()._send(writer, data)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        try:
            await super()._serve(reader, writer)
        finally:
            conn = self._conn_of.pop(task, None)
            if conn is not None:
                self.ended.add(id(conn))
            self._poke()

    async def _one_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: RawConnection,
    ) -> bool:
        self._conn_of[asyncio.current_task()] = conn
        seen = len(conn.requests)
        try:
            return await super()._one_request(reader, writer, conn)
        finally:
            for request in conn.requests[seen:]:
                self.arrivals.append((conn, request))
                try:
                    self.inspect(conn, request)
                except Exception as exc:  # recorded: the tests assert on failures
                    self._fail(f"inspect failed: {exc!r}")
            self._poke()


# --------------------------------------------------------------------------
# Request bodies: every kind of body a caller hands to aiohttp.

SMUGGLE = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
_ASCII_UNIT = "abcdefghijklmnopqrstuvwxyz0123456789\n"
_TEXT_UNIT = "abcdé0123ü\n"  # 13 bytes in UTF-8
BOUNDARY = "payloadfix-desync"
CHUNK = 16_384


def _repeat(unit: str, nbytes: int) -> str:
    """Text of exactly ``nbytes`` UTF-8 bytes made from ``unit``."""
    unit_bytes = len(unit.encode())
    text = unit * (nbytes // unit_bytes)
    return text + "x" * (nbytes - len(text.encode()))


def content(size: int, cut: int, non_ascii: bool) -> str:
    """Text of exactly ``size`` UTF-8 bytes: filler up to byte ``cut``, then
    request lines, so that bytes past a declared length ``cut`` that reach the
    server start with ``GET /smuggled``."""
    cut = min(cut, size)
    tail = (SMUGGLE * ((size - cut) // len(SMUGGLE) + 1))[: size - cut]
    return _repeat(_TEXT_UNIT if non_ascii else _ASCII_UNIT, cut) + tail


class Collector(MemoryWriter):
    """Renders a payload to bytes, unlimited (as without Content-Length)."""

    length: Optional[int] = None


class CustomPayload(payload.Payload):
    """A payload class of the kind third parties write."""

    def __init__(self, value: bytes, chunk: int = CHUNK) -> None:
        super().__init__(value, content_type="application/x-custom")
        self._size = len(value)
        self._chunk = chunk

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for start in range(0, len(self._value), self._chunk):
            await writer.write(self._value[start : start + self._chunk])


async def _generate(data: bytes, chunk: int) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


def multipart_of(data: bytes) -> aiohttp.MultipartWriter:
    writer = aiohttp.MultipartWriter("form-data", boundary=BOUNDARY)
    part = writer.append(data, {"Content-Type": "application/octet-stream"})
    part.set_content_disposition("form-data", name="file", filename="body.bin")
    return writer


@dataclass
class Body:
    kind: str
    #: What goes to ``data=``.
    data: Any
    #: The bytes the body consists of (what reaches the server unlimited).
    wire: bytes
    opened: List[IO[Any]] = field(default_factory=list)

    async def close(self) -> None:
        for f in self.opened:
            f.close()
            Path(f.name).unlink(missing_ok=True)
        if inspect.isasyncgen(self.data):
            await self.data.aclose()


class BodyMaker:
    """Builds bodies of each kind; files go to ``folder``."""

    KINDS = (
        "bytes",
        "bytearray",
        "str",
        "BytesIO",
        "StringIO",
        "open-rb",
        "open-r",
        "async-generator",
        "multipart",
        "Payload-subclass",
    )
    #: Kinds made from text: they may carry non-ASCII characters.
    TEXT_KINDS = frozenset({"str", "StringIO", "open-r"})

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = 0

    def _file(self, data: bytes) -> Path:
        self.files += 1
        path = self.folder / f"body-{self.files}"
        path.write_bytes(data)
        return path

    async def make(self, kind: str, text: str, chunk: int = CHUNK) -> Body:
        data = text.encode()
        if kind == "bytes":
            return Body(kind, data, data)
        if kind == "bytearray":
            return Body(kind, bytearray(data), data)
        if kind == "str":
            return Body(kind, text, data)
        if kind == "BytesIO":
            return Body(kind, io.BytesIO(data), data)
        if kind == "StringIO":
            return Body(kind, io.StringIO(text), data)
        if kind == "open-rb":
            f: IO[Any] = open(self._file(data), "rb")
            return Body(kind, f, data, [f])
        if kind == "open-r":
            path = self._file(data)
            # Read in text mode, as aiohttp will: newlines translated.
            with open(path, encoding="utf-8") as twin:
                wire = twin.read().encode()
            f = open(path, encoding="utf-8")  # noqa: SIM115
            return Body(kind, f, wire, [f])
        if kind == "async-generator":
            return Body(kind, _generate(data, chunk), data)
        if kind == "multipart":
            rendered = Collector()
            await multipart_of(data).write(rendered)
            return Body(kind, multipart_of(data), bytes(rendered.data))
        if kind == "Payload-subclass":
            return Body(kind, CustomPayload(data, chunk), data)
        raise LookupError(kind)
