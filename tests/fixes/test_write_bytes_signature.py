"""write-bytes-signature: code written for aiohttp 3.11's
``ClientRequest.write_bytes(writer, conn)`` keeps working on 3.12.

aiohttp 3.12.0 added a third parameter, ``content_length``; 3.12.15 (PR
#11336) gave it a default, but ``ClientRequest.send`` still calls
``write_bytes(writer, conn, content_length)``, so a ``request_class`` that
overrides write_bytes with the 3.11 signature fails on every 3.12 release, and
a 3.11-style call ``write_bytes(writer, conn)`` fails on 3.12.0-3.12.14.
Checked end to end against the strict raw server of conftest.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import (
    IO,
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
    Type,
)

import aiohttp
import pytest
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from conftest import (
    PATCHED_CLASSES,
    SMUGGLED_PATH,
    FixState,
    MemoryWriter,
    RawHTTPServer,
)
from yarl import URL

import aiohttp_payloadfix
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import LEDGER, MARKER
from aiohttp_payloadfix.fixes import by_id

FIX_ID = "write-bytes-signature"
DATA = b"".join(b"%05d abcdefghijklmnopqrstuvwxyz\n" % i for i in range(3000))
#: Declared Content-Length 10, then a request line: if more than the declared
#: bytes reach the wire the raw server records ``GET /smuggled``.
OVERLONG = b"0123456789GET " + SMUGGLED_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
DECLARED = 10
#: Bounds a hang in a failing test (a body that never comes); nothing is
#: asserted about time.
SAFETY = aiohttp.ClientTimeout(total=10)
#: The 3.12 releases, where aiohttp passes (and may require) content_length.
ON_3_12 = (3, 12, 0) <= AIOHTTP_VERSION < (3, 13, 0)


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


def released_breaks_overrides() -> bool:
    """The installed aiohttp, as released, passes content_length to a
    write_bytes override (3.12.0 and newer, 3.13+ included)."""
    return by_id(FIX_ID).probe() is not None


def only(*fix_ids: str) -> None:
    """Revert every applied fix but ``fix_ids`` (the ``fixed``/``unfixed``
    fixture puts them back after the test). Other fixes wrap write_bytes with
    a defaulted content_length too; alone, this fix must do it itself."""
    others = [i for i in LEDGER.applied() if i not in fix_ids]
    if others:
        aiohttp_payloadfix.revert(others)


def quiet_overlong_bodies() -> None:
    """overlong-body-warning (where this package has it) logs the over-long
    bodies these tests send on purpose; the autouse log check would fail."""
    if LEDGER.is_applied("overlong-body-warning"):
        aiohttp_payloadfix.revert(["overlong-body-warning"])


# --------------------------------------------------------------------------
# Request classes as third-party code writes them.

#: (which override, path, content_length it received) per call, in order.
CALLS: List[Tuple[str, str, Optional[int]]] = []


def upload_calls() -> List[Tuple[str, Optional[int]]]:
    """The calls for the upload (some releases call write_bytes for the
    body-less follow-up request too)."""
    return [(name, length) for name, path, length in CALLS if path == "/upload"]


@pytest.fixture(autouse=True)
def _fresh_calls() -> Iterator[None]:
    CALLS.clear()
    yield
    CALLS.clear()


class Written311Style(ClientRequest):
    """A request_class written for 3.11: the two-argument override."""

    async def write_bytes(  # type: ignore[override,unused-ignore]
        self, writer: AbstractStreamWriter, conn: Connection
    ) -> None:
        CALLS.append(("2-arg", self.url.path, None))
        await super().write_bytes(writer, conn)  # type: ignore[call-arg,unused-ignore]


class Written312Style(ClientRequest):
    """Written for 3.12.0: content_length is a required third parameter."""

    async def write_bytes(  # type: ignore[override,unused-ignore]
        self,
        writer: AbstractStreamWriter,
        conn: Connection,
        content_length: Optional[int],
    ) -> None:
        CALLS.append(("3-arg", self.url.path, content_length))
        await super().write_bytes(writer, conn, content_length)  # type: ignore[call-arg,unused-ignore]


class Written31215Style(ClientRequest):
    """Written for 3.12.15: content_length with its default."""

    async def write_bytes(  # type: ignore[override,unused-ignore]
        self,
        writer: AbstractStreamWriter,
        conn: Connection,
        content_length: Optional[int] = None,
    ) -> None:
        CALLS.append(("3-arg default", self.url.path, content_length))
        await super().write_bytes(writer, conn, content_length)  # type: ignore[call-arg,unused-ignore]


class Wrapper311Style(ClientRequest):
    """Takes whatever send passes and calls the base class the 3.11 way, as
    test wrappers and instrumentation do: ``write_bytes(writer, conn)``."""

    async def write_bytes(
        self, writer: AbstractStreamWriter, conn: Connection, *rest: Any
    ) -> None:
        CALLS.append(("wrapper", self.url.path, rest[0] if rest else None))
        await ClientRequest.write_bytes(self, writer, conn)  # type: ignore[call-arg,unused-ignore]


# --------------------------------------------------------------------------
# Bodies.


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]


@pytest.fixture
def opened() -> Iterator[List[IO[Any]]]:
    files: List[IO[Any]] = []
    yield files
    for f in files:
        f.close()


BodyMaker = Callable[[str, bytes], Any]


@pytest.fixture
def make_body(tmp_path: Path, opened: List[IO[Any]]) -> BodyMaker:
    def make(kind: str, data: bytes) -> Any:
        if kind == "bytes":
            return data
        if kind == "BytesIO":
            return io.BytesIO(data)
        if kind == "file":
            path = tmp_path / f"body-{len(opened)}"
            path.write_bytes(data)
            f = open(path, "rb")
            opened.append(f)
            return f
        assert kind == "async generator"
        return _chunks(data)

    return make


BODY_KINDS = ("bytes", "BytesIO", "file", "async generator")


async def post(
    raw_server: RawHTTPServer,
    request_class: Type[ClientRequest],
    data: Any,
    headers: Optional[Dict[str, str]] = None,
) -> None:
    """POST ``data`` with ``request_class``, then a plain request on the same
    session: whatever the first one left on the wire, the server parses it."""
    async with aiohttp.ClientSession(
        request_class=request_class, timeout=SAFETY
    ) as session:
        async with session.post(
            raw_server.url("/upload"), data=data, headers=headers
        ) as resp:
            assert resp.status == 200
            await resp.read()
        async with session.get(raw_server.url("/next")) as resp:
            assert resp.status == 200
    await raw_server.settle()


# --------------------------------------------------------------------------
# A 3.11-style override, end to end.


@pytest.mark.parametrize("kind", BODY_KINDS)
async def test_311_style_override_sends_the_body(
    kind: str, fixed: FixState, raw_server: RawHTTPServer, make_body: BodyMaker
) -> None:
    await post(raw_server, Written311Style, make_body(kind, DATA))
    raw_server.assert_clean()
    assert upload_calls() == [("2-arg", None)]
    upload, after = raw_server.requests
    assert (upload.target, upload.complete, upload.body) == ("/upload", True, DATA)
    assert upload.chunked == (kind == "async generator")
    assert after.target == "/next"
    assert len(raw_server.connections) == 1


@pytest.mark.parametrize("kind", BODY_KINDS)
async def test_311_style_override_bug_reproduces(
    kind: str, unfixed: FixState, raw_server: RawHTTPServer, make_body: BodyMaker
) -> None:
    if not released_breaks_overrides():
        # 3.9-3.11: the signature the override was written for.
        await post(raw_server, Written311Style, make_body(kind, DATA))
        assert [r.body for r in raw_server.requests] == [DATA, b""]
        return
    with pytest.raises(TypeError, match="positional argument"):
        await post(raw_server, Written311Style, make_body(kind, DATA))
    assert upload_calls() == []
    await raw_server.settle()
    # Nothing of a body went out: the call failed before any byte of it.
    assert all(r.body == b"" for r in raw_server.requests)


@pytest.mark.parametrize("kind", BODY_KINDS)
async def test_content_length_limit_holds_through_311_style_override(
    kind: str, fixed: FixState, raw_server: RawHTTPServer, make_body: BodyMaker
) -> None:
    """A body longer than its Content-Length: exactly the declared bytes on
    the wire, and no request made of the rest (the raw server would record
    ``GET /smuggled`` and fail)."""
    quiet_overlong_bodies()
    headers = {"Content-Length": str(DECLARED)}
    await post(raw_server, Written311Style, make_body(kind, OVERLONG), headers)
    raw_server.assert_clean()
    assert upload_calls() == [("2-arg", None)]
    assert [(r.target, r.body) for r in raw_server.requests] == [
        ("/upload", OVERLONG[:DECLARED]),
        ("/next", b""),
    ]


async def test_limit_holds_through_311_style_override_without_limit_fix(
    fixed: FixState, raw_server: RawHTTPServer
) -> None:
    """aiohttp 3.12 itself limits a request to its Content-Length (the length
    send passes to write_bytes). Making a 3.11-style override work must keep
    that limit when this package's own limit is disabled."""
    if not ON_3_12:
        pytest.skip("before 3.12 aiohttp itself has no Content-Length limit")
    aiohttp_payloadfix.revert(["content-length-limit"])
    assert LEDGER.is_applied(FIX_ID)
    assert not LEDGER.is_applied("content-length-limit")
    headers = {"Content-Length": str(DECLARED)}
    await post(raw_server, Written311Style, OVERLONG, headers)
    assert [(r.target, r.body) for r in raw_server.requests] == [
        ("/upload", OVERLONG[:DECLARED]),
        ("/next", b""),
    ]
    raw_server.assert_clean()


