"""content-length-limit: never more body bytes on the wire than declared.

With an explicit Content-Length smaller than the body, aiohttp before 3.12
writes the whole body and the server parses the rest as the next request
(aio-libs/aiohttp PR #10915 limits some body types in 3.12.0; multipart,
FormData, ``@aiohttp.streamer``, third-party payloads and multi-byte
memoryviews still overrun in 3.12.15). Checked on the wire with the strict raw
server of conftest: test bodies carry ``GET /smuggled`` request lines right
after the declared length.

The limit is tested on its own: the over-long policy is "truncate" here (what
overlong-body-warning adds is tested in its own module), and a body shorter
than its Content-Length, which short-body-error fails at once, is checked for
what the limit must guarantee either way.
"""

from __future__ import annotations

import array
import asyncio
import io
import math
import types
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    IO,
    Any,
    AsyncGenerator,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
    cast,
)

import aiohttp
import pytest
from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from conftest import FixState, MemoryWriter, RawHTTPServer, RawRequest, Reply

import aiohttp_payloadfix
from aiohttp_payloadfix import ContentLengthError
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix.fixes import FIXES

from .contract_support import (
    captured_log,
    fails_short,
    names_sent,
    overlong_policy,
    reports_overlong,
)

FIX_ID = "content-length-limit"
SIZES = (0, 1, 65535, 65536, 65537, 300_000)
MODES = ("none", "smaller", "equal", "larger")
SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
FILLER = b"abcdefghijklmnopqrstuvwxyz0123456789\n"
CHUNK = 10_000
#: Bounds a hang in a failing test; nothing is asserted about time.
SAFETY = aiohttp.ClientTimeout(total=60)


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


@pytest.fixture(autouse=True)
def _limit_alone() -> Iterator[None]:
    """Over-long bodies are cut quietly: the limit, not its report."""
    with overlong_policy("truncate"):
        yield


