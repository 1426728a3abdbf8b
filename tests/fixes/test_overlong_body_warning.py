"""overlong-body-warning: a body longer than its Content-Length is never cut
silently.

The declared bytes go on the wire (content-length-limit) and, by the policy of
``configure(overlong=...)`` / ``AIOHTTP_PAYLOADFIX_OVERLONG``, one WARNING per
request on the ``aiohttp_payloadfix`` logger ("warn", the default), nothing
("truncate"), or ContentLengthError ("error": before any body byte when the
size is known). As released, 3.12+ (and the limit alone) cut silently, and
3.9-3.11 leak the rest onto the wire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional

import aiohttp
import pytest
import pytest_asyncio
from conftest import ConnectionCounter, FixState, RawHTTPServer, switched
from yarl import URL

import aiohttp_payloadfix
from aiohttp_payloadfix import ContentLengthError, PayloadFixWarning, _contract
from aiohttp_payloadfix.fixes import FIXES

from .contract_support import (
    SIZED,
    HoldingServer,
    PayloadfixLog,
    captured_log,
    holding_server,
    overlong_policy,
)
from .test_content_length_limit import (
    CHUNK,
    KIND_BY_NAME,
    KINDS,
    Ctx,
    Kind,
    body_bytes,
    smaller,
)

FIX_ID = "overlong-body-warning"
#: A safety net for a failing test (the fix reverted): nothing waits for it.
SAFETY = aiohttp.ClientTimeout(total=30)
#: The same for a case that fails by a known bug (xfail): it would hang.
BUG_SAFETY = aiohttp.ClientTimeout(total=0.5)
SIZE = 70_000
#: Never in a log line: credentials and the query string of the URL.
SECRETS = ("alice-cred", "hunter2-cred", "secret-token", "?")
ROOT = Path(__file__).resolve().parents[2]

#: 3.12+ reads file bodies itself (before, file-payload-reuse does, peeking
#: one byte past the declared length).


@pytest.fixture
def fix_id() -> str:
    return FIX_ID


@pytest.fixture(autouse=True)
def _policy_unset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from the default: nothing configured, no env."""
    monkeypatch.delenv(_contract.ENV_OVERLONG, raising=False)
    with overlong_policy(None):
        yield


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    context = Ctx(tmp_path, monkeypatch, [])
    yield context
    for f in context.opened:
        f.close()


@pytest.fixture
def log() -> Iterator[PayloadfixLog]:
    with captured_log() as capture:
        yield capture


@pytest_asyncio.fixture
async def held() -> AsyncIterator[HoldingServer]:
    """A raw server that never answers ``/upload``."""
    async with holding_server() as server:
        yield server


def secret_url(server: RawHTTPServer) -> URL:
    return (
        server.url("/upload")
        .with_user("alice-cred")
        .with_password("hunter2-cred")
        .with_query(q="secret-token")
    )


def known_bug(kind: Kind) -> Optional[pytest.MarkDecorator]:
    """The xfail mark of a bug this kind runs into when over-long."""
    return None


def kind_params() -> List[Any]:
    params = []
    for kind in KINDS:
        mark = known_bug(kind)
        params.append(pytest.param(kind, id=kind.name, marks=[mark] if mark else []))
    return params


def assert_reported(
    record: logging.LogRecord, method: str, port: int, declared: int, wire: int
) -> None:
    """One WARNING naming the method, the URL without query or credentials,
    the declared and the available size."""
    message = record.getMessage()
    assert (record.name, record.levelname) == ("aiohttp_payloadfix", "WARNING")
    assert f"{method} http://127.0.0.1:{port}/upload " in message
    for secret in SECRETS:
        assert secret not in message
    assert f"declared {declared} bytes" in message
    match = re.search(r"(at least )?(\d+) available", message)
    assert match is not None, message
    available = int(match[2])
    if match[1]:  # size unknown before sending: what the body offered so far
        assert declared < available <= wire
    else:
        assert available == wire