# --------------------------------------------------------------------------
# Calling write_bytes(writer, conn) directly.


class StubProtocol:
    """What write_bytes needs of ``conn.protocol``."""

    def __init__(self) -> None:
        self.errors: List[BaseException] = []
        self.timeouts_started = 0

    def set_exception(self, exc: BaseException, exc_cause: Any = None) -> None:
        self.errors.append(exc)

    def exception(self) -> Optional[BaseException]:
        return self.errors[0] if self.errors else None

    def start_timeout(self) -> None:
        self.timeouts_started += 1


class StubConnection:
    def __init__(self) -> None:
        self.protocol = StubProtocol()
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def test_direct_two_argument_call(fixed: FixState) -> None:
    """``req.write_bytes(writer, conn)`` on a plain ClientRequest: this fix
    alone makes it work (3.12.0-3.12.14 required the third argument)."""
    only(FIX_ID)
    req = ClientRequest("POST", URL("http://127.0.0.1/upload"), data=DATA)
    writer = MemoryWriter()
    conn: Any = StubConnection()
    await req.write_bytes(writer, conn)  # type: ignore[call-arg,unused-ignore]
    assert bytes(writer.data) == DATA
    assert conn.protocol.errors == []
    assert conn.protocol.timeouts_started == 1  # the body was ended normally
    assert not conn.closed