def repeat(pattern: bytes, size: int) -> bytes:
    return (pattern * (size // len(pattern) + 1))[:size]


def body_bytes(size: int, cut: int) -> bytes:
    """``size`` ASCII bytes; from offset ``cut`` on, request lines."""
    return repeat(FILLER, cut) + repeat(SMUGGLE, size - cut)


def smaller(length: int) -> int:
    """A declared length below ``length`` (which is at least 1)."""
    return length - 1 if length <= 1 else length - min(length // 2, 100)


def declared_for(mode: str, length: int) -> Optional[int]:
    if mode == "none":
        return None
    if mode == "smaller":
        return smaller(length)
    if mode == "equal":
        return length
    return length + 1


# --------------------------------------------------------------------------
# Every kind of body aiohttp accepts.


class Collector(MemoryWriter):
    """Renders a payload to bytes: what it writes when nothing limits it."""

    #: As on a request without Content-Length (see MemoryWriter for the 0).
    length: Optional[int] = None


class Pulls:
    """What an async generator body went through."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pulled = 0
        self.total = math.ceil(len(data) / CHUNK)
        self.generator = cast("types.AsyncGeneratorType[bytes, None]", self._chunks())

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        for start in range(0, len(self.data), CHUNK):
            self.pulled += 1
            yield self.data[start : start + CHUNK]

    @property
    def closed(self) -> bool:
        """Exhausted or closed: either way no longer suspended mid-body."""
        return self.generator.ag_frame is None


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # @streamer is deprecated

    @aiohttp.streamer
    async def streamed(writer: AbstractStreamWriter, data: bytes) -> None:
        for start in range(0, len(data), CHUNK):
            await writer.write(data[start : start + CHUNK])


class ThirdPartyPayload(payload.Payload):
    """A payload class written outside aiohttp."""

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type="application/x-third-party")
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for start in range(0, len(self._value), CHUNK):
            await writer.write(self._value[start : start + CHUNK])


@dataclass
class Ctx:
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    opened: List[IO[Any]]

    def file(self, data: bytes, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        path = self.tmp_path / f"body-{len(self.opened)}"
        path.write_bytes(data)
        f: IO[Any] = open(path, mode, **kwargs)
        self.opened.append(f)
        return f


@dataclass
class Body:
    #: Keyword arguments for ``session.post``.
    request: Dict[str, Any]
    #: The bytes of the whole body as the server sees them, unlimited.
    wire: bytes
    session: Dict[str, Any] = field(default_factory=dict)
    pulls: Optional[Pulls] = None


MakeBody = Callable[[bytes, Ctx], Awaitable[Body]]


async def _bytes(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": data}, data)


async def _bytearray(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": bytearray(data)}, data)


async def _memoryview(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": memoryview(data)}, data)


async def _wide_memoryview(data: bytes, ctx: Ctx) -> Body:
    view = memoryview(array.array("i", data))
    assert (view.itemsize, view.nbytes) == (4, len(data))
    return Body({"data": view}, data)


async def _str(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": data.decode("ascii")}, data)


async def _bytesio(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": io.BytesIO(data)}, data)


async def _binary_file(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": ctx.file(data)}, data)


async def _unbuffered_file(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": ctx.file(data, buffering=0)}, data)


async def _stringio(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": io.StringIO(data.decode("ascii"))}, data)


async def _text_file(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": ctx.file(data, "r", encoding="ascii")}, data)


async def _async_generator(data: bytes, ctx: Ctx) -> Body:
    pulls = Pulls(data)
    return Body({"data": pulls.generator}, data, pulls=pulls)


async def _stream_reader(data: bytes, ctx: Ctx) -> Body:
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(BaseProtocol(loop), 2**20, loop=loop)
    for start in range(0, len(data), CHUNK):
        reader.feed_data(data[start : start + CHUNK])
    reader.feed_eof()
    return Body({"data": reader}, data)


async def _json(data: bytes, ctx: Ctx) -> Body:
    text = data.decode("ascii")
    return Body(
        {"json": {"ignored": True}}, data, session={"json_serialize": lambda _: text}
    )


async def _form_data(data: bytes, ctx: Ctx) -> Body:
    def form() -> aiohttp.FormData:
        f = aiohttp.FormData()
        f.add_field("field", "value")
        f.add_field("file", ctx.file(data), filename="body.bin")
        return f

    with ctx.monkeypatch.context() as patch:
        # The same boundary for the twin rendered here and the one sent.
        patch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=10915))
        twin, sent = form(), form()
    collector = Collector()
    await twin().write(collector)
    return Body({"data": sent}, bytes(collector.data))


def multipart_of(data: bytes) -> aiohttp.MultipartWriter:
    writer = aiohttp.MultipartWriter("mixed", boundary="payloadfix-10915")
    writer.append_json({"part": 1})
    writer.append(data)
    return writer


async def _multipart(data: bytes, ctx: Ctx) -> Body:
    collector = Collector()
    await multipart_of(data).write(collector)
    return Body({"data": multipart_of(data)}, bytes(collector.data))


async def _streamer(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": streamed(data)}, data)


async def _third_party(data: bytes, ctx: Ctx) -> Body:
    return Body({"data": ThirdPartyPayload(data)}, data)


@dataclass(frozen=True)
class Kind:
    name: str
    make: MakeBody
    #: aiohttp 3.12+ stops this kind at the declared length by itself.
    limited_upstream: bool
    #: The body size is a multiple of this (memoryview items).
    granularity: int = 1


KINDS = (
    Kind("bytes", _bytes, True),
    Kind("bytearray", _bytearray, True),
    Kind("memoryview", _memoryview, True),
    # 3.12 slices a memoryview by items, not bytes.
    Kind("memoryview-int32", _wide_memoryview, False, granularity=4),
    Kind("str", _str, True),
    Kind("BytesIO", _bytesio, True),
    Kind("open-rb", _binary_file, True),
    Kind("open-rb-unbuffered", _unbuffered_file, True),
    Kind("StringIO", _stringio, True),
    Kind("open-r", _text_file, True),
    Kind("async-generator", _async_generator, True),
    Kind("StreamReader", _stream_reader, True),
    Kind("json", _json, True),
    Kind("FormData-with-file", _form_data, False),
    Kind("MultipartWriter", _multipart, False),
    Kind("streamer", _streamer, False),
    Kind("Payload-subclass", _third_party, False),
)
KIND_BY_NAME = {kind.name: kind for kind in KINDS}


def overruns_as_released(kind: Kind) -> bool:
    return AIOHTTP_VERSION < (3, 12, 0) or not kind.limited_upstream


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    context = Ctx(tmp_path, monkeypatch, [])
    yield context
    for f in context.opened:
        f.close()


# --------------------------------------------------------------------------
# One request on the wire.


@dataclass
class Sent:
    body: Body
    declared: Optional[int]
    #: None: the request failed before its head reached the server (3.12+
    #: sends the head with the first body byte).
    request: Optional[RawRequest]
    #: The ContentLengthError of a short body (short-body-error applied).
    error: Optional[ContentLengthError] = None


async def send(
    kind: Kind, size: int, mode: str, server: RawHTTPServer, ctx: Ctx
) -> Sent:
    size -= size % kind.granularity
    cut = smaller(size) if mode == "smaller" and size else size
    body = await kind.make(body_bytes(size, cut), ctx)
    declared = declared_for(mode, len(body.wire))
    headers = {} if declared is None else {"Content-Length": str(declared)}
    short = mode == "larger" and fails_short()
    if mode == "larger" and not short:
        # The client never sends the declared length and, as released, waits:
        # the server answers once the body has arrived, and closes.
        server.routes["/upload"] = Reply(answer_after=len(body.wire), close=True)
    error: Optional[ContentLengthError] = None
    async with aiohttp.ClientSession(timeout=SAFETY, **body.session) as session:
        if short:
            # The server waits for the rest of the body and never answers:
            # only the client giving up at once passes.
            with pytest.raises(ContentLengthError) as info:
                async with session.post(
                    server.url("/upload"), headers=headers, **body.request
                ):
                    pass  # pragma: no cover
            error = info.value
            # The half-sent connection is not reused.
            async with session.post(server.url("/next"), data=b"next") as resp:
                assert resp.status == 200
        else:
            async with session.post(
                server.url("/upload"), headers=headers, **body.request
            ) as resp:
                assert resp.status == 200
                await resp.read()
    await server.settle()
    uploads = [r for r in server.requests if r.target == "/upload"]
    assert len(uploads) <= 1
    assert uploads or short, "nothing reached the server"
    return Sent(body, declared, uploads[0] if uploads else None, error)


def case_params() -> Iterator[Any]:
    for kind in KINDS:
        for size in SIZES:
            for mode in MODES:
                if mode == "smaller" and size < kind.granularity:
                    continue  # nothing is smaller than an empty body
                yield pytest.param(kind, size, mode, id=f"{kind.name}-{size}-{mode}")


@pytest.mark.parametrize(("kind", "size", "mode"), list(case_params()))
async def test_wire_carries_at_most_the_declared_length(
    kind: Kind,
    size: int,
    mode: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    ctx: Ctx,
) -> None:
    sent = await send(kind, size, mode, raw_server, ctx)
    raw_server.assert_clean()
    wire = sent.body.wire
    if sent.error is not None:
        # short-body-error: at most the body, never completed, and the next
        # request on a new connection.
        message = str(sent.error)
        assert f"declared {sent.declared} bytes" in message
        assert names_sent(message, len(wire)), message
        first, second = raw_server.connections
        assert [(r.target, r.complete) for r in first.requests] in (
            [],
            [("/upload", False)],
        )
        assert wire.startswith(b"".join(r.body for r in first.requests))
        assert [(r.target, r.body) for r in second.requests] == [("/next", b"next")]
        if sent.body.pulls is not None:
            assert sent.body.pulls.closed
        return
    assert len(raw_server.connections) == 1
    [request] = raw_server.requests
    if sent.declared is None:
        assert request.body == wire
        assert request.complete
    elif mode == "larger":
        assert request.body == wire
        assert not request.complete  # closed short of the declared length
    else:
        assert request.header("Content-Length") == str(sent.declared)
        assert request.body == wire[: sent.declared]
        assert request.complete
    pulls = sent.body.pulls
    if pulls is not None:
        assert pulls.closed
        if sent.declared is not None and sent.declared < len(wire):
            # Stopped at the limit, not drained.
            assert pulls.pulled == math.ceil(sent.declared / CHUNK)


@pytest.mark.parametrize("policy", ["truncate", "warn"])
@pytest.mark.parametrize("declared", [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK])
async def test_generator_stops_at_the_limit(
    declared: int, policy: str, fixed: FixState, raw_server: RawHTTPServer
) -> None:
    pulls = Pulls(body_bytes(65537, declared))
    with overlong_policy(policy), captured_log() as log:
        async with aiohttp.ClientSession(timeout=SAFETY) as session:
            async with session.post(
                raw_server.url("/upload"),
                data=pulls.generator,
                headers={"Content-Length": str(declared)},
            ) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [pulls.data[:declared]]
    assert pulls.closed
    needed = math.ceil(declared / CHUNK)
    if policy == "truncate" or not reports_overlong():
        assert pulls.pulled == needed < pulls.total
        assert log.messages == []
    else:
        # Telling an over-long generator from an exact one takes one more
        # chunk, offered to the writer (which drops it); then it is closed.
        assert pulls.pulled == needed + 1 < pulls.total
        assert [r.levelname for r in log.records] == ["WARNING"]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_overrun_bug_reproduces(
    kind: Kind, unfixed: FixState, raw_server: RawHTTPServer, ctx: Ctx
) -> None:
    try:
        await send(kind, 65537, "smaller", raw_server, ctx)
    except aiohttp.ClientOSError:
        # The server answers and closes once the declared bytes are in: a
        # client that fails writing after that was sending bytes beyond them.
        if not overruns_as_released(kind):
            raise
        return
    if overruns_as_released(kind):
        assert raw_server.stray or raw_server.failures
    else:
        raw_server.assert_clean()


def test_reverting_the_limit_holds_back_what_requires_it(unfixed: FixState) -> None:
    """short-body-error and overlong-body-warning read what the limit leaves
    open on the writer: without it they must not be active (the bug tests of
    this module then see aiohttp as released)."""
    dependents = [f.id for f in FIXES if FIX_ID in f.requires]
    assert dependents
    assert [i for i in dependents if aiohttp_payloadfix.is_applied(i)] == []


async def test_smuggled_request_bug_reproduces(
    unfixed: FixState, raw_server: RawHTTPServer
) -> None:
    """The upstream measurement: a second request ``GET /smuggled``."""
    if not unfixed.needed:
        pytest.skip("the package leaves this release alone")
    body = b"0123456789" + SMUGGLE
    data: Any = body
    length = 10
    if AIOHTTP_VERSION >= (3, 12, 0):
        # 3.12.15 still overruns with a multipart body.
        collector = Collector()
        await multipart_of(body).write(collector)
        data = multipart_of(body)
        length = bytes(collector.data).index(body) + 10
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(
            raw_server.url("/upload"),
            data=data,
            headers={"Content-Length": str(length)},
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    assert [r.target for r in raw_server.requests] == ["/upload", "/smuggled"]


async def test_generator_drained_bug_reproduces(
    unfixed: FixState, raw_server: RawHTTPServer, ctx: Ctx
) -> None:
    generator = KIND_BY_NAME["async-generator"]
    sent = await send(generator, 65537, "smaller", raw_server, ctx)
    pulls = sent.body.pulls
    assert pulls is not None
    # Every release pulls the generator to its end (3.12 discards the rest).
    assert pulls.pulled == pulls.total


@pytest.mark.xfail(
    AIOHTTP_VERSION < (3, 9, 5) and not fails_short(),
    reason="aiohttp 3.9.0 itself puts the connection back after a total timeout"
    " (3.9.5 does not); short-body-error closes it",
    strict=False,
)
async def test_short_body_is_not_reused(
    fixed: FixState, raw_server: RawHTTPServer
) -> None:
    """Content-Length larger than the body against a server that waits for
    the rest: the request cannot complete (short-body-error fails it at once,
    before any body byte; as released it times out); whatever the client does,
    the half-sent connection is not reused and no other request lands on it."""
    short = fails_short()
    timeout = SAFETY if short else aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        expected: Any = (
            ContentLengthError
            if short
            else (asyncio.TimeoutError, aiohttp.ClientError, ValueError)
        )
        with pytest.raises(expected):
            async with session.post(
                raw_server.url("/upload"),
                data=b"0123456789",
                headers={"Content-Length": "11"},
            ) as resp:
                await resp.read()
        async with session.post(raw_server.url("/next"), data=b"next") as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    first, second = raw_server.connections
    uploads = [(r.target, r.body, r.complete) for r in first.requests]
    if short:
        # The size is known: not a byte of the body is sent (3.12+ does not
        # even send the head then).
        assert uploads in ([], [("/upload", b"", False)])
    else:
        assert uploads == [("/upload", b"0123456789", False)]
    assert [(r.target, r.body) for r in second.requests] == [("/next", b"next")]


@pytest.mark.parametrize(
    "name", ["bytes", "open-rb", "async-generator", "MultipartWriter", "streamer"]
)
async def test_limit_after_expect_continue(
    name: str, fixed: FixState, raw_server: RawHTTPServer, ctx: Ctx
) -> None:
    body = await KIND_BY_NAME[name].make(body_bytes(70_000, smaller(70_000)), ctx)
    declared = smaller(len(body.wire))
    async with aiohttp.ClientSession(timeout=SAFETY, **body.session) as session:
        async with session.post(
            raw_server.url("/upload"),
            headers={"Content-Length": str(declared)},
            expect100=True,
            **body.request,
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    [request] = raw_server.requests
    assert request.header("Expect") == "100-continue"
    assert request.body == body.wire[:declared]


# --------------------------------------------------------------------------
# Writers other than the request's.


async def _agen(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


async def test_async_iterable_to_writer_without_length(fixed: FixState) -> None:
    writer = MemoryWriter()
    await payload.get_payload(_agen(b"0123456789")).write(writer)
    assert bytes(writer.data) == b"0123456789"


async def test_async_iterable_to_writer_without_length_as_released(
    unfixed: FixState,
) -> None:
    writer = MemoryWriter()
    await payload.get_payload(_agen(b"0123456789")).write(writer)
    assert bytes(writer.data) == b"0123456789"


# --------------------------------------------------------------------------
# Chunked requests are not touched.


@pytest.mark.parametrize(
    "name",
    ["bytes", "open-rb", "async-generator", "MultipartWriter", "Payload-subclass"],
)
async def test_chunked_request_untouched(
    name: str, fixed: FixState, raw_server: RawHTTPServer, ctx: Ctx
) -> None:
    body = await KIND_BY_NAME[name].make(body_bytes(70_000, 70_000), ctx)
    async with aiohttp.ClientSession(timeout=SAFETY, **body.session) as session:
        async with session.post(
            raw_server.url("/upload"), chunked=True, **body.request
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    [request] = raw_server.requests
    assert request.chunked
    assert request.header("Content-Length") is None
    assert request.body == body.wire


# --------------------------------------------------------------------------
# A Content-Length that is not plain ASCII digits.

INVALID: List[Tuple[str, List[Tuple[str, str]]]] = [
    ("minus", [("Content-Length", "-3")]),
    ("plus", [("Content-Length", "+5")]),
    ("underscore", [("Content-Length", "1_0")]),
    ("leading-space", [("Content-Length", " 5")]),
    ("fullwidth-digit", [("Content-Length", "\uff15")]),
    ("conflicting", [("Content-Length", "5"), ("Content-Length", "6")]),
]


@pytest.mark.parametrize(
    "headers", [h for _, h in INVALID], ids=[name for name, _ in INVALID]
)
async def test_invalid_content_length_refused_before_sending(
    headers: List[Tuple[str, str]], fixed: FixState, raw_server: RawHTTPServer
) -> None:
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        with pytest.raises(ValueError, match="Content-Length"):
            async with session.post(
                raw_server.url("/upload"), data=b"0123456789", headers=headers
            ):
                pass  # pragma: no cover
    await raw_server.settle()
    assert raw_server.connections == []


@pytest.mark.parametrize(
    "headers", [h for _, h in INVALID], ids=[name for name, _ in INVALID]
)
async def test_invalid_content_length_bug_reproduces(
    headers: List[Tuple[str, str]], unfixed: FixState, raw_server: RawHTTPServer
) -> None:
    error: Optional[BaseException] = None
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        try:
            async with session.post(
                raw_server.url("/upload"), data=b"0123456789", headers=headers
            ) as resp:
                await resp.read()
        except (ValueError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = exc
    await raw_server.settle()
    # Released aiohttp does not check the value: the request goes out.
    assert len(raw_server.connections) == 1, error


# --------------------------------------------------------------------------
# The instrument: the raw server notices what these tests look for.

WIRE_SAMPLES = [
    pytest.param(
        b"POST /upload HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + SMUGGLE,
        ["/upload", "/smuggled"],
        b"",
        True,
        id="smuggled",
    ),
    pytest.param(
        b"POST /upload HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcdef",
        ["/upload"],
        b"def",
        True,
        id="stray",
    ),
    pytest.param(
        b"POST /upload HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ["/upload"],
        b"",
        True,
        id="two-content-lengths",
    ),
    pytest.param(
        b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        ["/upload"],
        b"",
        False,
        id="chunked",
    ),
]


@pytest.mark.parametrize(("wire", "targets", "stray", "failed"), WIRE_SAMPLES)
async def test_raw_server_sees_what_is_on_the_wire(
    wire: bytes,
    targets: List[str],
    stray: bytes,
    failed: bool,
    raw_server: RawHTTPServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", raw_server.port)
    writer.write(wire)
    writer.write_eof()
    await reader.read()  # until the server closes
    writer.close()
    await writer.wait_closed()
    await raw_server.settle()
    assert [r.target for r in raw_server.requests] == targets
    assert raw_server.stray == stray
    assert bool(raw_server.failures) is failed
    if not failed:
        assert raw_server.requests[0].body == b"abcde"


# --------------------------------------------------------------------------
# A BytesIO whose size is the declared length skips the contract wrappers
# (content_length_limit.bypass); the writer is still limited.


class _GrowingBytesIO(io.BytesIO):
    """Grows by ``extra`` bytes at its first read: changed while being sent."""

    def __init__(self, data: bytes, extra: bytes) -> None:
        super().__init__(data)
        self.extra = extra

    def read(self, size: Optional[int] = -1) -> bytes:
        if self.extra:
            position = self.tell()
            self.seek(0, io.SEEK_END)
            self.write(self.extra)
            self.seek(position)
            self.extra = b""
        return super().read(size)


async def test_bytesio_grown_while_sent_stops_at_declared_length(
    fixed: FixState, raw_server: RawHTTPServer
) -> None:
    data = body_bytes(3 * CHUNK, 3 * CHUNK)
    body = _GrowingBytesIO(data, b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    with overlong_policy("truncate"):
        async with aiohttp.ClientSession(timeout=SAFETY) as session:
            async with session.post(raw_server.url("/upload"), data=body) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    [request] = raw_server.requests
    assert request.header("Content-Length") == str(len(data))
    assert request.body == data
    assert request.complete


@pytest.mark.parametrize("policy", ["truncate", "warn"])
async def test_bytearray_grown_after_the_request_was_built(
    fixed: FixState, raw_server: RawHTTPServer, policy: str
) -> None:
    """A bytearray's size is taken when the request is built; one that grows
    before its write (here: in the request-headers trace signal) must still
    stop at the declared length, not smuggle what it gained."""
    data = bytearray(b"r" * CHUNK)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    trace = aiohttp.TraceConfig()

    async def grow(*_: Any) -> None:
        data.extend(smuggled)

    trace.on_request_headers_sent.append(grow)
    with overlong_policy(policy), captured_log() as log:
        async with aiohttp.ClientSession(timeout=SAFETY, trace_configs=[trace]) as s:
            async with s.post(raw_server.url("/upload"), data=data) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    [request] = raw_server.requests
    assert request.header("Content-Length") == str(CHUNK)
    assert request.body == b"r" * CHUNK
    reported = [m for m in log.messages if "longer than its Content-Length" in m]
    if policy == "warn" and aiohttp_payloadfix.is_applied("overlong-body-warning"):
        assert len(reported) == 1
    else:
        assert reported == []
