"""Client workloads, run by ``run.py`` inside each environment under test.

Standard library plus the environment's aiohttp (and, in the patched
environments, ``aiohttp_payloadfix``, imported first when ``--patch`` is
given). Three commands:

``serve``
    A worker for one round: warms up, prints one JSON line describing itself
    (versions, fix states), then reads one JSON workload spec per line on
    stdin and answers each with one JSON line of measurements. Keeping the
    worker alive for the round lets ``run.py`` alternate environments run by
    run without paying interpreter start-up and imports inside the
    measurements.

``memory``
    Peak RSS growth of one large file upload with Content-Length, in a fresh
    process.

Every run makes a new ``ClientSession``; new connections are counted with a
``TraceConfig`` (``on_connection_create_end``). Client CPU is
``time.process_time()``: every thread of this process (the executor reads of
file bodies included), nothing of the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import ssl
import sys
import time
import traceback
from typing import IO, Any, Dict, List, Optional, Union

_PATCH = "--patch" in sys.argv
if _PATCH:
    # Imported before aiohttp on purpose: the way an application would.
    import aiohttp_payloadfix

import aiohttp  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
CONCURRENT_TASKS = 64
CONNECTOR_LIMIT = 16

Body = Union[bytes, io.BytesIO, IO[bytes]]


def describe() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "aiohttp": aiohttp.__version__,
        "payloadfix": None,
        "fixes": {},
    }
    if _PATCH:
        info["payloadfix"] = aiohttp_payloadfix.__version__
        info["payloadfix_file"] = aiohttp_payloadfix.__file__
        info["fixes"] = {f.id: f.state for f in aiohttp_payloadfix.status().fixes}
    return info


def percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 < q <= 100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class Client:
    def __init__(
        self, urls: Dict[str, str], cafile: Optional[str], file_path: Optional[str]
    ) -> None:
        self.urls = urls
        self.ssl_ctx = ssl.create_default_context(cafile=cafile) if cafile else None
        self.file_path = file_path
        self.file_size = os.path.getsize(file_path) if file_path else 0
        self._payloads: Dict[int, bytes] = {}

    def payload(self, size: int) -> bytes:
        data = self._payloads.get(size)
        if data is None:
            data = self._payloads[size] = b"x" * size
        return data

    def body(self, kind: str, size: int) -> Body:
        if kind == "bytes":
            return self.payload(size)
        if kind == "bytesio":
            return io.BytesIO(self.payload(size))
        if kind == "file":
            if self.file_path is None or size != self.file_size:
                raise ValueError(f"no {size}-byte file was given to the worker")
            return open(self.file_path, "rb")
        raise ValueError(f"unknown body kind {kind!r}")

    def session(self, transport: str, limit: int, counter: List[int]) -> Any:
        async def on_connection_create_end(*_: Any) -> None:
            counter[0] += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_connection_create_end)
        connector_kwargs: Dict[str, Any] = {"limit": limit}
        if transport == "tls":
            if self.ssl_ctx is None:
                raise ValueError("TLS workload without a CA file")
            connector_kwargs["ssl"] = self.ssl_ctx
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(**connector_kwargs),
            trace_configs=[trace],
        )

    async def run(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        transport: str = spec["transport"]
        mode: str = spec["mode"]
        kind: str = spec["body"]
        size: int = spec["size"]
        total: int = spec["requests"]
        url = self.urls[transport]
        counter = [0]
        latencies: List[float] = []
        errors: List[str] = []
        limit = CONNECTOR_LIMIT if mode == "concurrent" else 100
        headers = spec.get("headers")

        async def one(session: Any) -> None:
            body = self.body(kind, size)
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}")
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                errors.append(repr(exc))
            latencies.append(time.perf_counter() - start)

        async def worker(session: Any, count: int) -> None:
            for _ in range(count):
                await one(session)

        session = self.session(transport, limit, counter)
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        try:
            if mode == "sequential":
                await worker(session, total)
            elif mode == "concurrent":
                tasks = min(CONCURRENT_TASKS, total)
                share, extra = divmod(total, tasks)
                await asyncio.gather(
                    *(worker(session, share + (i < extra)) for i in range(tasks))
                )
            else:
                raise ValueError(f"unknown mode {mode!r}")
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        finally:
            await session.close()
            # Let TLS transports finish closing before the next run starts.
            await asyncio.sleep(0.01 if transport == "tls" else 0)
        return {
            "requests": total,
            "elapsed": elapsed,
            "rps": total / elapsed,
            "connections": counter[0],
            "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "cpu_per_1k": cpu / total * 1000,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
        }


async def warm_up(client: Client, transports: List[str]) -> None:
    """Load lazily imported code, start executor threads, open TLS machinery."""
    for transport in transports:
        for kind in ("bytes", "bytesio"):
            await client.run(
                {
                    "transport": transport,
                    "mode": "sequential",
                    "body": kind,
                    "size": KiB,
                    "requests": 5,
                }
            )
        if client.file_path is not None:
            await client.run(
                {
                    "transport": transport,
                    "mode": "sequential",
                    "body": "file",
                    "size": client.file_size,
                    "requests": 2,
                }
            )


def settle_allocator() -> None:
    """Put the C allocator in the same state in every worker.

    glibc serves allocations above its mmap threshold (128 KiB at start) with
    mmap, and raises the threshold to the size of the largest mmapped chunk
    freed so far. asyncio receives into a fresh 256 KiB buffer on every read,
    so a worker that has not yet freed a large chunk pays an mmap, an mremap
    and a munmap (and page faults) per read, and one that has, none: which
    one depends on what the worker ran before (B's 256 KiB file reads raise
    it during the warm-up, A's and C's 64 KiB reads do not). Freeing one
    16 MiB buffer first raises it to the same value in every worker.
    """
    buffer = bytearray(16 * MiB)
    del buffer


def serve(args: argparse.Namespace) -> int:
    settle_allocator()
    urls = {"http": args.http_url}
    if args.tls_url:
        urls["tls"] = args.tls_url
    client = Client(urls, args.cafile, args.file)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(warm_up(client, sorted(urls)))
    # Ready only once warm: the parent starts the workers one after the other,
    # and a warm-up must not overlap another worker's measurements.
    out = sys.stdout
    out.write(json.dumps(describe()) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        try:
            result = loop.run_until_complete(client.run(spec))
        except Exception:  # noqa: BLE001 - the parent reports it
            result = {"fatal": traceback.format_exc()}
        out.write(json.dumps(result) + "\n")
        out.flush()
    loop.run_until_complete(asyncio.sleep(0.05))  # scheduled file closes
    loop.close()
    return 0


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


async def _memory(args: argparse.Namespace) -> Dict[str, Any]:
    size = os.path.getsize(args.file)
    counter = [0]
    client = Client({"http": args.http_url}, None, args.warm_file)
    async with client.session("http", 100, counter) as session:
        # Warm up on the same session: imports, executor threads, buffers.
        for _ in range(2):
            with open(args.warm_file, "rb") as warm:
                async with session.post(args.http_url, data=warm) as resp:
                    await resp.read()
        gc.collect()
        import resource

        rss_before = _rss_kib("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = _reset_peak()
        start = time.perf_counter()
        with open(args.file, "rb") as f:
            async with session.post(
                args.http_url, data=f, headers={"Content-Length": str(size)}
            ) as resp:
                await resp.read()
                status = resp.status
        elapsed = time.perf_counter() - start
        peak = _rss_kib("VmHWM") if reset else None
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak is None:
        # No resettable peak: the lifetime peak, if the upload raised it.
        peak = max(maxrss_after, rss_before or 0)
    baseline = rss_before if rss_before is not None else maxrss_before
    return {
        "status": status,
        "upload_bytes": size,
        "elapsed": elapsed,
        "rss_before_kib": baseline,
        "peak_kib": peak,
        "growth_mib": max(0, peak - baseline) / 1024,
        "method": "VmHWM after clear_refs" if reset else "ru_maxrss",
    }


def memory(args: argparse.Namespace) -> int:
    result = asyncio.run(_memory(args))
    print(json.dumps({**describe(), **result}))
    return 0 if result["status"] == 200 else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("serve", "memory"))
    parser.add_argument("--patch", action="store_true", help="import the package")
    parser.add_argument("--http-url", required=True)
    parser.add_argument("--tls-url")
    parser.add_argument("--cafile")
    parser.add_argument("--file", help="the file body (serve) or the upload")
    parser.add_argument("--warm-file", help="memory: a small file to warm up with")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return memory(args)


if __name__ == "__main__":
    sys.exit(main())