async def test_direct_two_argument_call_bug_reproduces(unfixed: FixState) -> None:
    only()
    req = ClientRequest("POST", URL("http://127.0.0.1/upload"), data=DATA)
    writer = MemoryWriter()
    conn: Any = StubConnection()
    if (3, 12, 0) <= AIOHTTP_VERSION < (3, 12, 15):
        with pytest.raises(TypeError, match="content_length"):
            await req.write_bytes(writer, conn)  # type: ignore[call-arg,unused-ignore]
        assert writer.data == b""
    else:
        await req.write_bytes(writer, conn)  # type: ignore[call-arg,unused-ignore]
        assert bytes(writer.data) == DATA


@pytest.mark.parametrize("kind", BODY_KINDS)
async def test_wrapper_calling_base_with_two_arguments(
    kind: str, fixed: FixState, raw_server: RawHTTPServer, make_body: BodyMaker
) -> None:
    """An override that accepts what send passes but calls the base class
    with ``(writer, conn)``, end to end, with this fix alone."""
    only(FIX_ID)
    await post(raw_server, Wrapper311Style, make_body(kind, DATA))
    raw_server.assert_clean()
    assert [(r.target, r.body) for r in raw_server.requests] == [
        ("/upload", DATA),
        ("/next", b""),
    ]
    if ON_3_12:
        # send passed the length (None: chunked) on to the wrapper.
        expected = None if kind == "async generator" else len(DATA)
        assert upload_calls() == [("wrapper", expected)]
    else:
        assert upload_calls() == [("wrapper", None)]