# --------------------------------------------------------------------------
# "warn": the declared bytes, and one WARNING per request.


@pytest.mark.parametrize("kind", kind_params())
async def test_overlong_body_is_cut_and_reported(
    kind: Kind,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    methods = ("POST", "PUT")
    bodies = [await kind.make(body_bytes(SIZE, smaller(SIZE)), ctx) for _ in methods]
    declared = smaller(len(bodies[0].wire))
    async with aiohttp.ClientSession(timeout=SAFETY, **bodies[0].session) as session:
        for method, body in zip(methods, bodies):
            async with session.request(
                method,
                secret_url(raw_server),
                headers={"Content-Length": str(declared)},
                **body.request,
            ) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [(r.method, r.body, r.complete) for r in raw_server.requests] == [
        (method, body.wire[:declared], True) for method, body in zip(methods, bodies)
    ]
    assert len(log.records) == len(methods)
    for record, method, body in zip(log.records, methods, bodies):
        assert_reported(record, method, raw_server.port, declared, len(body.wire))


@pytest.mark.parametrize("declared", [0, 1, CHUNK, 3 * CHUNK + 1])
async def test_overlong_generator_is_reported_and_closed(
    declared: int,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    """Chunks beyond the one that crosses the limit: one more is pulled (to
    tell an over-long body from an exact one), then the generator is closed,
    not drained."""
    made = await KIND_BY_NAME["async-generator"].make(body_bytes(SIZE, SIZE), ctx)
    pulls = made.pulls
    assert pulls is not None
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(
            secret_url(raw_server),
            headers={"Content-Length": str(declared)},
            **made.request,
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [pulls.data[:declared]]
    [record] = log.records
    assert_reported(record, "POST", raw_server.port, declared, SIZE)
    assert pulls.closed
    assert pulls.pulled == math.ceil(declared / CHUNK) + 1 < pulls.total


async def test_single_chunk_generator_is_reported(
    fixed: FixState, raw_server: RawHTTPServer, log: PayloadfixLog
) -> None:
    """The excess lies in the chunk that crosses the declared length and no
    chunk follows: it is counted before the writer drops it."""

    async def one_chunk() -> AsyncIterator[bytes]:
        yield b"abcdef"

    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(
            raw_server.url("/upload"),
            data=one_chunk(),
            headers={"Content-Length": "3"},
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [b"abc"]
    [record] = log.records
    assert_reported(record, "POST", raw_server.port, 3, 6)


async def test_file_grown_after_the_request_is_built(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    log: PayloadfixLog,
    tmp_path: Path,
) -> None:
    """Content-Length is the file's size when the request is built (1000);
    500 bytes are appended once the connection is open, before the body is
    written: the 1000 declared bytes are sent, and the growth is reported."""
    path = tmp_path / "grows.bin"
    original = body_bytes(1000, 1000)
    path.write_bytes(original)

    async def grow(*_args: Any) -> None:
        with open(path, "ab") as f:
            f.write(body_bytes(500, 0))

    connections.trace_config.on_connection_create_end.append(grow)
    with open(path, "rb") as f:
        async with connections.session(timeout=SAFETY) as session:
            async with session.post(secret_url(raw_server), data=f) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    [request] = raw_server.requests
    assert (request.header("Content-Length"), request.body) == ("1000", original)
    [record] = log.records
    assert_reported(record, "POST", raw_server.port, 1000, 1500)


# --------------------------------------------------------------------------
# "truncate" and "error".


@pytest.mark.parametrize(
    "name", ["bytes", "open-rb", "async-generator", "MultipartWriter", "streamer"]
)
async def test_truncate_policy_cuts_quietly(
    name: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    aiohttp_payloadfix.configure(overlong="truncate")
    body = await KIND_BY_NAME[name].make(body_bytes(SIZE, CHUNK), ctx)
    declared = CHUNK // 2
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(
            raw_server.url("/upload"),
            headers={"Content-Length": str(declared)},
            **body.request,
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [body.wire[:declared]]
    assert log.records == []
    if body.pulls is not None:
        assert body.pulls.pulled == 1  # nothing pulled to find out more


@pytest.mark.parametrize("kind", kind_params())
async def test_error_policy_refuses(
    kind: Kind,
    fixed: FixState,
    held: HoldingServer,
    connections: ConnectionCounter,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    """ContentLengthError; before any body byte when the size is known,
    otherwise at the declared length. The server never answers: only the
    client's own error can end the request. The socket is discarded."""
    aiohttp_payloadfix.configure(overlong="error")
    body = await kind.make(body_bytes(SIZE, smaller(SIZE)), ctx)
    declared = smaller(len(body.wire))
    timeout = BUG_SAFETY if known_bug(kind) else SAFETY
    async with connections.session(timeout=timeout, **body.session) as session:
        with pytest.raises(ContentLengthError) as info:
            async with session.post(
                secret_url(held),
                headers={"Content-Length": str(declared)},
                **body.request,
            ):
                pass  # pragma: no cover
        async with session.post(held.url("/next"), data=b"next") as resp:
            assert resp.status == 200
    await held.settle()
    held.assert_clean()
    message = str(info.value)
    assert f"POST http://127.0.0.1:{held.port}/upload " in message
    assert f"declared {declared} bytes" in message
    for secret in SECRETS:
        assert secret not in message
    assert log.records == []
    assert connections.created == 2
    first, second = held.connections
    assert [r.target for r in second.requests] == ["/next"]
    sent = b"".join(r.body for r in first.requests)
    if kind.name in SIZED:
        assert f"{len(body.wire)} available" in message
        assert sent == b""  # refused before any body byte
        assert [r.complete for r in first.requests] in ([], [False])
    else:
        assert sent in (b"", body.wire[:declared])


def test_configure_rejects_an_unknown_policy() -> None:
    aiohttp_payloadfix.configure(overlong="error")
    with pytest.raises(ValueError, match="'drop'"):
        aiohttp_payloadfix.configure(overlong="drop")
    with pytest.raises(ValueError, match="'WARN'"):
        aiohttp_payloadfix.configure(overlong="WARN")
    assert _contract.overlong_policy() == "error"  # unchanged


@pytest.mark.parametrize("policy", ["warn", "truncate", "error"])
def test_configure_sets_the_policy(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = "truncate" if policy != "truncate" else "error"
    monkeypatch.setenv(_contract.ENV_OVERLONG, other)
    assert _contract.overlong_policy() == other
    aiohttp_payloadfix.configure(overlong=policy)
    assert _contract.overlong_policy() == policy  # over the environment
    aiohttp_payloadfix.configure()
    assert _contract.overlong_policy() == policy


def test_default_policy_is_warn() -> None:
    assert _contract.overlong_policy() == "warn"


# --------------------------------------------------------------------------
# AIOHTTP_PAYLOADFIX_OVERLONG, read in a fresh process.

CHILD = textwrap.dedent(
    """
    import asyncio, json, logging, sys, warnings

    import aiohttp
    import aiohttp_payloadfix

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append([record.levelname, record.getMessage()])

    records = Records()
    logger = logging.getLogger("aiohttp_payloadfix")
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    if len(sys.argv) > 2:
        aiohttp_payloadfix.configure(overlong=sys.argv[2])

    async def main():
        out = {"statuses": [], "errors": []}
        timeout = aiohttp.ClientTimeout(total=30)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    try:
                        async with session.post(
                            sys.argv[1],
                            data=b"0123456789",
                            headers={"Content-Length": "4"},
                        ) as resp:
                            out["statuses"].append(resp.status)
                    except aiohttp_payloadfix.ContentLengthError as exc:
                        out["errors"].append(str(exc))
        out["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
        out["log"] = records.messages
        print(json.dumps(out))

    asyncio.run(main())
    """
)


async def run_child(
    url: URL, env_value: Optional[str], configured: Optional[str] = None
) -> Dict[str, Any]:
    env = dict(os.environ)
    env.pop(_contract.ENV_OVERLONG, None)
    if env_value is not None:
        env[_contract.ENV_OVERLONG] = env_value
    args = [sys.executable, "-c", CHILD, str(url)]
    if configured is not None:
        args.append(configured)
    process = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    result: Dict[str, Any] = json.loads(stdout)
    return result


def outcome(result: Dict[str, Any]) -> str:
    """Which policy the child followed, from what it saw."""
    if result["errors"]:
        assert result["statuses"] == [] and len(result["errors"]) == 2
        assert result["log"] == []
        return "error"
    assert result["statuses"] == [200, 200]
    if result["log"]:
        assert [level for level, _ in result["log"]] == ["WARNING", "WARNING"]
        return "warn"
    return "truncate"


@pytest.mark.parametrize(
    ("env_value", "configured", "expected"),
    [
        ("error", None, "error"),
        ("truncate", None, "truncate"),
        (" Warn ", None, "warn"),
        ("error", "truncate", "truncate"),  # configure() wins
    ],
)
async def test_env_sets_the_policy(
    env_value: Optional[str],
    configured: Optional[str],
    expected: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
) -> None:
    result = await run_child(raw_server.url("/upload"), env_value, configured)
    assert result["warnings"] == []
    assert outcome(result) == expected
    await raw_server.settle()
    raw_server.assert_clean()
    if expected != "error":
        assert [r.body for r in raw_server.requests] == [b"0123", b"0123"]
    else:  # refused before any body byte
        assert [r.body for r in raw_server.requests] in ([], [b""], [b"", b""])


async def test_env_with_a_bad_value_warns_and_uses_the_default(
    fixed: FixState, raw_server: RawHTTPServer
) -> None:
    result = await run_child(raw_server.url("/upload"), "explode")
    [[category, message]] = result["warnings"]  # once, not per request
    assert category == PayloadFixWarning.__name__
    assert "'explode'" in message and _contract.ENV_OVERLONG in message
    assert outcome(result) == "warn"
    await raw_server.settle()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [b"0123", b"0123"]


# --------------------------------------------------------------------------
# Exact lengths and bodies without one: not a log record.


@pytest.mark.parametrize("size", [0, SIZE])
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_exact_length_is_not_logged(
    kind: Kind,
    size: int,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    body = await kind.make(body_bytes(size, size), ctx)
    async with aiohttp.ClientSession(timeout=SAFETY, **body.session) as session:
        async with session.post(
            raw_server.url("/upload"),
            headers={"Content-Length": str(len(body.wire))},
            **body.request,
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [body.wire]
    assert log.records == []
    if body.pulls is not None:
        assert body.pulls.closed


async def test_requests_without_a_body_are_unchanged(
    fixed: FixState,
    raw_server: RawHTTPServer,
    connections: ConnectionCounter,
    log: PayloadfixLog,
) -> None:
    async with connections.session(timeout=SAFETY) as session:
        for method in ("GET", "POST", "DELETE"):
            async with session.request(method, raw_server.url("/upload")) as resp:
                assert resp.status == 200
        async with session.post(
            raw_server.url("/upload"), data=b"", headers={"Content-Length": "0"}
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert connections.created == 1
    assert [(r.method, r.body, r.chunked) for r in raw_server.requests] == [
        ("GET", b"", False),
        ("POST", b"", False),
        ("DELETE", b"", False),
        ("POST", b"", False),
    ]
    assert log.records == []


@pytest.mark.parametrize("name", ["bytes", "open-rb", "async-generator", "streamer"])
async def test_chunked_and_compressed_requests_are_unchanged(
    name: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    wire = body_bytes(SIZE, SIZE)
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        for options in ({"chunked": True}, {"compress": "deflate"}):
            body = await KIND_BY_NAME[name].make(wire, ctx)
            async with session.post(
                raw_server.url("/upload"), **options, **body.request
            ) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    plain, compressed = raw_server.requests
    assert (plain.chunked, plain.header("Content-Length")) == (True, None)
    assert plain.body == wire
    assert (compressed.chunked, compressed.header("Content-Encoding")) == (
        True,
        "deflate",
    )
    assert zlib.decompress(compressed.body) == wire
    assert log.records == []


@pytest.mark.parametrize("name", ["bytes", "open-rb", "async-generator"])
async def test_after_expect_continue(
    name: str,
    fixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    exact = await KIND_BY_NAME[name].make(body_bytes(SIZE, SIZE), ctx)
    overlong = await KIND_BY_NAME[name].make(body_bytes(SIZE, SIZE), ctx)
    declared = 3 * CHUNK + 1
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        for body, length in ((exact, SIZE), (overlong, declared)):
            async with session.post(
                raw_server.url("/upload"),
                headers={"Content-Length": str(length)},
                expect100=True,
                **body.request,
            ) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [(r.header("Expect"), r.body) for r in raw_server.requests] == [
        ("100-continue", exact.wire),
        ("100-continue", overlong.wire[:declared]),
    ]
    [record] = log.records  # the over-long one only
    assert_reported(record, "POST", raw_server.port, declared, SIZE)


# --------------------------------------------------------------------------
# As released; and the fixes it rests on.


@pytest.mark.parametrize("name", ["bytes", "BytesIO", "async-generator", "streamer"])
async def test_silent_truncation_bug_reproduces(
    name: str,
    unfixed: FixState,
    raw_server: RawHTTPServer,
    log: PayloadfixLog,
    ctx: Ctx,
) -> None:
    body = await KIND_BY_NAME[name].make(body_bytes(SIZE, CHUNK), ctx)
    declared = CHUNK // 2
    async with aiohttp.ClientSession(timeout=SAFETY) as session:
        async with session.post(
            raw_server.url("/upload"),
            headers={"Content-Length": str(declared)},
            **body.request,
        ) as resp:
            assert resp.status == 200
    await raw_server.settle()
    # content-length-limit (or 3.12) cut it, and nobody is told.
    assert raw_server.requests[0].body == body.wire[:declared]
    assert log.records == []


def test_reverting_the_limit_holds_back_what_requires_it() -> None:
    """Without the limit, short-body-error would find nothing left open on the
    writer and overlong-body-warning would log "sent the declared bytes" while
    3.9-3.11 write the whole body: reverting the limit takes them off too,
    and applying it again brings them back."""
    dependents = [f.id for f in FIXES if "content-length-limit" in f.requires]
    assert dependents
    with switched("content-length-limit", applied=True) as state:
        if not state.applied:
            pytest.skip("the package leaves this release alone")
        assert all(aiohttp_payloadfix.is_applied(i) for i in dependents)
        assert aiohttp_payloadfix.revert(["content-length-limit"]) == (
            "content-length-limit",
        )
        assert [i for i in dependents if aiohttp_payloadfix.is_applied(i)] == []
        states = {f.id: f.state for f in aiohttp_payloadfix.status().fixes}
        assert [states[i] for i in dependents] == ["disabled"] * len(dependents)
        aiohttp_payloadfix.apply(["content-length-limit"])
        assert all(aiohttp_payloadfix.is_applied(i) for i in dependents)


@pytest.mark.skipif(
    not Path("/proc/self/cmdline").exists(), reason="no /proc file system here"
)
async def test_overlong_proc_file_is_reported(
    fixed: FixState, raw_server: RawHTTPServer, log: PayloadfixLog
) -> None:
    content = Path("/proc/self/cmdline").read_bytes()
    with open("/proc/self/cmdline", "rb") as body:
        async with aiohttp.ClientSession(timeout=SAFETY) as session:
            async with session.post(
                raw_server.url("/upload"), data=body, headers={"Content-Length": "5"}
            ) as resp:
                assert resp.status == 200
    await raw_server.settle()
    raw_server.assert_clean()
    assert [r.body for r in raw_server.requests] == [content[:5]]
    [record] = log.records
    assert_reported(record, "POST", raw_server.port, 5, len(content))
