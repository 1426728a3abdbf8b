"""The package next to libraries that also touch aiohttp's client.

aioresponses (mocks ``ClientSession._request``, the attribute file-payload-reuse
and file-resend patch), pytest-aiohttp's ``aiohttp_client`` fixture,
OpenTelemetry's aiohttp-client instrumentation (wraps
``ClientSession.__init__`` with wrapt), a user ``request_class`` overriding
``write_bytes`` with the 3.11 signature, and two threads each running an event
loop. The behaviour check throughout is the issue's symptom: sequential
file-like uploads on one session use one connection (on 3.10.6-3.11.18, as
released, most of them open a new one). Import order: test_interop_import_order.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Tuple
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aioresponses import aioresponses
from conftest import (
    ConnectionCounter,
    WebServer,
    _installed,
    _restore,
    _snapshot,
    fix_needed,
    switched,
)
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind
from yarl import URL

import aiohttp_payloadfix
from aiohttp_payloadfix import _api
from aiohttp_payloadfix._fix import AIOHTTP_VERSION
from aiohttp_payloadfix._ledger import LEDGER, PayloadFixWarning

REQUESTS = 20
#: Bounds a hang in a failing test; nothing is asserted about time.
SAFETY = aiohttp.ClientTimeout(total=30)
#: Where aiohttp as released closes most connections after a file-like upload.
RACE_CLOSES = (3, 10, 6) <= AIOHTTP_VERSION < (3, 12, 0)
NO_RACE = (
    f"aiohttp {aiohttp.__version__} as released rarely or never closes the"
    " connection after a file-like upload (most do on 3.10.6-3.11.18)"
)


def _aioresponses_can_mock() -> bool:
    """aioresponses (0.7.9, the newest) builds ClientResponse without the
    ``stream_writer`` that aiohttp 3.14 requires (pnuckowski/aioresponses#289):
    there only passed-through requests work."""
    init = inspect.signature(aiohttp.ClientResponse.__init__).parameters
    param = init.get("stream_writer")
    return param is None or param.default is not inspect.Parameter.empty


AIORESPONSES_CAN_MOCK = _aioresponses_can_mock()


def body(tag: str, index: int, size: int = 1024) -> bytes:
    head = f"{tag}-{index:03d}:".encode()
    return (head + b"x" * size)[:size]


async def post_bytesio(
    session: aiohttp.ClientSession, url: URL, tag: str, count: int = REQUESTS
) -> List[bytes]:
    """``count`` sequential POSTs of a BytesIO body; returns the bodies sent."""
    sent = []
    for i in range(count):
        data = body(tag, i)
        async with session.post(url, data=io.BytesIO(data), timeout=SAFETY) as resp:
            assert resp.status == 200
            await resp.read()
        sent.append(data)
    return sent


def assert_fixes_active() -> None:
    """Every fix the installed aiohttp needs is applied (none on 3.13+)."""
    assert aiohttp_payloadfix.is_applied()
    for record in aiohttp_payloadfix.status().fixes:
        assert record.applied == record.needed, record
        assert record.state == ("applied" if record.needed else "not-needed")


def assert_identical(before: Dict[type, Dict[str, Any]]) -> None:
    after = _snapshot()
    for cls, attrs in before.items():
        assert attrs.keys() == after[cls].keys(), cls
        for name, obj in attrs.items():
            assert after[cls][name] is obj, f"{cls.__qualname__}.{name}"


@contextlib.contextmanager
def package_reverted() -> Iterator[None]:
    """aiohttp as released inside the block (the test may apply again);
    afterwards exactly the fixes, objects and bookkeeping found."""
    installed = _installed()
    reverted, failed, blocked = (
        set(_api._reverted),
        dict(_api._failed),
        dict(_api._blocked),
    )
    try:
        aiohttp_payloadfix.revert()
        yield
    finally:
        _restore(installed)
        _api._reverted.clear()
        _api._reverted.update(reverted)
        _api._failed.clear()
        _api._failed.update(failed)
        _api._blocked.clear()
        _api._blocked.update(blocked)


# --------------------------------------------------------------------------
# OpenTelemetry


@dataclass
class Otel:
    instrumentor: AioHttpClientInstrumentor
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def instrument(self) -> Any:
        """Instrument; return OpenTelemetry's wrapper of ClientSession.__init__."""
        init = vars(aiohttp.ClientSession)["__init__"]
        self.instrumentor.instrument(tracer_provider=self.provider)
        wrapper = vars(aiohttp.ClientSession)["__init__"]
        assert wrapper is not init
        assert wrapper.__wrapped__ is init  # wrapt's FunctionWrapper
        return wrapper

    def client_spans(self) -> List[Tuple[str, Any]]:
        """(name, HTTP status) of each finished client span."""
        found = []
        for span in self.exporter.get_finished_spans():
            assert span.kind is SpanKind.CLIENT
            attributes = span.attributes or {}
            status = attributes.get(
                "http.status_code", attributes.get("http.response.status_code")
            )
            found.append((span.name, status))
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    """An instrumentor (not instrumenting yet) recording spans in memory;
    uninstrumented after the test whatever happened."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AioHttpClientInstrumentor()
    try:
        yield Otel(instrumentor, provider, exporter)
    finally:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        provider.shutdown()


async def test_otel_instrumented_after_the_package(
    otel: Otel, web_server: WebServer, connections: ConnectionCounter
) -> None:
    assert_fixes_active()
    ours = _snapshot()
    wrapper = otel.instrument()
    async with connections.session() as session:
        sent = await post_bytesio(session, web_server.url / "up", "after")
    assert [b for _m, _p, b in web_server.received] == sent
    assert connections.created == 1
    assert otel.client_spans() == [("POST", 200)] * REQUESTS

    # Our revert does not touch their wrapper, and warns about nothing
    # (warnings are errors): the attributes we patch are not theirs.
    with package_reverted():
        assert vars(aiohttp.ClientSession)["__init__"] is wrapper
        assert not any(r.applied for r in aiohttp_payloadfix.status().fixes)
        assert LEDGER.applied() == ()
    assert_fixes_active()

    # Their uninstrument leaves ours: the very objects, still working.
    otel.instrumentor.uninstrument()
    assert_identical(ours)
    connections.created = 0
    async with connections.session() as session:
        await post_bytesio(session, web_server.url / "up", "uninstrumented")
    assert connections.created == 1
    assert len(otel.client_spans()) == REQUESTS  # no new spans


async def test_otel_instrumented_before_the_package(
    otel: Otel, web_server: WebServer, connections: ConnectionCounter
) -> None:
    """In process: instrument aiohttp as released, then apply the package
    (test_interop_import_order.py does it with a real first import)."""
    with package_reverted():
        wrapper = otel.instrument()
        aiohttp_payloadfix.apply()
        assert_fixes_active()
        assert vars(aiohttp.ClientSession)["__init__"] is wrapper
        async with connections.session() as session:
            sent = await post_bytesio(session, web_server.url / "up", "before")
        assert [b for _m, _p, b in web_server.received] == sent
        assert connections.created == 1
        assert otel.client_spans() == [("POST", 200)] * REQUESTS

        ours = _snapshot()
        otel.instrumentor.uninstrument()
        assert vars(aiohttp.ClientSession)["__init__"] is wrapper.__wrapped__
        # Only __init__ changed back.
        ours[aiohttp.ClientSession]["__init__"] = wrapper.__wrapped__
        assert_identical(ours)
        assert_fixes_active()


# --------------------------------------------------------------------------
# aioresponses


@pytest.mark.skipif(
    not AIORESPONSES_CAN_MOCK,
    reason="aioresponses cannot build this aiohttp's ClientResponse (#289 there)",
)
async def test_aioresponses_mocks_uploads(tmp_path: Path) -> None:
    assert_fixes_active()
    before = vars(aiohttp.ClientSession)["_request"]
    path = tmp_path / "body.bin"
    path.write_bytes(body("file", 0))
    url = "http://127.0.0.1:9/mocked"  # never connected to
    with aioresponses() as mocked:
        mocked.post(url, status=201, body=b"created", repeat=True)
        async with aiohttp.ClientSession() as session:
            with path.open("rb") as file:
                for data in (b"bytes", io.BytesIO(b"bytesio"), file):
                    async with session.post(url, data=data) as resp:
                        assert resp.status == 201
                        assert await resp.read() == b"created"
        calls = mocked.requests[("POST", URL(url))]
        assert len(calls) == 3
        assert calls[0].kwargs["data"] == b"bytes"
    # aioresponses put back what it found: our replacement, where we patch it.
    assert vars(aiohttp.ClientSession)["_request"] is before
    assert_fixes_active()


async def test_aioresponses_passthrough_keeps_the_fixes(
    web_server: WebServer, connections: ConnectionCounter
) -> None:
    """Passed-through requests go to the ``_request`` aioresponses found,
    ours: one connection for all real uploads, mocked ones in between."""
    real = web_server.url / "real"
    with aioresponses(passthrough=[str(web_server.url)]) as mocked:
        mocked.post("http://mocked.invalid/x", status=204, repeat=True)
        async with connections.session() as session:
            sent = []
            for i in range(REQUESTS):
                sent += await post_bytesio(session, real, f"pass{i}", count=1)
                if not AIORESPONSES_CAN_MOCK:
                    continue
                async with session.post(
                    "http://mocked.invalid/x", data=io.BytesIO(b"m")
                ) as resp:
                    assert resp.status == 204
    assert [b for _m, _p, b in web_server.received] == sent
    assert connections.created == 1


async def test_aioresponses_passthrough_bug_reproduces(
    web_server: WebServer, connections: ConnectionCounter
) -> None:
    with switched("file-payload-reuse", applied=False) as state:
        with aioresponses(passthrough=[str(web_server.url)]):
            async with connections.session() as session:
                # A race aiohttp loses on nearly every request, but it is a
                # race: a loaded machine once let 20 in a row keep the
                # connection. Up to 100, until one is lost.
                for batch in range(5):
                    await post_bytesio(session, web_server.url / "real", f"u{batch}")
                    if connections.created > 1:
                        break
    if RACE_CLOSES:
        assert state.needed
        assert connections.created > 1
    else:
        pytest.skip(NO_RACE)


def _force(state: Dict[type, Dict[str, Any]]) -> None:
    """Put every attribute of the patched classes back to ``state``."""
    for cls, attrs in state.items():
        for name in set(vars(cls)) - set(attrs):
            delattr(cls, name)
        for name, obj in attrs.items():
            if vars(cls).get(name) is not obj:
                setattr(cls, name, obj)


def fixes_patching(owner: type, name: str) -> List[str]:
    """Applied fixes that replaced ``owner.name``, in the order revert meets them."""
    return [
        fix_id
        for fix_id in reversed(LEDGER.applied())
        if any((r.owner, r.name) == (owner, name) for r in LEDGER._records[fix_id])
    ]


def left_in_place(owner: type, name: str, fix_ids: List[str]) -> List[str]:
    return [
        f"aiohttp_payloadfix: {owner.__qualname__}.{name} was replaced by another"
        f" library after fix {fix_id!r} patched it; leaving that wrapper (and ours"
        " under it) in place"
        for fix_id in fix_ids
    ]


async def test_revert_under_an_active_mock(
    web_server: WebServer, connections: ConnectionCounter
) -> None:
    """revert() while aioresponses mocks ``_request`` leaves the mock (and our
    replacement under it) with a warning; the mock, stopped, puts ours back.
    Neither apply() nor revert() afterwards may take that leftover for
    aiohttp's original: apply() does not wrap it again, revert() removes it."""
    with package_reverted():
        released = _snapshot()
        original = released[aiohttp.ClientSession]["_request"]
        try:
            aiohttp_payloadfix.apply()
            assert_fixes_active()
            stranded = fixes_patching(aiohttp.ClientSession, "_request")
            with aioresponses(passthrough=[str(web_server.url)]):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    aiohttp_payloadfix.revert()
                async with connections.session() as session:
                    await post_bytesio(session, web_server.url / "up", "mocked")
            assert [str(w.message) for w in caught] == left_in_place(
                aiohttp.ClientSession, "_request", stranded
            )
            assert all(w.category is PayloadFixWarning for w in caught)

            aiohttp_payloadfix.apply()
            assert_fixes_active()
            on_top = vars(aiohttp.ClientSession)["_request"]
            assert inspect.unwrap(on_top) is original
            if stranded:
                assert on_top.__wrapped__ is original  # not ours on ours
            connections.created = 0
            async with connections.session() as session:
                await post_bytesio(session, web_server.url / "up", "again")
            assert connections.created == 1
            aiohttp_payloadfix.revert()
            assert_identical(released)
        finally:
            LEDGER.revert_all()
            _force(released)


async def test_revert_under_a_wrapper_of_stacked_fixes(
    web_server: WebServer,
) -> None:
    """Several fixes wrap ``ClientRequest.write_bytes`` one on another; a spy
    patched over them and removed again uncovers the whole stack, which the
    next revert() unwinds to aiohttp's original."""
    with package_reverted():
        released = _snapshot()
        try:
            aiohttp_payloadfix.apply()
            stranded = fixes_patching(ClientRequest, "write_bytes")
            below = vars(ClientRequest)["write_bytes"]
            spied: List[str] = []

            def spy(self: ClientRequest, *args: Any) -> Any:
                spied.append(self.url.path)
                return below(self, *args)

            with mock.patch.object(ClientRequest, "write_bytes", spy):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    aiohttp_payloadfix.revert()
                async with aiohttp.ClientSession() as session:
                    await post_bytesio(session, web_server.url / "up", "spy", 2)
            assert spied == ["/up"] * 2
            assert [str(w.message) for w in caught] == left_in_place(
                ClientRequest, "write_bytes", stranded
            )
            assert vars(ClientRequest)["write_bytes"] is below
            aiohttp_payloadfix.revert()
            assert_identical(released)
        finally:
            LEDGER.revert_all()
            _force(released)


# --------------------------------------------------------------------------
# pytest-aiohttp


async def test_pytest_aiohttp_client_fixture(
    aiohttp_client: Callable[..., Awaitable[Any]],
    connections: ConnectionCounter,
    tmp_path: Path,
) -> None:
    received: List[bytes] = []

    async def record(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/up", record)
    client = await aiohttp_client(app, trace_configs=[connections.trace_config])
    assert client.host == "127.0.0.1"
    path = tmp_path / "body.bin"
    sent = []
    for i in range(REQUESTS):
        data = body("fixture", i)
        path.write_bytes(data)
        with path.open("rb") as file:
            for payload in (io.BytesIO(data), file, data):
                async with client.post("/up", data=payload) as resp:
                    assert resp.status == 200
                    assert await resp.text() == "ok"
                sent.append(data)
    assert received == sent
    assert connections.created == 1


# --------------------------------------------------------------------------
# A request_class written for aiohttp 3.11

#: The request path of each call of the override.
OVERRIDE_CALLS: List[str] = []


class Written311Style(ClientRequest):
    async def write_bytes(  # type: ignore[override,unused-ignore]
        self, writer: AbstractStreamWriter, conn: Connection
    ) -> None:
        OVERRIDE_CALLS.append(self.url.path)
        await super().write_bytes(writer, conn)  # type: ignore[call-arg,unused-ignore]


async def upload_with_override(
    url: URL, connections: ConnectionCounter, tmp_path: Path
) -> List[bytes]:
    OVERRIDE_CALLS.clear()
    path = tmp_path / "body.bin"
    sent = []
    async with connections.session(request_class=Written311Style) as session:
        for i in range(REQUESTS // 2):
            data = body("override", i, size=100_000)
            path.write_bytes(data)
            with path.open("rb") as file:
                for payload in (file, io.BytesIO(data)):
                    async with session.post(url, data=payload, timeout=SAFETY) as resp:
                        assert resp.status == 200
                        await resp.read()
                    sent.append(data)
    return sent


async def test_request_class_with_311_write_bytes(
    web_server: WebServer, connections: ConnectionCounter, tmp_path: Path
) -> None:
    assert_fixes_active()
    url = web_server.url / "up"
    if AIOHTTP_VERSION >= (3, 13, 0):
        # Untouched by design (README, "Removing the dependency").
        with pytest.raises(TypeError, match="positional argument"):
            await upload_with_override(url, connections, tmp_path)
        return
    sent = await upload_with_override(url, connections, tmp_path)
    assert [b for _m, _p, b in web_server.received] == sent
    assert OVERRIDE_CALLS == ["/up"] * REQUESTS
    assert connections.created == 1


async def test_request_class_with_311_write_bytes_bug_reproduces(
    web_server: WebServer, connections: ConnectionCounter, tmp_path: Path
) -> None:
    url = web_server.url / "up"
    if fix_needed("write-bytes-signature"):
        with switched("write-bytes-signature", applied=False):
            with pytest.raises(TypeError, match="positional argument"):
                await upload_with_override(url, connections, tmp_path)
    elif RACE_CLOSES:
        with switched("file-payload-reuse", applied=False):
            await upload_with_override(url, connections, tmp_path)
        assert connections.created > 1
    else:
        pytest.skip(f"nothing for the package to fix here on {aiohttp.__version__}")


# --------------------------------------------------------------------------
# Two threads, two event loops, uploading at once


def upload_in_own_loop(
    url: URL, tag: str, path: Path, start: threading.Barrier
) -> Tuple[int, List[bytes]]:
    """Run in a thread: one session, sequential uploads of a file, a BytesIO
    and bytes; returns (connections opened, bodies sent)."""

    async def main() -> Tuple[int, List[bytes]]:
        created = 0

        async def on_create_end(*_args: Any) -> None:
            nonlocal created
            created += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_create_end)
        sent = []
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            start.wait(timeout=30)
            for i in range(REQUESTS):
                data = body(tag, i, size=200_000)
                path.write_bytes(data)
                with path.open("rb") as file:
                    for payload in (file, io.BytesIO(data), data):
                        async with session.post(
                            url / tag, data=payload, timeout=SAFETY
                        ) as resp:
                            assert resp.status == 200
                            await resp.read()
                        sent.append(data)
        return created, sent

    return asyncio.run(main())


async def uploads_in_two_threads(
    url: URL, tmp_path: Path
) -> Tuple[Dict[str, int], Dict[str, List[bytes]]]:
    start = threading.Barrier(2)
    results = await asyncio.gather(
        *(
            asyncio.to_thread(
                upload_in_own_loop, url, tag, tmp_path / f"{tag}.bin", start
            )
            for tag in ("t1", "t2")
        )
    )
    created = {"t1": results[0][0], "t2": results[1][0]}
    sent = {"t1": results[0][1], "t2": results[1][1]}
    return created, sent


async def test_two_threads_upload_at_once(
    web_server: WebServer, tmp_path: Path
) -> None:
    assert_fixes_active()
    created, sent = await uploads_in_two_threads(web_server.url, tmp_path)
    for tag in ("t1", "t2"):
        got = [b for _m, p, b in web_server.received if p == f"/{tag}"]
        assert got == sent[tag]
    # Interleaved: the threads really uploaded at the same time.
    paths = [p for _m, p, _b in web_server.received]
    assert sum(a != b for a, b in zip(paths, paths[1:])) > 1
    assert created == {"t1": 1, "t2": 1}


async def test_two_threads_bug_reproduces(
    web_server: WebServer, tmp_path: Path
) -> None:
    if not RACE_CLOSES:
        pytest.skip(NO_RACE)
    with switched("file-payload-reuse", applied=False):
        created, _sent = await uploads_in_two_threads(web_server.url, tmp_path)
    assert created["t1"] > 1
    assert created["t2"] > 1
