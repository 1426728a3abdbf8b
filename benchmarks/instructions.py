"""Instructions per request, with and without the package, under callgrind.

Wall-clock numbers on a shared machine wander by several per cent from run to
run; the number of instructions the client executes per request wanders much
less (about 1-2 % between runs, from the order in which the response and the
end of the body write reach the event loop), whatever the load. This
script runs the client workloads of a few request shapes (``bytes`` bodies of
0 B, 1 KiB and 64 KiB, a 1 KiB ``BytesIO``, an open 100 kB file) sequentially
over one keep-alive session, once with the fixes disabled
(``AIOHTTP_PAYLOADFIX_DISABLE=1``: the same imports, nothing patched) and once
with them applied, each in one process under ``valgrind --tool=callgrind``, and
prints the client's instructions per request and the ratio patched/unpatched.

Only the client is measured: the server is ``server.py`` in its own process,
not under valgrind. Every thread of the client counts (the executor reads of a
file body included). The measured window of each workload is opened and closed
by two system calls nothing else in the client makes (``os.getppid()`` zeroes
the counters, ``os.getpgrp()`` dumps them), so start-up, imports and warm-up
requests are left out.

Examples::

    python benchmarks/instructions.py
    python benchmarks/instructions.py --python /tmp/venv/bin/python --requests 100
    python benchmarks/instructions.py --only bytes-1KiB,bytesio-1KiB

Standard library only; the interpreter given with ``--python`` (by default the
one running this script) needs aiohttp and aiohttp_payloadfix installed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
KiB = 1024

#: name -> (kind, size in bytes)
WORKLOADS: Dict[str, Tuple[str, int]] = {
    "bytes-0B": ("bytes", 0),
    "bytes-1KiB": ("bytes", KiB),
    "bytes-64KiB": ("bytes", 64 * KiB),
    "bytesio-1KiB": ("bytesio", KiB),
    "file-100kB": ("file", 100_000),
}


# ---------------------------------------------------------------------------
# The child: runs under callgrind.


async def _one(
    session: Any, url: str, name: str, kind: str, payload: bytes, file_path: str
) -> None:
    data: Any
    if kind == "bytes":
        data = payload
    elif kind == "bytesio":
        data = io.BytesIO(payload)
    else:
        data = open(file_path, "rb")  # noqa: SIM115 (aiohttp closes it)
    async with session.post(url, data=data) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{name}: status {resp.status}")


async def _child_run(
    url: str, names: List[str], requests: int, warmup: int, file_path: str
) -> Dict[str, Any]:
    import aiohttp

    result: Dict[str, Any] = {"aiohttp": aiohttp.__version__, "connections": {}}
    for name in names:
        kind, size = WORKLOADS[name]
        payload = b"x" * size
        connections = 0

        async def on_connect(*_: Any) -> None:
            nonlocal connections
            connections += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_connect)
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            args = (session, url, name, kind, payload, file_path)
            for _ in range(warmup):
                await _one(*args)
            await asyncio.sleep(0.05)  # let executor closes of the warm-up run
            gc.collect()
            connections = 0
            os.getppid()  # callgrind: --zero-before=getppid
            for _ in range(requests):
                await _one(*args)
            os.getpgrp()  # callgrind: --dump-before=getpgrp
        result["connections"][name] = connections
        await asyncio.sleep(0.05)
    return result


def child_main(args: argparse.Namespace) -> None:
    import aiohttp_payloadfix

    names = args.only.split(",")
    result = asyncio.run(
        _child_run(args.url, names, args.requests, args.warmup, args.file)
    )
    result["applied"] = [
        f.id for f in aiohttp_payloadfix.status().fixes if f.state == "applied"
    ]
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# The parent: server, valgrind runs, table.


def _total(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def measure(
    python: str,
    url: str,
    names: List[str],
    requests: int,
    warmup: int,
    file_path: str,
    patched: bool,
    workdir: str,
    disable: Optional[str] = None,
) -> Tuple[Dict[str, float], Dict[str, Any]]:
    tag = "patched" if patched else "unpatched"
    out = os.path.join(workdir, f"{tag}.out")
    env = dict(os.environ)
    env.pop("AIOHTTP_PAYLOADFIX_DISABLE", None)
    env.setdefault("PYTHONHASHSEED", "0")  # the same dict and set layouts each run
    if not patched:
        env["AIOHTTP_PAYLOADFIX_DISABLE"] = "1"
    elif disable:
        env["AIOHTTP_PAYLOADFIX_DISABLE"] = disable
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--collect-systime=no",
        "--zero-before=getppid",
        "--dump-before=getpgrp",
        f"--callgrind-out-file={out}",
        python,
        str(Path(__file__).resolve()),
        "--child",
        "--url",
        url,
        "--only",
        ",".join(names),
        "--requests",
        str(requests),
        "--warmup",
        str(warmup),
        "--file",
        file_path,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{tag} run failed (exit {proc.returncode})")
    info: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    # One dump per workload, numbered in order; the last file is the exit dump.
    dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1] or 0))
    dumps = [p for p in dumps if p.rsplit(".", 1)[1].isdigit()]
    if len(dumps) < len(names):
        raise SystemExit(f"{tag}: expected {len(names)} dumps, found {dumps}")
    per_request = {name: _total(path) / requests for name, path in zip(names, dumps)}
    return per_request, info


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Workloads: " + ", ".join(WORKLOADS),
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter with aiohttp and aiohttp_payloadfix (default: this one)",
    )
    parser.add_argument(
        "--requests", type=int, default=200, help="measured requests per workload"
    )
    parser.add_argument(
        "--warmup", type=int, default=30, help="requests before the measured ones"
    )
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help="comma-separated workload names"
    )
    parser.add_argument(
        "--mode",
        choices=("both", "patched", "unpatched"),
        default="both",
        help="which client(s) to measure",
    )
    parser.add_argument(
        "--disable",
        metavar="IDS",
        help="comma-separated fix ids left out of the patched run (what one fix costs)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    # Internal: the measured client.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child_main(args)
        return 0

    names = args.only.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")

    server = subprocess.Popen(
        [sys.executable, str(HERE / "server.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())
        url = f"http://127.0.0.1:{ports['http']}/upload"
        with tempfile.TemporaryDirectory(prefix="pf-instr-") as workdir:
            file_path = os.path.join(workdir, "body.bin")
            with open(file_path, "wb") as f:
                f.write(os.urandom(WORKLOADS["file-100kB"][1]))
            results: Dict[str, Dict[str, float]] = {}
            infos: Dict[str, Any] = {}
            modes = {"both": (False, True), "patched": (True,), "unpatched": (False,)}
            for patched in modes[args.mode]:
                tag = "patched" if patched else "unpatched"
                print(f"measuring {tag} ...", file=sys.stderr, flush=True)
                results[tag], infos[tag] = measure(
                    args.python,
                    url,
                    names,
                    args.requests,
                    args.warmup,
                    file_path,
                    patched,
                    workdir,
                    args.disable,
                )
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)

    first = next(iter(infos.values()))
    print(f"aiohttp {first['aiohttp']}, python {args.python}")
    if "patched" in infos:
        print("applied: " + (", ".join(infos["patched"]["applied"]) or "none"))
    print(f"{args.requests} requests per workload after {args.warmup} warm-up\n")
    header = "| workload | unpatched Ir/req | patched Ir/req | patched/unpatched |"
    print(header)
    print("|---|--:|--:|--:|")
    for name in names:
        a = results.get("unpatched", {}).get(name)
        b = results.get("patched", {}).get(name)
        ratio = f"{b / a:.3f}" if a and b else "-"
        cells = [f"{v:,.0f}" if v is not None else "-" for v in (a, b)]
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    conns = {t: i["connections"] for t, i in infos.items()}
    print(f"\nnew connections in the measured requests: {json.dumps(conns)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "info": infos}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
