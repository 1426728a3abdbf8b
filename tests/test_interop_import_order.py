"""Import order does not matter (README, "Install and use"), checked with real
first imports in a fresh interpreter: the package imported before aiohttp,
after it, after a ClientSession already exists and has been used (that very
session then uploads with the fixes, on the connection it already had), and
after OpenTelemetry instrumented aiohttp. The child is only the client; the
server is this process's ``web_server``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import aiohttp
import pytest
from conftest import WebServer

from aiohttp_payloadfix import _api
from aiohttp_payloadfix._fix import AIOHTTP_VERSION

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 20
RACE_CLOSES = (3, 10, 6) <= AIOHTTP_VERSION < (3, 12, 0)

_CHILD = """\
import asyncio
import io
import json
import sys
import warnings

URL, MODE, REQUESTS = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = {"aiohttp_imported_first": "aiohttp" in sys.modules}
warnings.simplefilter("always")
caught = warnings.catch_warnings(record=True)
log = caught.__enter__()

if MODE == "before-aiohttp":
    import aiohttp_payloadfix
import aiohttp
from aiohttp import client, client_reqrep, payload

TOUCHED = (
    client.ClientSession,
    client_reqrep.ClientRequest,
    payload.IOBasePayload,
    payload.TextIOPayload,
    payload.AsyncIterablePayload,
)


def snapshot():
    return {(c.__name__, k): v for c in TOUCHED for k, v in vars(c).items()}


def changed(before):
    after = snapshot()
    keys = set(before) | set(after)
    return sorted(".".join(k) for k in keys if before.get(k) is not after.get(k))


if MODE == "otel-first":
    from opentelemetry.instrumentation.aiohttp_client import (
        AioHttpClientInstrumentor,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    otel_init = vars(client.ClientSession)["__init__"]
if MODE in ("after-aiohttp", "otel-first"):
    import aiohttp_payloadfix


async def post(session, data):
    async with session.post(URL, data=data) as resp:
        assert resp.status == 200, resp.status
        await resp.read()


async def main():
    global aiohttp_payloadfix
    created = 0

    async def on_create_end(*_args):
        nonlocal created
        created += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create_end)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(trace_configs=[trace], timeout=timeout) as s:
        if MODE == "after-session":
            await post(s, b"warm-up")
            before = snapshot()
            import aiohttp_payloadfix

            result["changed_on_import"] = changed(before)
        result["created_before"] = created
        for i in range(REQUESTS):
            await post(s, io.BytesIO(b"body-%03d" % i))
    result["created_after"] = created - result["created_before"]


asyncio.run(main())
if MODE != "not-imported":
    result["is_applied"] = aiohttp_payloadfix.is_applied()
    result["states"] = {f.id: f.state for f in aiohttp_payloadfix.status().fixes}
if MODE == "otel-first":
    result["spans"] = [
        s.name for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"
    ]
    aiohttp_payloadfix.revert()
    result["otel_kept_on_revert"] = vars(client.ClientSession)["__init__"] is otel_init
    aiohttp_payloadfix.apply()
    before = snapshot()
    instrumentor.uninstrument()
    result["changed_on_uninstrument"] = changed(before)
    result["is_applied_after_uninstrument"] = aiohttp_payloadfix.is_applied()
    provider.shutdown()
caught.__exit__(None, None, None)
result["warnings"] = [f"{w.category.__name__}: {w.message}" for w in log]
print(json.dumps(result))
"""


async def run_child(url: str, mode: str) -> Dict[str, Any]:
    env = dict(os.environ)
    env.pop(_api.ENV_DISABLE, None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        url,
        mode,
        str(REQUESTS),
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result: Dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return result


def expected_states() -> Dict[str, str]:
    return {
        f.id: "applied" if f.needed else "not-needed"
        for f in _api.status().fixes
        if f.state in ("applied", "not-needed")
    }


def bodies(server: WebServer) -> List[bytes]:
    return [b for _m, _p, b in server.received]


@pytest.mark.parametrize(
    "mode", ["before-aiohttp", "after-aiohttp", "after-session", "otel-first"]
)
async def test_import_order(mode: str, web_server: WebServer) -> None:
    result = await run_child(str(web_server.url / "up"), mode)
    assert result["aiohttp_imported_first"] is False
    assert result["warnings"] == []
    assert result["is_applied"] is True
    assert result["states"] == expected_states()
    sent = [b"body-%03d" % i for i in range(REQUESTS)]
    if mode == "after-session":
        assert bodies(web_server) == [b"warm-up", *sent]
        # The session made before the import uploads with the fixes, on the
        # connection it opened for the warm-up.
        assert result["created_before"] == 1
        assert result["created_after"] == 0
        needed = any(state == "applied" for state in result["states"].values())
        assert bool(result["changed_on_import"]) == needed
    else:
        assert bodies(web_server) == sent
        assert result["created_after"] == 1
    if mode == "otel-first":
        assert result["spans"] == ["POST"] * REQUESTS
        assert result["otel_kept_on_revert"] is True
        assert result["changed_on_uninstrument"] == ["ClientSession.__init__"]
        assert result["is_applied_after_uninstrument"] is True


async def test_import_order_bug_reproduces(web_server: WebServer) -> None:
    """Without the import, the same child opens a connection per upload or so."""
    if not RACE_CLOSES:
        pytest.skip(f"aiohttp {aiohttp.__version__} rarely closes the connection")
    result = await run_child(str(web_server.url / "up"), "not-imported")
    assert bodies(web_server) == [b"body-%03d" % i for i in range(REQUESTS)]
    assert result["created_after"] > 1
