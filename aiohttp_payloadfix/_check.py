"""A live self-test: real requests against an aiohttp server on 127.0.0.1.

Each scenario exercises one fix and says what happened on the wire
(connections opened, bytes the server received). ``run_checks`` runs them once;
the CLI runs them with the fixes reverted and applied for ``check --compare``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, List, Optional, Tuple

import aiohttp
from aiohttp import web

from ._fix import AIOHTTP_VERSION

__all__ = ("Outcome", "SCENARIOS", "Scenario", "run_checks")

# The server side logs the malformed requests the unpatched client sends.
_QUIET = logging.getLogger("aiohttp_payloadfix.check.server")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

_SMUGGLE = b"0123456789GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass(frozen=True)
class Outcome:
    text: str
    ok: bool


@dataclass
class _Server:
    url: str
    received: List[Tuple[str, str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Scenario:
    name: str
    fix_id: str
    run: Callable[[_Server], Awaitable[Outcome]]


def _counting_session(**kwargs: Any) -> Tuple[aiohttp.ClientSession, List[int]]:
    created = [0]

    async def on_create(*_: Any) -> None:
        created[0] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    return aiohttp.ClientSession(trace_configs=[trace], **kwargs), created


async def _sequential(server: _Server, make_body: Callable[[], Any]) -> Outcome:
    session, created = _counting_session()
    async with session:
        for _ in range(20):
            async with session.post(server.url + "/upload", data=make_body()) as resp:
                await resp.read()
    n = created[0]
    return Outcome(f"{n} connection{'s' if n != 1 else ''}", n == 1)


async def _bytesio_reuse(server: _Server) -> Outcome:
    return await _sequential(server, lambda: io.BytesIO(b"x" * 1024))


async def _file_reuse(server: _Server) -> Outcome:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "body.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(100_000))
        return await _sequential(server, lambda: open(path, "rb"))  # noqa: SIM115


async def _seed(server: _Server) -> Outcome:
    # The reproduction from aio-libs/aiohttp#10325.
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.url + "/upload",
            data=io.BytesIO(),
            headers={"Content-Length": "0"},
        ) as resp:
            await resp.read()
        connector: Any = session.connector
        pooled = sum(len(v) for v in connector._conns.values())
    return Outcome(f"{pooled} pooled", pooled == 1)


async def _limit(server: _Server) -> Outcome:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.url + "/upload", data=_SMUGGLE, headers={"Content-Length": "10"}
        ) as resp:
            await resp.read()
        # The stray request, if any, is answered on the same connection.
        for _ in range(20):
            await asyncio.sleep(0.005)
    smuggled = [r for r in server.received if r[1] == "/smuggled"]
    body = next((r[2] for r in server.received if r[1] == "/upload"), b"")
    if smuggled:
        return Outcome("stray request GET /smuggled", False)
    return Outcome(f"{len(body)} of 10 bytes", body == _SMUGGLE[:10])


async def _invalid_length(server: _Server) -> Outcome:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(
                server.url + "/upload", data=b"abcdef", headers={"Content-Length": "-3"}
            ) as resp:
                await resp.read()
        except ValueError:
            return Outcome("ValueError", not server.received)
    if server.received:
        return Outcome(f"sent, server got {len(server.received[0][2])} bytes", False)
    return Outcome("sent to the server", False)


async def _redirect_resend(server: _Server) -> Outcome:
    payload = os.urandom(300_000)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "body.bin")
        with open(path, "wb") as f:
            f.write(payload)
        async with aiohttp.ClientSession() as session:
            try:
                with open(path, "rb") as f:
                    async with session.post(server.url + "/redirect", data=f) as resp:
                        await resp.read()
            except (aiohttp.ClientError, ValueError) as exc:
                return Outcome(f"error: {type(exc).__name__}", True)
    got = [r[2] for r in server.received if r[1] == "/upload"]
    if got and got[-1] == payload:
        return Outcome("whole body resent", True)
    size = len(got[-1]) if got else 0
    return Outcome(f"resent {size} of {len(payload)} bytes", False)


class _RecordingReader(io.BufferedReader):
    """An open file that remembers the largest read it was asked for."""

    largest = 0

    def read(self, size: Optional[int] = -1) -> bytes:
        if size is None or size < 0:
            self.largest = max(self.largest, 1 << 62)
        else:
            self.largest = max(self.largest, size)
        return super().read(size)


async def _bounded_reads(server: _Server) -> Outcome:
    size = 8 * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "body.bin")
        with open(path, "wb") as f:
            f.truncate(size)
        async with aiohttp.ClientSession() as session:
            with _RecordingReader(io.FileIO(path)) as f:
                headers = {"Content-Length": str(size)}
                async with session.post(
                    server.url + "/upload", data=f, headers=headers
                ) as resp:
                    await resp.read()
                largest = f.largest
    got = len(server.received[-1][2]) if server.received else 0
    if got != size:
        return Outcome(f"server got {got} of {size} bytes", False)
    if largest >= 1 << 62:
        return Outcome("read the whole file at once", False)
    return Outcome(f"largest read {largest // 1024} KiB", largest <= 2**16)


async def _old_signature(server: _Server) -> Outcome:
    from aiohttp.client_reqrep import ClientRequest

    class Written311Style(ClientRequest):
        async def write_bytes(self, writer: Any, conn: Any) -> None:  # type: ignore[override,unused-ignore]
            await super().write_bytes(writer, conn)

    try:
        async with aiohttp.ClientSession(request_class=Written311Style) as session:
            async with session.post(server.url + "/upload", data=b"hello") as resp:
                await resp.read()
    except TypeError as exc:
        return Outcome(f"TypeError: {str(exc).split(') ')[-1]}", False)
    got = server.received[-1][2] if server.received else b""
    return Outcome("works", got == b"hello")


_HANG = 2.0  # seconds: a client that waits this long would wait for good


async def _short_body(server: _Server) -> Outcome:
    from ._contract import ContentLengthError

    timeout = aiohttp.ClientTimeout(total=_HANG)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.post(
                server.url + "/upload", data=b"abc", headers={"Content-Length": "10"}
            ) as resp:
                await resp.read()
        except ContentLengthError:
            return Outcome("ContentLengthError", True)
        except asyncio.TimeoutError:
            return Outcome("hangs", False)
    return Outcome(f"answered {resp.status}", False)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _overlong(server: _Server) -> Outcome:
    records = _Records()
    logger = logging.getLogger("aiohttp_payloadfix")
    logger.addHandler(records)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.url + "/upload",
                data=b"0123456789",
                headers={"Content-Length": "5"},
            ) as resp:
                await resp.read()
    finally:
        logger.removeHandler(records)
    body = server.received[0][2] if server.received else b""
    if len(server.received) > 1 or body != b"01234":
        return Outcome("extra bytes on the wire", False)
    if not records.count:
        return Outcome("cut silently", False)
    return Outcome(f"5 bytes sent, {records.count} warning", records.count == 1)


async def _crlf_text(server: _Server) -> Outcome:
    text = "d\xe9j\xe0 vu\r\n" * 1000
    timeout = aiohttp.ClientTimeout(total=_HANG)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "body.txt")
        with open(path, "w", encoding="latin-1", newline="") as f:
            f.write(text)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                with open(path, encoding="latin-1") as f:
                    async with session.post(server.url + "/upload", data=f) as resp:
                        await resp.read()
            except asyncio.TimeoutError:
                return Outcome("hangs", False)
    expected = text.replace("\r\n", "\n").encode("utf-8")
    got = server.received[-1][2] if server.received else b""
    if got == expected:
        return Outcome("exact text", True)
    return Outcome(f"server got {len(got)} of {len(expected)} bytes", False)


async def _head_with_body(server: _Server) -> Outcome:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/upload", data=b"warm") as resp:
            await resp.read()
        connector: Any = session.connector
        ((protocol, _),) = [c for conns in connector._conns.values() for c in conns]
        transport = protocol.transport
        write = transport.write
        writes = [0]

        def counting(data: Any) -> None:
            writes[0] += 1
            write(data)

        # The instance's own attribute, on asyncio's transport, for ten requests.
        transport.write = counting
        try:
            for _ in range(10):
                data = b"x" * 1024
                async with session.post(server.url + "/upload", data=data) as resp:
                    await resp.read()
        finally:
            del transport.write
    per = writes[0] / 10
    return Outcome(f"{per:g} write{'s' if per != 1 else ''} per request", per == 1)


async def _expect_rejected(server: _Server) -> Outcome:
    # The server refuses the body (413) instead of sending 100 Continue, so
    # the body is never sent: the connection must not go back to the pool.
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.url + "/expect-reject", data=b"x" * 1024, expect100=True
        ) as resp:
            status = resp.status
            await resp.read()
        for _ in range(5):
            await asyncio.sleep(0.01)
        connector: Any = session.connector
        pooled = sum(len(v) for v in connector._conns.values())
    return Outcome(f"{status}, {pooled} pooled", status == 413 and pooled == 0)


SCENARIOS: Tuple[Scenario, ...] = (
    Scenario("seed: BytesIO(), Content-Length: 0", "file-payload-reuse", _seed),
    Scenario("20 POSTs of BytesIO(1 KiB)", "file-payload-reuse", _bytesio_reuse),
    Scenario("20 POSTs of an open 100 kB file", "file-payload-reuse", _file_reuse),
    Scenario(
        "307 redirect of a file upload",
        # file-payload-reuse replaces the 3.9-3.11 write path, resends included.
        "file-resend" if AIOHTTP_VERSION >= (3, 12, 0) else "file-payload-reuse",
        _redirect_resend,
    ),
    Scenario("body longer than Content-Length", "content-length-limit", _limit),
    Scenario('Content-Length "-3"', "content-length-limit", _invalid_length),
    Scenario("8 MiB file upload, read sizes", "chunked-file-reads", _bounded_reads),
    Scenario(
        "request_class with write_bytes(writer, conn)",
        "write-bytes-signature",
        _old_signature,
    ),
    Scenario("body shorter than Content-Length", "short-body-error", _short_body),
    Scenario(
        "body longer than Content-Length, logged", "overlong-body-warning", _overlong
    ),
    Scenario("text file, CRLF newlines", "computed-lengths", _crlf_text),
    Scenario(
        "Expect: 100-continue answered 413",
        "expect-continue-close",
        _expect_rejected,
    ),
    Scenario(
        "10 POSTs of 1 KiB bytes, client writes", "coalesced-headers", _head_with_body
    ),
)


async def _serve() -> Tuple[web.AppRunner, _Server]:
    server = _Server(url="")

    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        server.received.append((request.method, request.path, body))
        if request.path == "/redirect":
            raise web.HTTPTemporaryRedirect("/upload")
        return web.Response(body=b"")

    async def reject(request: web.Request) -> web.StreamResponse:
        return web.Response(status=413)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("POST", "/expect-reject", record, expect_handler=reject)
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None, logger=_QUIET)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    return runner, server


async def _run_one(scenario: Scenario) -> Outcome:
    runner, server = await _serve()
    try:
        return await asyncio.wait_for(scenario.run(server), 30)
    except asyncio.TimeoutError:
        return Outcome("hangs", False)
    except Exception as exc:
        return Outcome(f"error: {exc!r}"[:60], False)
    finally:
        await runner.cleanup()


async def _run_all(ids: Optional[Tuple[str, ...]]) -> List[Tuple[Scenario, Outcome]]:
    # The over-long scenarios log on purpose; the table reports it.
    quiet = logging.NullHandler()
    package_log = logging.getLogger("aiohttp_payloadfix")
    package_log.addHandler(quiet)
    try:
        results = []
        for scenario in SCENARIOS:
            if ids is None or scenario.fix_id in ids:
                results.append((scenario, await _run_one(scenario)))
        return results
    finally:
        package_log.removeHandler(quiet)


def run_checks(ids: Optional[Tuple[str, ...]] = None) -> List[Tuple[Scenario, Outcome]]:
    """Run the scenarios (of the given fixes) in a fresh event loop."""
    return asyncio.run(_run_all(ids))