# --------------------------------------------------------------------------
# aiohttp's own three-argument call keeps working.


@pytest.mark.parametrize("request_class", [Written312Style, Written31215Style])
@pytest.mark.parametrize("kind", BODY_KINDS)
async def test_312_style_override_gets_content_length(
    kind: str,
    request_class: Type[ClientRequest],
    fixed: FixState,
    raw_server: RawHTTPServer,
    make_body: BodyMaker,
) -> None:
    if AIOHTTP_VERSION < (3, 12, 0):
        pytest.skip("before 3.12 aiohttp calls write_bytes(writer, conn)")
    await post(raw_server, request_class, make_body(kind, DATA))
    raw_server.assert_clean()
    [(_name, received)] = upload_calls()
    assert received == (None if kind == "async generator" else len(DATA))
    assert [r.body for r in raw_server.requests] == [DATA, b""]


@pytest.mark.parametrize("kind", ["bytes", "async generator"])
async def test_312_style_override_keeps_content_length_limit(
    kind: str, fixed: FixState, raw_server: RawHTTPServer, make_body: BodyMaker
) -> None:
    if AIOHTTP_VERSION < (3, 12, 0):
        pytest.skip("before 3.12 aiohttp calls write_bytes(writer, conn)")
    quiet_overlong_bodies()
    headers = {"Content-Length": str(DECLARED)}
    await post(raw_server, Written312Style, make_body(kind, OVERLONG), headers)
    raw_server.assert_clean()
    assert upload_calls() == [("3-arg", DECLARED)]
    assert [r.body for r in raw_server.requests] == [OVERLONG[:DECLARED], b""]


async def test_subclass_without_override_gets_no_shim(
    fixed: FixState, raw_server: RawHTTPServer
) -> None:
    """The default request_class takes aiohttp's own path: no per-request
    write_bytes shim."""
    seen: List[bool] = []

    class Probe(ClientRequest):
        async def send(self, conn: Connection) -> Any:
            resp = await super().send(conn)
            seen.append("write_bytes" in vars(self))
            return resp

    await post(raw_server, Probe, DATA)
    assert seen == [False, False]
    assert [r.body for r in raw_server.requests] == [DATA, b""]


def ours(value: Any) -> bool:
    """``value`` is this fix's replacement, or a later fix's wrapper of it."""
    for _ in range(20):
        value = getattr(value, "__func__", value)
        if getattr(value, MARKER, None) == FIX_ID:
            return True
        value = getattr(value, "__wrapped__", None)
        if value is None:
            break
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
        # write_bytes too on 3.12.15: called without content_length it takes
        # the one send() would pass, so a 3.11-style override keeps the limit.
        assert patched == ["ClientRequest.send", "ClientRequest.write_bytes"]
    else:
        # 3.9-3.11 have the 3.11 signature; 3.13+ is left alone by design.
        assert not aiohttp_payloadfix.is_applied(FIX_ID)
        assert patched == []
