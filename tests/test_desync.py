"""Desync property test (issue 6): no request body, whatever its type, size,
declared Content-Length, framing, compression or Expect: 100-continue, puts
bytes on the wire that the server parses as anything but that body.

One ClientSession with a single pooled connection sends every generated
request to the strict raw server of conftest, and after each one a sentinel
``GET``; connections are reused across examples, so a request that leaves
bytes behind desynchronises the ones after it. Invariants, per example:

* the server never parses body bytes as a request line (no ``/smuggled``
  request, no garbage where a request line belongs);
* it receives exactly ``min(declared, available)`` body bytes (the whole body
  without a declared length), or the request fails with a clear error
  (``ValueError`` before sending, ``ContentLengthError``) and its connection
  is discarded: the request is the last one on a connection that ended;
* the sentinel arrives intact, on the same connection when the request
  succeeded, and no other connection to the server stays open;
* every connection carries only complete requests, but for a last one that
  failed.

A few hundred derandomized examples in the default suite; ``nox -s soak``
(``PAYLOADFIX_SOAK=1``) runs 25,000.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Counter, Dict, Iterator, List, Optional, Tuple

import aiohttp
import pytest
from conftest import RawConnection, RawRequest, Reply, fix_needed, switched
from fixes.contract_support import PayloadfixLog, captured_log, overlong_policy
from hypothesis import event, given
from hypothesis import strategies as st
from soak_support import (
    PROFILE,
    SAFETY,
    BodyMaker,
    TrackingServer,
    content,
    decoded,
    record_counts,
)

from aiohttp_payloadfix import ContentLengthError, _api
from aiohttp_payloadfix._fix import AIOHTTP_VERSION

#: The invariants are the package's (ContentLengthError, the over-long report,
#: expect-continue-close): on 3.13+ it patches nothing by design.
pytestmark = pytest.mark.skipif(
    AIOHTTP_VERSION >= _api.FIXED_UPSTREAM,
    reason=f"aiohttp {aiohttp.__version__} is left untouched by the package",
)

MODES = ("absent", "smaller", "equal", "larger")
POLICIES = ("warn", "truncate", "error")
MIB = 2**20
EARLY = Reply(status=413, answer_after=0)


@dataclass(frozen=True)
class Case:
    kind: str
    size: int
    mode: str
    #: How far below the available size a smaller declared length is, or
    #: above it (less one) a larger one.
    offset: int
    chunked: bool
    compress: bool
    expect100: bool
    policy: str
    method: str
    non_ascii: bool
    #: Chunk size of generator and custom payload bodies.
    chunk: int
    #: The server answers 413 right after the head (without a 100 to an
    #: Expect: 100-continue), keeps the connection and reads the body.
    early: bool = False


#: chunked=True and compress refuse a declared length: a quarter of the cases.
RARELY = st.sampled_from((False, False, False, True))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    mode = draw(st.sampled_from(MODES))
    size = draw(
        st.one_of(
            st.integers(0, 4096),
            st.sampled_from([0, 1, 65535, 65536, 65537, MIB - 1, MIB]),
            st.integers(0, MIB),
        )
    )
    if mode == "smaller":
        size = max(size, 1)
    return Case(
        kind=draw(st.sampled_from(BodyMaker.KINDS)),
        size=size,
        mode=mode,
        offset=draw(st.one_of(st.integers(0, 100), st.integers(0, MIB))),
        chunked=draw(RARELY),
        compress=draw(RARELY),
        expect100=draw(st.booleans()),
        policy=draw(st.sampled_from(POLICIES)),
        method=draw(st.sampled_from(("POST", "PUT"))),
        non_ascii=draw(st.booleans()),
        chunk=draw(st.sampled_from((997, 16_384, 65_536))),
        early=draw(RARELY),
    )


def declared_for(case: Case, available: int) -> Optional[int]:
    if case.mode == "absent":
        return None
    if case.mode == "equal":
        return available
    if case.mode == "larger":
        return available + 1 + case.offset
    return available - 1 - min(case.offset, available - 1)


@dataclass(frozen=True)
class Expected:
    #: "ok", "value-error" (refused before sending) or "length-error".
    outcome: str
    #: What the server gets (before compression), for "ok".
    body: bytes = b""
    #: WARNING records logged for the request.
    warnings: int = 0
    #: A ValueError is as right as "ok" (compress with Content-Length on an
    #: empty body: 3.10.6+ drops compression for a falsy body, earlier
    #: releases only for None).
    or_value_error: bool = False


def expected(case: Case, data: Any, wire: bytes, declared: Optional[int]) -> Expected:
    if declared is not None and case.chunked:
        return Expected("value-error")
    or_value_error = False
    if declared is not None and case.compress:
        if data:  # never compressed when empty
            return Expected("value-error")
        or_value_error = True
    if declared is None or declared == len(wire):
        return Expected("ok", wire, or_value_error=or_value_error)
    if declared > len(wire):
        return Expected("length-error", or_value_error=or_value_error)
    if case.policy == "error":
        return Expected("length-error", or_value_error=or_value_error)
    return Expected(
        "ok",
        wire[:declared],
        warnings=int(case.policy == "warn"),
        or_value_error=or_value_error,
    )


#: Body kinds whose size aiohttp (with computed-lengths) does not know before
#: sending: an over-long one is found by reading past the declared length.
UNSIZED = frozenset({"open-r", "async-generator"})


def unreported_race(case: Case, declared: Optional[int], want: Expected) -> bool:
    """A known gap: an unsized body declared empty and sent with
    Expect: 100-continue. The server answers the empty request right after
    its 100; aiohttp's body write, still waiting for that 100, is cancelled by
    the answer before it could look for a first byte, so the excess goes
    unreported (nothing reaches the wire: no desync)."""
    return (
        case.kind in UNSIZED
        and case.expect100
        and declared == 0
        and (want.outcome == "length-error" or want.warnings > 0)
    )


class Harness:
    """An event loop, the tracking server and one ClientSession (one pooled
    connection), kept across examples; rebuilt after a failed example so
    that the next one starts clean."""

    def __init__(self, folder: Path, log: PayloadfixLog) -> None:
        self.loop = asyncio.new_event_loop()
        self.maker = BodyMaker(folder)
        self.log = log
        self.counts: Counter[str] = collections.Counter()
        self.created = 0
        self._records = 0
        self.server: Optional[TrackingServer] = None
        self.session: Optional[aiohttp.ClientSession] = None
        self.run(self._open())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, SAFETY))

    async def _open(self) -> None:
        self.server = TrackingServer()
        await self.server.start()
        trace = aiohttp.TraceConfig()

        async def on_create_end(*_args: Any) -> None:
            self.created += 1

        trace.on_connection_create_end.append(on_create_end)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=SAFETY),
            trace_configs=[trace],
        )

    async def _close(self, check: bool = True) -> None:
        server, session = self.server, self.session
        self.server = self.session = None
        try:
            if session is not None:
                await session.close()
            if server is not None:
                await server.settle()
        finally:
            if server is not None:
                await server.close()
        if check and server is not None:
            check_connections(server)

    def close(self) -> None:
        try:
            self.run(self._close())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def check(self, case: Case) -> str:
        """Send ``case`` and a sentinel, check the invariants; the outcome."""
        try:
            outcome: str = self.run(self._check(case))
        except BaseException:
            self.counts["failed examples"] += 1
            with contextlib.suppress(BaseException):
                self.run(self._close(check=False))
            self.run(self._open())
            raise
        return outcome

    async def _check(self, case: Case) -> str:
        server, session = self.server, self.session
        assert server is not None and session is not None
        n = self.counts["requests generated"]
        self.counts["requests generated"] += 1
        available = case.size
        cut = available // 2
        if case.mode == "smaller" and case.kind != "multipart":
            cut = declared_for(case, available) or 0
        text = content(
            case.size, cut, case.non_ascii and case.kind in BodyMaker.TEXT_KINDS
        )
        body = await self.maker.make(case.kind, text, case.chunk)
        declared = declared_for(case, len(body.wire))
        want = expected(case, body.data, body.wire, declared)
        headers = {} if declared is None else {"Content-Length": str(declared)}
        failures, arrivals = len(server.failures), len(server.arrivals)
        records = self._records = len(self.log.records)
        target = f"/case/{n}"
        outcome = "ok"
        if case.early:
            server.routes[target] = EARLY
            server.no_continue.add(target)
        try:
            async with session.request(
                case.method,
                server.url(target),
                data=body.data,
                headers=headers,
                chunked=True if case.chunked else None,
                compress="deflate" if case.compress else None,
                expect100=case.expect100,
            ) as resp:
                await resp.read()
                if case.early and resp.status == 413:
                    outcome = "early"
                else:
                    assert resp.status == 200
        except ValueError:
            outcome = "value-error"
        except ContentLengthError:
            outcome = "length-error"
        finally:
            await body.close()
            server.routes.pop(target, None)
            server.no_continue.discard(target)
        sentinel = f"/sentinel/{n}"
        async with session.get(server.url(sentinel)) as resp:
            assert resp.status == 200
            await resp.read()

        def sentinel_conn() -> Optional[RawConnection]:
            for conn, request in server.arrivals[arrivals:]:
                if request.target == sentinel:
                    return conn
            return None

        # The client holds one connection at most: the sentinel's. Every other
        # connection to the server ends.
        await server.wait_until(
            lambda: server.live() == [sentinel_conn()], "other connections to end"
        )
        assert server.failures[failures:] == [], case
        got = [(c, r) for c, r in server.arrivals[arrivals:] if r.target == target]
        assert len(got) <= 1
        assert [r.target for _c, r in server.arrivals[arrivals:]] in (
            [target, sentinel],
            [sentinel, target],
            [sentinel],
        ), case
        (last,) = [
            (c, r) for c, r in server.arrivals[arrivals:] if r.target == sentinel
        ]
        conn_s, req_s = last
        assert (req_s.method, req_s.complete, req_s.status) == ("GET", True, 200)
        assert req_s.body == b""

        if want.or_value_error and outcome == "value-error":
            want = Expected("value-error")
        if outcome == "ok" and unreported_race(case, declared, want):
            # Known, see unreported_race: the body was cut to nothing silently.
            self.counts["over-long cut unreported (known race)"] += 1
            want = Expected("ok", b"")
        if case.early and want.outcome != "value-error":
            return self._check_early(case, declared, body.wire, want, outcome, got)
        assert outcome == want.outcome, (case, declared, len(body.wire))
        assert len(self.log.records) - records == want.warnings, case
        self.counts[f"outcome {outcome}"] += 1
        if outcome == "value-error":
            assert got == []
        elif outcome == "length-error":
            # The connection is discarded: the request was the last one on it.
            for conn, request in got:
                assert server.has_ended(conn)
                assert conn.requests[-1] is request
                assert conn is not conn_s
                assert body.wire.startswith(request.body)
                assert declared is not None
                assert len(request.body) <= min(declared, len(body.wire))
                self.counts["bytes verified"] += len(request.body)
        else:
            ((conn, request),) = got
            assert request.complete and request.status == 200
            assert request.method == case.method
            if declared is not None:
                assert request.header_values("Content-Length") == [str(declared)]
            sent = decoded(request)
            assert sent == want.body, (case, len(sent), len(want.body))
            self.counts["bytes verified"] += len(sent)
            # A successful request should leave its connection to the next
            # one; not doing so costs a connection, not correctness (counted:
            # seen on 3.12.15 with text files and Expect: 100-continue).
            if conn is not conn_s:
                assert server.has_ended(conn)
                self.counts["connections not reused after success"] += 1
                expect = ", Expect" if case.expect100 else ""
                self.counts[f"  not reused: {case.kind}{expect}"] += 1
            if declared is not None and declared < len(body.wire):
                self.counts["over-long bodies cut"] += 1
            request.body = b""  # keep the memory bounded
        return outcome

    def _check_early(
        self,
        case: Case,
        declared: Optional[int],
        wire: bytes,
        want: Expected,
        outcome: str,
        got: List[Tuple[RawConnection, RawRequest]],
    ) -> str:
        """An answer before the body: whatever the client sent of the body is
        a prefix of what it must send; the connection is reused only after a
        complete body (else the server, still reading it, would take the next
        request for body bytes: the sentinel would never be answered)."""
        server = self.server
        assert server is not None
        allowed = {"early", want.outcome} - {"ok"}
        assert outcome in allowed, (case, declared, len(wire))
        # An unsized over-long body may be cancelled before it is seen.
        assert len(self.log.records) - self._records <= want.warnings
        self.counts[f"early answer, outcome {outcome}"] += 1
        full = want.body if want.outcome == "ok" else wire[:declared]
        for conn, request in got:
            sent = decoded(request)
            assert full.startswith(sent), (case, len(sent), len(full))
            self.counts["bytes verified"] += len(sent)
            if not request.complete:
                assert server.has_ended(conn)
                assert conn.requests[-1] is request
            request.body = b""
        return outcome


def check_connections(server: TrackingServer) -> None:
    """Every connection carried complete requests only, but for its last."""
    assert server.failures == []
    assert server.stray == b""
    for conn in server.connections:
        assert all(r.complete for r in conn.requests[:-1])


@contextlib.contextmanager
def harness(tmp_path: Path) -> Iterator[Harness]:
    with captured_log() as log:
        h = Harness(tmp_path, log)
        try:
            yield h
        finally:
            h.close()


def test_generated_requests_never_desync(tmp_path: Path) -> None:
    started = time.monotonic()
    with overlong_policy(None), harness(tmp_path) as h:

        @PROFILE
        @given(case=cases())
        def one(case: Case) -> None:
            with overlong_policy(case.policy):
                event(f"outcome {h.check(case)}")

        one()
        counts: Dict[str, Any] = dict(h.counts)
        counts["connections created"] = h.created
    counts["seconds (informational)"] = round(time.monotonic() - started, 1)
    # Every outcome class was generated.
    assert set(counts) >= {
        "outcome ok",
        "outcome value-error",
        "outcome length-error",
        "over-long bodies cut",
    }
    assert counts["requests generated"] >= PROFILE.max_examples
    assert counts.get("failed examples", 0) == 0
    # A new connection only after a failed request or an early answer.
    early = sum(v for k, v in counts.items() if k.startswith("early answer"))
    assert counts["connections created"] <= (
        1
        + counts["outcome length-error"]
        + early
        + counts.get("connections not reused after success", 0)
    )
    record_counts("desync", counts)


# --------------------------------------------------------------------------
# The checker catches a desync.

SMUGGLING = Case(
    kind="bytes",
    size=200,
    mode="smaller",
    offset=99,
    chunked=False,
    compress=False,
    expect100=False,
    policy="truncate",
    method="POST",
    non_ascii=False,
    chunk=997,
)


def test_checker_passes_an_overlong_body_when_fixed(tmp_path: Path) -> None:
    with overlong_policy("truncate"), harness(tmp_path) as h:
        assert h.check(SMUGGLING) == "ok"
        assert h.counts["over-long bodies cut"] == 1


@pytest.mark.parametrize("policy", ["warn", "error"])
def test_overlong_text_file_declared_empty_is_reported(
    tmp_path: Path, policy: str
) -> None:
    """Found by the property test: a text file (size unknown) with
    ``Content-Length: 0`` was cut to nothing silently on 3.9-3.11, because
    the server's answer to the empty request cancelled the write before its
    read in a thread returned."""
    case = dataclasses.replace(
        SMUGGLING, kind="open-r", size=1, offset=0, policy=policy
    )
    with overlong_policy(policy), harness(tmp_path) as h:
        want = "ok" if policy == "warn" else "length-error"
        assert h.check(case) == want
        assert len(h.log.records) == (1 if policy == "warn" else 0)


def test_checker_catches_smuggling_unfixed(tmp_path: Path) -> None:
    """With content-length-limit reverted, aiohttp before 3.12 puts the
    excess of an over-long bytes body on the wire: the server parses
    ``GET /smuggled`` and the check fails (3.12+ cuts bytes bodies itself)."""
    if not fix_needed("content-length-limit") or AIOHTTP_VERSION >= (3, 12):
        pytest.skip(f"aiohttp {aiohttp.__version__} cuts an over-long bytes body")
    with overlong_policy("truncate"), switched("content-length-limit", False):
        with harness(tmp_path) as h:
            with pytest.raises(AssertionError) as info:
                h.check(SMUGGLING)
            assert "request line made of body bytes" in str(info.value)
            # The harness is rebuilt after a failed example.
            assert h.counts["failed examples"] == 1
