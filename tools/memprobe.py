"""Peak memory growth of a client that uploads a large file with Content-Length.

    python tools/memprobe.py [--mib 256]

Run with the interpreter of a venv that has aiohttp and aiohttp-payloadfix;
prints one JSON object: the aiohttp release, whether any fix was active, the
bytes the server received and the client's peak RSS growth in MiB during the
upload. The server is this script again (``--serve``) in a child process, so
only the client's memory is measured. ``AIOHTTP_PAYLOADFIX_DISABLE=1`` gives
the unpatched figure with the package still imported.

aiohttp 3.12.0-3.12.8 read the whole file when the length is known
(aio-libs/aiohttp#11138); the chunked-file-reads fix keeps it to 64 KiB reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence, Tuple

import aiohttp
from aiohttp import web

import aiohttp_payloadfix

MIB = 1 << 20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


async def _serve() -> None:
    async def upload(request: web.Request) -> web.Response:
        received = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            received += len(chunk)
        return web.json_response({"received": received})

    app = web.Application()
    app.router.add_post("/upload", upload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    # Serve until the client closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


async def _upload(port: int, path: str, size: int) -> Tuple[int, float]:
    url = f"http://127.0.0.1:{port}/upload"
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # Warm up: imports and buffers that any first request allocates.
        async with session.post(url, data=b"x") as resp:
            await resp.read()
        _reset_peak()
        before = _proc_status_kib("VmRSS")
        with open(path, "rb") as f:
            headers = {"Content-Length": str(size)}
            async with session.post(url, data=f, headers=headers) as resp:
                received = int((await resp.json())["received"])
        growth = _proc_status_kib("VmHWM") - before
    return received, growth / 1024


def probe(mib: int) -> Dict[str, Any]:
    size = mib * MIB
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "upload.bin")
            with open(path, "wb") as f:
                f.truncate(size)
            received, growth = asyncio.run(_upload(port, path, size))
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(30)
    return {
        "aiohttp": aiohttp.__version__,
        "patched": [f.id for f in aiohttp_payloadfix.status().fixes if f.applied],
        "size_mib": mib,
        "received": received,
        "peak_growth_mib": round(growth, 1),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve())
        return 0
    print(json.dumps(probe(args.mib)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
