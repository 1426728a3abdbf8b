"""Benchmark aiohttp_payloadfix against unpatched and upstream aiohttp.

One command, from a clone of the repository::

    python benchmarks/run.py

builds, with uv, from a local interpreter (Python 3.11 unless ``--python``
says otherwise; uv never downloads one), the environments

    A  aiohttp 3.11.18                        (unpatched)
    B  aiohttp 3.11.18 + aiohttp_payloadfix   (this checkout)
    C  aiohttp 3.12.15                        (upstream)

and, for the memory and import measurements, aiohttp 3.12.8 with and without
the package and 3.12.15 with it. It starts one server process (``server.py``,
a standard-library asyncio sink run by the base interpreter, the same for every
environment), then runs every workload in rounds: each round starts a fresh
client worker per environment (``workload.py``), and the environments take
turns run by run (A B C A B C ..., the order rotating from round to round).
It writes docs/benchmarks.md and docs/benchmarks.png with medians, ratios and
the targets of issue 5.

``--quick`` is the CI smoke test: a few requests per workload, HTTP only, no
chart and no memory or import part; it exits non-zero unless every run
succeeded and, with the package, every sequential session opened exactly one
connection.

Standard library only: it runs under any Python >= 3.9 that can start uv.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKLOAD = HERE / "workload.py"
SERVER = HERE / "server.py"
CHART = HERE / "chart.py"

KiB = 1024
MiB = 1024 * KiB

OLD = "3.11.18"  # the affected release line the package is for
NEW = "3.12.15"  # upstream, with the fixes released
MEM_EXTRA = "3.12.8"  # last release with the 3.12.0 whole-file read (#11138)

FILE_SIZE = 16 * MiB
MEMORY_UPLOAD = 256 * MiB
SIZES = (0, KiB, 64 * KiB, MiB)

#: (sequential, concurrent) requests per run, per body size, in full mode:
#: enough for a run of the fastest environment to last a few tenths of a
#: second (shorter runs made the medians of the same environment move by
#: several per cent from one benchmark to the next).
FULL_REQUESTS: Dict[int, Tuple[int, int]] = {
    0: (2000, 3200),
    KiB: (2000, 3200),
    64 * KiB: (1000, 1920),
    MiB: (200, 512),
    FILE_SIZE: (16, 128),
}
QUICK_REQUESTS: Dict[int, Tuple[int, int]] = {
    0: (20, 64),
    KiB: (20, 64),
    64 * KiB: (20, 64),
    MiB: (10, 32),
    FILE_SIZE: (3, 16),
}

#: Rounds (client processes per environment and workload) in full mode. A
#: process's own draw (memory layout, hash seed) moves its throughput by a few
#: per cent, and a cell whose ratio is within 2-3% of its target needs more
#: processes than that for its median to settle: with 7, TLS concurrent
#: BytesIO 64 KiB read B ÷ C 0.9996 in one full run and 1.004 in another,
#: where 15 rounds gave 1.020-1.025 twice. 12 (four times each order of A B C)
#: take about 18 minutes here.
FULL_ROUNDS = 12

#: Targets of issue 5.
TARGET_VS_UPSTREAM = 1.0
TARGET_SEQ_BYTESIO_SPEEDUP = 3.0
TARGET_BYTES_OVERHEAD = 0.98
TARGET_MEMORY_MIB = 8.0
TARGET_IMPORT_MS = 20.0

RUN_TIMEOUT = 300.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# Interpreters, uv and environments


def find_python(spec: str) -> str:
    """An interpreter path for ``spec``: a path, or a version such as "3.11"."""
    if os.sep in spec or spec.startswith("."):
        path = Path(spec).expanduser()
        if not path.exists():
            raise BenchError(f"--python {spec}: no such file")
        return str(path)
    if not re.fullmatch(r"3\.\d+(\.\d+)?", spec):
        raise BenchError(f"--python {spec!r}: give a path or a version like 3.11")
    root = Path(os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv")))
    pattern = f"{spec}/bin/python3" if spec.count(".") == 2 else f"{spec}.*/bin/python3"
    found = [p for p in (root / "versions").glob(pattern) if p.exists()]

    def version_key(p: Path) -> Tuple[int, ...]:
        parts = re.findall(r"\d+", p.parent.parent.name)
        return tuple(int(x) for x in parts)

    if found:
        return str(max(found, key=version_key))
    which = shutil.which(f"python{spec}")
    if which:
        return which
    if platform.python_version().startswith(spec):
        return sys.executable
    raise BenchError(f"no Python {spec} found (pyenv, PATH); pass --python PATH")


def describe_python(python: str) -> Tuple[str, str]:
    """(sys.executable, version) of an interpreter, shims resolved."""
    out = subprocess.run(
        [
            python,
            "-c",
            "import sys, platform; print(sys.executable);"
            " print(platform.python_version())",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0], out[1]


def find_uv() -> List[str]:
    uv = shutil.which("uv")
    if uv:
        return [uv]
    probe = subprocess.run(
        [sys.executable, "-m", "uv", "--version"], capture_output=True, text=True
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "uv"]
    raise BenchError("uv not found: install it (python -m pip install uv)")


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["UV_PYTHON_DOWNLOADS"] = "never"
    for name in (
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "AIOHTTP_PAYLOADFIX_DISABLE",
    ):
        env.pop(name, None)
    return env


def venv_python(path: Path) -> Path:
    if os.name == "nt":
        return path / "Scripts" / "python.exe"
    return path / "bin" / "python"


@dataclass
class Env:
    key: str
    aiohttp: str
    patched: bool
    path: Path
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.aiohttp} + payloadfix" if self.patched else self.aiohttp

    @property
    def python(self) -> str:
        return str(venv_python(self.path))


def snapshot_package(dest: Path) -> str:
    """Copy the checkout's installable files to ``dest``; their sha256.

    A copy (fresh mtimes, fresh path) so that uv builds this very code rather
    than a cached build of an earlier state of the tree, and so that a tree
    edited while the benchmark runs does not change what is measured.
    """
    digest = hashlib.sha256()
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, dest / name)
    for src in sorted((REPO / "aiohttp_payloadfix").rglob("*")):
        if "__pycache__" in src.parts or not src.is_file():
            continue
        rel = src.relative_to(REPO)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest / rel)
        digest.update(str(rel).encode() + b"\0" + src.read_bytes())
    return digest.hexdigest()[:12]


def build_env(
    uv: List[str], base: str, path: Path, requirements: Sequence[str]
) -> None:
    env = child_env()
    subprocess.run(
        [*uv, "venv", "--quiet", "--clear", "--python", base, str(path)],
        check=True,
        env=env,
    )
    subprocess.run(
        [
            *uv,
            "pip",
            "install",
            "--quiet",
            "--compile-bytecode",
            "--reinstall-package",
            "aiohttp-payloadfix",
            "--python",
            str(venv_python(path)),
            *requirements,
        ],
        check=True,
        env=env,
    )


# --------------------------------------------------------------------------
# Processes: server and workers


def make_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def pin(pid: int, cpus: Optional[List[int]]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass


def cpu_plan(enabled: bool) -> Tuple[Optional[List[int]], Optional[List[int]]]:
    """(server CPUs, client CPUs): one core each when there are two or more."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return [cpus[-1]], [cpus[0]]


def read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise BenchError(f"{what}: no answer within {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise BenchError(f"{what}: the process ended (exit code {proc.wait()})")
    return line


class Server:
    def __init__(
        self,
        python: str,
        workdir: Path,
        certs: Optional[Tuple[Path, Path]],
        cpus: Optional[List[int]],
    ) -> None:
        args = [python, str(SERVER)]
        if certs:
            args += ["--cert", str(certs[1]), "--key", str(certs[1])]
        self.errlog = open(workdir / "server.stderr", "w")
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errlog,
            text=True,
            env=child_env(),
            cwd=workdir,
        )
        pin(self.proc.pid, cpus)
        ports = json.loads(read_line(self.proc, 30, "server"))
        self.http_url = f"http://127.0.0.1:{ports['http']}/"
        self.tls_url = f"https://127.0.0.1:{ports['tls']}/" if ports["tls"] else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def stats(self) -> Dict[str, int]:
        with self._opener.open(self.http_url + "__stats", timeout=10) as resp:
            data: Dict[str, int] = json.loads(resp.read())
        return data

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)
        self.errlog.close()


class Worker:
    def __init__(
        self,
        env: Env,
        server: Server,
        cafile: Optional[Path],
        file: Path,
        workdir: Path,
        cpus: Optional[List[int]],
    ) -> None:
        self.env = env
        args = [
            env.python,
            str(WORKLOAD),
            "serve",
            "--http-url",
            server.http_url,
            "--file",
            str(file),
        ]
        if server.tls_url and cafile:
            args += ["--tls-url", server.tls_url, "--cafile", str(cafile)]
        if env.patched:
            args.append("--patch")
        self.errpath = workdir / f"worker-{env.key}.stderr"
        self.errlog = open(self.errpath, "w")
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errlog,
            text=True,
            env=child_env(),
            cwd=workdir,
        )
        pin(self.proc.pid, cpus)
        env.info = json.loads(read_line(self.proc, 180, self.what))
        check_env(env)

    @property
    def what(self) -> str:
        return f"worker {self.env.key} ({self.env.label})"

    def run(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        try:
            result: Dict[str, Any] = json.loads(
                read_line(self.proc, RUN_TIMEOUT, self.what)
            )
        except BenchError as exc:
            stderr = self.errpath.read_text()[-3000:]
            raise BenchError(f"{exc}; stderr:\n{stderr}") from None
        if "fatal" in result:
            raise BenchError(f"{self.what} failed on {spec}:\n{result['fatal']}")
        return result

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.errlog.close()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)
        self.errlog.close()


def check_env(env: Env) -> None:
    """The environment holds what its name says (and the fixes are applied)."""
    if env.info.get("aiohttp") != env.aiohttp:
        raise BenchError(f"{env.key}: expected aiohttp {env.aiohttp}, got {env.info}")
    if env.patched:
        if not env.info.get("payloadfix"):
            raise BenchError(f"{env.key}: aiohttp_payloadfix is not installed")
        where = Path(env.info.get("payloadfix_file") or "").resolve()
        if env.path.resolve() not in where.parents:
            raise BenchError(
                f"{env.key}: aiohttp_payloadfix imported from {where}, not from"
                " the environment's snapshot of the checkout"
            )
        failed = {k: v for k, v in env.info["fixes"].items() if v == "failed"}
        if failed:
            raise BenchError(f"{env.key}: fixes failed to apply: {failed}")


# --------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    transport: str  # http, tls
    mode: str  # sequential, concurrent
    body: str  # bytes, bytesio, file
    size: int
    requests: int

    @property
    def name(self) -> str:
        return (
            f"{self.transport} {self.mode} {BODY_LABEL[self.body]} {human(self.size)}"
        )

    @property
    def file_like(self) -> bool:
        return self.body != "bytes"

    def spec(self) -> Dict[str, Any]:
        return {
            "transport": self.transport,
            "mode": self.mode,
            "body": self.body,
            "size": self.size,
            "requests": self.requests,
        }


BODY_LABEL = {"bytes": "bytes", "bytesio": "BytesIO", "file": "file"}


def human(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB} MiB"
    if size >= KiB:
        return f"{size // KiB} KiB"
    return f"{size} B"


def workloads(
    transports: Sequence[str],
    table: Dict[int, Tuple[int, int]],
    scale: float,
    only: Optional[str],
) -> List[Workload]:
    out: List[Workload] = []
    for transport in transports:
        for index, mode in enumerate(("sequential", "concurrent")):
            bodies = [(b, s) for b in ("bytes", "bytesio") for s in SIZES]
            bodies.append(("file", FILE_SIZE))
            for body, size in bodies:
                n = max(1, round(table[size][index] * scale))
                w = Workload(transport, mode, body, size, n)
                if only is None or re.search(only, w.name, re.IGNORECASE):
                    out.append(w)
    return out


# --------------------------------------------------------------------------
# Measuring


def run_rounds(
    work: List[Workload],
    start_workers: Callable[[], List[Worker]],
    server: Server,
    rounds: int,
    warm: bool,
) -> Dict[Tuple[Workload, str], List[Dict[str, Any]]]:
    """Every workload in every environment, ``rounds`` times.

    Each round starts a fresh worker per environment. A process draws its own
    address-space layout, string hash seed and allocator history, and these
    alone moved one environment's throughput by up to 25% from one process to
    the next here (the same aiohttp, the same requests); with one process per
    environment for the whole run, that draw would be in every ratio. So the
    medians are over as many processes as rounds. Within a round the
    environments take turns per workload, and the order of the turns rotates
    from round to round (A B C, B C A, C A B, ...).
    """
    results: Dict[Tuple[Workload, str], List[Dict[str, Any]]] = {}
    for r in range(rounds):
        started = time.perf_counter()
        workers = start_workers()
        shift = r % len(workers)
        workers = workers[shift:] + workers[:shift]
        try:
            _run_round(work, workers, server, results, warm, f"[{r + 1}/{rounds}]")
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        for worker in workers:
            worker.close()
        log(f"round {r + 1}/{rounds} took {time.perf_counter() - started:.0f} s")
    return results


def _run_round(
    work: List[Workload],
    workers: List[Worker],
    server: Server,
    results: Dict[Tuple[Workload, str], List[Dict[str, Any]]],
    warm: bool,
    tag: str,
) -> None:
    if warm:
        # An unrecorded pass with a tenth of the requests: first-run effects
        # (allocator, caches, TLS session set-up) stay out of the round.
        for w in work:
            spec = dict(w.spec(), requests=max(1, w.requests // 10))
            for worker in workers:
                worker.run(spec)
    for w in work:
        line = []
        for worker in workers:
            before = server.stats()
            result = worker.run(w.spec())
            after = server.stats()
            # The stats request itself arrives on a new HTTP connection.
            result["server_connections"] = (
                after[w.transport]
                - before[w.transport]
                - (1 if w.transport == "http" else 0)
            )
            results.setdefault((w, worker.env.key), []).append(result)
            err = f" {result['errors']} ERRORS" if result["errors"] else ""
            line.append(
                f"{worker.env.key} {result['rps']:7.0f}/s"
                f" {result['connections']:4d}c{err}"
            )
        log(f"  {tag} {w.name:34s} " + "  ".join(line))


def run_memory(
    workdir: Path,
    envs: List[Env],
    server: Server,
    upload: Path,
    warm: Path,
    reps: int,
    cpus: Optional[List[int]],
) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in range(reps):
        for env in envs:
            args = [
                env.python,
                str(WORKLOAD),
                "memory",
                "--http-url",
                server.http_url,
                "--file",
                str(upload),
                "--warm-file",
                str(warm),
            ]
            if env.patched:
                args.append("--patch")
            proc = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
                cwd=workdir,
            )
            pin(proc.pid, cpus)
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
            if proc.returncode != 0:
                raise BenchError(f"memory run in {env.label} failed:\n{stderr}")
            result = json.loads(stdout.strip().splitlines()[-1])
            out.setdefault(env.key, []).append(result)
            log(
                f"  memory [{r + 1}/{reps}] {env.label:26s}"
                f" peak growth {result['growth_mib']:8.1f} MiB"
            )
    return out


_IMPORT_BASE = (
    "import time; t0 = time.perf_counter(); import aiohttp;"
    " t1 = time.perf_counter(); print(t1 - t0, 0.0)"
)
_IMPORT_WITH = (
    "import time; t0 = time.perf_counter(); import aiohttp;"
    " t1 = time.perf_counter(); import aiohttp_payloadfix;"
    " t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
)


def run_import(
    workdir: Path, envs: List[Env], pairs: int, cpus: Optional[List[int]]
) -> Dict[str, Dict[str, Any]]:
    """What ``import aiohttp_payloadfix`` adds to ``import aiohttp``.

    Fresh interpreters, alternating ``import aiohttp`` and ``import aiohttp;
    import aiohttp_payloadfix``. The measure: the median, over the runs, of
    the time the second import takes in the process (``perf_counter`` around
    it: the package's modules, the probes and the patches applied at import).
    Cross-check: the median difference of the two commands' whole-process
    wall times, which includes interpreter start-up noise.
    """
    out: Dict[str, Dict[str, Any]] = {}
    env_vars = child_env()

    def timed(python: str, code: str) -> Tuple[float, float, float]:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [python, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env=env_vars,
            # Not the checkout: `python -c` puts the working directory first on
            # sys.path, and the package must come from the environment.
            cwd=workdir,
        )
        pin(proc.pid, cpus)
        stdout, _ = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"{python} -c {code!r} failed")
        first, second = (float(x) for x in stdout.split())
        return wall, first, second

    for env in envs:
        for _ in range(3):  # warm the page cache and bytecode
            timed(env.python, _IMPORT_WITH)
        diffs: List[float] = []
        inproc: List[float] = []
        aiohttp_alone: List[float] = []
        for _ in range(pairs):
            base_wall, alone, _ = timed(env.python, _IMPORT_BASE)
            wall, _, inside = timed(env.python, _IMPORT_WITH)
            diffs.append(wall - base_wall)
            inproc.append(inside)
            aiohttp_alone.append(alone)
        out[env.key] = {
            "adds_ms": statistics.median(inproc) * 1000,
            "wall_diff_ms": statistics.median(diffs) * 1000,
            "aiohttp_ms": statistics.median(aiohttp_alone) * 1000,
            "pairs": pairs,
        }
        log(
            f"  import {env.label:26s} adds {out[env.key]['adds_ms']:.1f} ms"
            f" (whole-process difference {out[env.key]['wall_diff_ms']:+.1f} ms)"
        )
    return out


# --------------------------------------------------------------------------
# Summaries, targets, report


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(
    results: Dict[Tuple[Workload, str], List[Dict[str, Any]]],
) -> Dict[Tuple[Workload, str], Dict[str, float]]:
    out: Dict[Tuple[Workload, str], Dict[str, float]] = {}
    for key, runs in results.items():
        out[key] = {
            metric: med([r[metric] for r in runs])
            for metric in (
                "rps",
                "connections",
                "server_connections",
                "p50_ms",
                "p99_ms",
                "cpu_per_1k",
            )
        }
        out[key]["connections_max"] = max(r["connections"] for r in runs)
        out[key]["errors"] = sum(r["errors"] for r in runs)
        out[key]["runs"] = len(runs)
    return out


@dataclass
class Target:
    name: str
    requirement: str
    measured: str
    met: bool
    detail: List[str] = field(default_factory=list)


def ratio(
    summary: Dict[Tuple[Workload, str], Dict[str, float]], w: Workload, a: str, b: str
) -> float:
    return summary[(w, a)]["rps"] / summary[(w, b)]["rps"]


def round_ratios(
    results: Dict[Tuple[Workload, str], List[Dict[str, Any]]],
    w: Workload,
    a: str,
    b: str,
) -> List[float]:
    """a's requests/s over b's in each round (a round's runs of a workload are
    adjacent in time, in that round's fresh processes)."""
    return [x["rps"] / y["rps"] for x, y in zip(results[(w, a)], results[(w, b)])]


def fmt_rounds(values: List[float], target: float) -> str:
    """``lowest–highest (k of n)``: k rounds reached the target."""
    if not values:
        return "–"
    reached = sum(v >= target for v in values)
    return f"{min(values):.2f}–{max(values):.2f} ({reached} of {len(values)})"


def target_cells(
    summary: Dict[Tuple[Workload, str], Dict[str, float]],
    results: Dict[Tuple[Workload, str], List[Dict[str, Any]]],
    w: Workload,
    a: str,
    b: str,
    target: float,
) -> Tuple[str, str, str, str]:
    """``(a ÷ b, per round, a ÷ b on CPU, met/missed)`` for one workload."""
    r = ratio(summary, w, a, b)
    return (
        f"{r:.2f}",
        fmt_rounds(round_ratios(results, w, a, b), target),
        f"{cpu_ratio(summary, w, a, b):.2f}",
        "met" if r >= target else "missed",
    )


def cpu_ratio(
    summary: Dict[Tuple[Workload, str], Dict[str, float]], w: Workload, a: str, b: str
) -> float:
    """Like ``ratio`` but from client CPU per request (b's CPU over a's): the
    same comparison with waiting for the CPU taken out, which is what a busy
    machine distorts most."""
    return summary[(w, b)]["cpu_per_1k"] / summary[(w, a)]["cpu_per_1k"]


def evaluate(
    work: List[Workload],
    summary: Dict[Tuple[Workload, str], Dict[str, float]],
    memory: Optional[Dict[str, List[Dict[str, Any]]]],
    imports: Optional[Dict[str, Dict[str, Any]]],
    envs: Dict[str, Env],
) -> List[Target]:
    targets: List[Target] = []
    file_like = [w for w in work if w.file_like]
    if file_like:
        ratios = [(ratio(summary, w, "B", "C"), w) for w in file_like]
        worst = min(ratios, key=lambda x: x[0])
        missed = [w.name for r, w in ratios if r < TARGET_VS_UPSTREAM]
        on_cpu = [cpu_ratio(summary, w, "B", "C") for w in file_like]
        targets.append(
            Target(
                "patched 3.11.18 vs upstream 3.12.15, file-like bodies",
                f"B ÷ C ≥ {TARGET_VS_UPSTREAM:.2f} on every BytesIO and file workload",
                f"{len(ratios) - len(missed)} of {len(ratios)} met; lowest"
                f" {worst[0]:.2f} ({worst[1].name}); on client CPU time"
                f" {sum(r >= TARGET_VS_UPSTREAM for r in on_cpu)} of"
                f" {len(on_cpu)}, lowest {min(on_cpu):.2f}",
                not missed,
                missed,
            )
        )
    seq = [
        w
        for w in work
        if (w.transport, w.mode, w.body, w.size)
        == ("http", "sequential", "bytesio", KiB)
    ]
    if seq:
        r = ratio(summary, seq[0], "B", "A")
        targets.append(
            Target(
                "speed-up, sequential 1 KiB BytesIO over HTTP",
                f"B ÷ A ≥ {TARGET_SEQ_BYTESIO_SPEEDUP:.1f}",
                f"{r:.2f} (on client CPU time"
                f" {cpu_ratio(summary, seq[0], 'B', 'A'):.2f})",
                r >= TARGET_SEQ_BYTESIO_SPEEDUP,
            )
        )
    plain = [w for w in work if w.body == "bytes"]
    if plain:
        ratios = [(ratio(summary, w, "B", "A"), w) for w in plain]
        worst = min(ratios, key=lambda x: x[0])
        missed = [w.name for r, w in ratios if r < TARGET_BYTES_OVERHEAD]
        on_cpu = [cpu_ratio(summary, w, "B", "A") for w in plain]
        targets.append(
            Target(
                "cost where no fix is needed: bytes bodies",
                f"B ÷ A ≥ {TARGET_BYTES_OVERHEAD:.2f} on every bytes workload",
                f"{len(ratios) - len(missed)} of {len(ratios)} met; lowest"
                f" {worst[0]:.2f} ({worst[1].name}); on client CPU time"
                f" {sum(r >= TARGET_BYTES_OVERHEAD for r in on_cpu)} of"
                f" {len(on_cpu)}, median {statistics.median(on_cpu):.2f},"
                f" lowest {min(on_cpu):.2f}",
                not missed,
                missed,
            )
        )
    if memory:
        patched = {
            k: max(r["growth_mib"] for r in v)
            for k, v in memory.items()
            if envs[k].patched
        }
        worst_key = max(patched, key=lambda k: patched[k])
        targets.append(
            Target(
                f"peak RSS growth, {human(MEMORY_UPLOAD)} upload, with the package",
                f"< {TARGET_MEMORY_MIB:.0f} MiB on every release",
                ", ".join(f"{envs[k].aiohttp}: {v:.1f} MiB" for k, v in patched.items())
                + f" (worst of the runs; highest {envs[worst_key].aiohttp})",
                all(v < TARGET_MEMORY_MIB for v in patched.values()),
            )
        )
    if imports:
        worst_ms = max(v["adds_ms"] for v in imports.values())
        targets.append(
            Target(
                "import cost",
                f"import aiohttp_payloadfix adds < {TARGET_IMPORT_MS:.0f} ms",
                ", ".join(
                    f"{envs[k].aiohttp}: {v['adds_ms']:.1f} ms"
                    for k, v in imports.items()
                ),
                worst_ms < TARGET_IMPORT_MS,
            )
        )
    return targets


def connection_check(
    work: List[Workload], results: Dict[Tuple[Workload, str], List[Dict[str, Any]]]
) -> List[str]:
    """Failures: errors anywhere; a patched sequential session with != 1 conn."""
    problems: List[str] = []
    for (w, key), runs in results.items():
        for r in runs:
            if r["errors"]:
                problems.append(
                    f"{key} {w.name}: {r['errors']} failed requests,"
                    f" e.g. {r['first_error']}"
                )
            if key == "B" and w.mode == "sequential" and r["connections"] != 1:
                problems.append(
                    f"B (patched) {w.name}: {r['connections']}"
                    " new connections in one sequential session, not 1"
                )
    return problems


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / MiB:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "os": platform.platform(),
    }


def load_average() -> str:
    """The 1-minute load average: other work on the machine shows here."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "unknown"


#: The rounds disagree when a workload's per-round ratios spread (their
#: interquartile range over their median) by more than this, taken as the
#: median over the workloads. Quiet runs here spread by 0.03-0.055. (The
#: interquartile range, not highest minus lowest: that one grows with the
#: number of rounds, and 12 rounds of a quiet run spread by 0.25 where their
#: first 7 spread by 0.17.)
NOISY_SPREAD = 0.09


def round_spread(
    work: List[Workload], results: Dict[Tuple[Workload, str], List[Dict[str, Any]]]
) -> Optional[float]:
    """The median over workloads of the spread of B's per-round ratios (over C
    for file-like bodies, over A for bytes); None with fewer than 3 rounds."""
    spreads = []
    for w in work:
        values = round_ratios(results, w, "B", "C" if w.file_like else "A")
        if len(values) >= 3:
            low, _, high = statistics.quantiles(values, n=4)
            spreads.append((high - low) / statistics.median(values))
    return statistics.median(spreads) if spreads else None


def busy_machine(load: str) -> bool:
    """Other work kept the CPUs busy: a load average above 3/4 of them."""
    try:
        return float(load) > 0.75 * (os.cpu_count() or 1)
    except ValueError:
        return False


def git_info() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--",
                "aiohttp_payloadfix",
                "pyproject.toml",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{head} (with uncommitted changes to the package)" if dirty else head


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def md_table(
    header: Sequence[str], rows: Iterator[Sequence[str]], align: str = ""
) -> List[str]:
    """A Markdown table; ``align`` has one l or r per column (default: the
    first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if a == "l" else "--:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def write_report(
    path: Path,
    meta: Dict[str, Any],
    work: List[Workload],
    summary: Dict[Tuple[Workload, str], Dict[str, float]],
    targets: List[Target],
    memory: Optional[Dict[str, List[Dict[str, Any]]]],
    imports: Optional[Dict[str, Dict[str, Any]]],
    envs: Dict[str, Env],
    chart: Optional[str],
    results: Dict[Tuple[Workload, str], List[Dict[str, Any]]],
) -> None:
    A, B, C = "A", "B", "C"
    rounds_note = (
        " *Per round*: the lowest and highest of the rounds' own ratios, and in"
        " how many rounds the target was reached. A median near the target with"
        " rounds on both sides of it is within this machine's noise; one with"
        " (nearly) every round on the same side is a real difference."
    )
    out: List[str] = [
        "# Benchmarks",
        "",
        "What `aiohttp_payloadfix` buys on the release line it is for, and what it"
        " costs: aiohttp " + OLD + " without it (A) and with it (B), against"
        " upstream aiohttp " + NEW + " (C), same machine, same run.",
        "",
        "Reproduce (from a clone; needs uv and a local Python "
        + meta["python_minor"]
        + "):",
        "",
        "```",
        "python benchmarks/run.py",
        "```",
        "",
        "`python benchmarks/run.py --quick` is the smoke test CI runs (a few"
        " requests, HTTP only; fails unless the patched sequential sessions open"
        " exactly one connection). `--help` lists the options (`--python`,"
        " `--rounds`, `--scale`, `--only`, ...).",
        "",
        "## This run",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['cpus']} CPUs, {meta['machine']['cpu']},"
        f" {meta['machine']['memory']} RAM; {meta['machine']['os']}",
        f"- Python {meta['python_version']} ({meta['python']}), environments"
        f" built by {meta['uv']}",
        f"- aiohttp_payloadfix {meta['payloadfix']}, checkout {meta['git']},"
        f" installed from a snapshot (sha256 {meta['snapshot']}…)",
        f"- niceness {meta['nice']} for every benchmark process",
        f"- client and server pinned to CPUs {meta['pinning']}"
        if meta["pinning"]
        else "- no CPU pinning",
        f"- {meta['rounds']} round{'s' if meta['rounds'] != 1 else ''}; every"
        " workload ran in A, B, C in turn within each round (the order rotating"
        " from round to round), each round in fresh client processes; the"
        " tables show medians over the rounds and ratios of those medians",
        f"- total time {meta['elapsed']}; load average {meta['load']}",
        "",
        *(
            [
                "**This machine was busy with other work during the run** (load"
                f" average {meta['load']}, on {meta['machine']['cpus']} CPUs):"
                " requests/s and latencies include time spent waiting for a CPU,"
                " and their ratios are distorted by it. The client-CPU-time"
                " ratios (*on CPU* columns) are the steadier comparison; rerun on"
                " an idle machine for wall-clock figures.",
                "",
            ]
            if meta["busy"]
            else []
        ),
        *(
            [
                "**The rounds of this run disagree**: the middle half of a"
                " workload's per-round ratios spreads over"
                f" {meta['spread']:.1%} of their median (the median over the"
                f" workloads; above {NOISY_SPREAD:.0%} is flagged, a quiet run"
                " here spreads over 3-5.5%). The process-to-process variation of"
                " this machine was large during the run, and a ratio within that"
                " of a target is not decisive: see the *per round* columns, and"
                " rerun.",
                "",
            ]
            if meta.get("spread") is not None and meta["spread"] > NOISY_SPREAD
            else []
        ),
        "Fixes applied at import, per release (states from"
        " `aiohttp_payloadfix.status()` in the patched environments):",
        "",
    ]
    for env in envs.values():
        if env.patched and env.info.get("fixes"):
            applied = [k for k, v in env.info["fixes"].items() if v == "applied"]
            out.append(f"- {env.aiohttp}: {', '.join(applied) or 'none'}")
    out += [
        "",
        "## Targets",
        "",
        *md_table(
            ("target", "required", "measured", "result"),
            (
                (t.name, t.requirement, t.measured, "met" if t.met else "**missed**")
                for t in targets
            ),
            "llll",
        ),
        "",
    ]
    file_like = [w for w in work if w.file_like]
    if file_like:
        out += [
            "### File-like bodies: patched 3.11.18 against upstream 3.12.15",
            "",
            "B ÷ C per workload. *Bytes twin* is B's throughput with a `bytes`"
            " body of the same size (the same request without a file object,"
            " the cheapest body the patched client sends) ÷ C with the"
            " file-like body: what B would reach if the file-like body cost it"
            " nothing more than bytes. Where the twin itself is"
            f" near or below 1.0, the patched {OLD} client is no faster than"
            f" {NEW} before any body is read, outside the body code the package"
            " replaces (connection pool, response parsing). *B ÷ C on CPU*"
            " compares client CPU time per request instead (C's over B's): the"
            " same ratio without the time spent waiting, for the CPU or for the"
            " server." + rounds_note,
            "",
        ]

        def ceiling(w: Workload) -> str:
            twin = [
                x
                for x in work
                if (x.transport, x.mode, x.body, x.size)
                == (w.transport, w.mode, "bytes", w.size)
            ]
            if not twin:
                return "–"
            return f"{summary[(twin[0], B)]['rps'] / summary[(w, C)]['rps']:.2f}"

        out += md_table(
            (
                "workload",
                "B ÷ C",
                "per round",
                "bytes twin",
                "B ÷ C on CPU",
                f"≥ {TARGET_VS_UPSTREAM:.1f}",
            ),
            (
                (w.name, r, rounds, ceiling(w), cpu, met)
                for w in file_like
                for r, rounds, cpu, met in [
                    target_cells(summary, results, w, B, C, TARGET_VS_UPSTREAM)
                ]
            ),
        )
        out.append("")
    plain = [w for w in work if w.body == "bytes"]
    if plain:
        out += [
            f"### Bytes bodies: patched and unpatched {OLD}",
            "",
            "B ÷ A per workload: what the package costs (or saves) where no fix"
            " is needed. *B ÷ A on CPU* compares client CPU time per request"
            " (A's over B's)." + rounds_note,
            "",
        ]
        out += md_table(
            (
                "workload",
                "B ÷ A",
                "per round",
                "B ÷ A on CPU",
                f"≥ {TARGET_BYTES_OVERHEAD:.2f}",
            ),
            (
                (
                    w.name,
                    *target_cells(summary, results, w, B, A, TARGET_BYTES_OVERHEAD),
                )
                for w in plain
            ),
        )
        out.append("")
    for transport in ("http", "tls"):
        rows = [w for w in work if w.transport == transport]
        if not rows:
            continue
        title = "HTTP" if transport == "http" else "TLS (trustme certificate)"
        out += [
            f"## {title}: throughput and connections",
            "",
            "Requests per second (median), B's ratios, B ÷ A on client CPU time"
            " per request (A's over B's), and new connections per run"
            " (client-side count, median; the server's own count agrees unless"
            " marked *).",
            "",
        ]

        def conns(w: Workload) -> str:
            parts = []
            for k in (A, B, C):
                s = summary[(w, k)]
                mark = "" if s["connections"] == s["server_connections"] else "*"
                parts.append(f"{s['connections']:.0f}{mark}")
            return " / ".join(parts)

        out += md_table(
            (
                "workload",
                "requests",
                "A req/s",
                "B req/s",
                "C req/s",
                "B ÷ A",
                "B ÷ C",
                "B ÷ A on CPU",
                "connections A / B / C",
            ),
            (
                (
                    f"{w.mode} {BODY_LABEL[w.body]} {human(w.size)}",
                    str(w.requests),
                    fmt_rps(summary[(w, A)]["rps"]),
                    fmt_rps(summary[(w, B)]["rps"]),
                    fmt_rps(summary[(w, C)]["rps"]),
                    f"{ratio(summary, w, B, A):.2f}",
                    f"{ratio(summary, w, B, C):.2f}",
                    f"{cpu_ratio(summary, w, B, A):.2f}",
                    conns(w),
                )
                for w in rows
            ),
        )
        out += [
            "",
            f"## {title}: latency and client CPU",
            "",
            "p50 and p99 latency in ms (a request from the call to the end of"
            " the response; concurrent runs include the wait for one of the 16"
            " connections), and client CPU seconds per 1,000 requests (the"
            " client process with all its threads; the server runs elsewhere).",
            "",
        ]
        out += md_table(
            ("workload", "p50 A / B / C", "p99 A / B / C", "CPU s/1k A / B / C"),
            (
                (
                    f"{w.mode} {BODY_LABEL[w.body]} {human(w.size)}",
                    " / ".join(fmt_ms(summary[(w, k)]["p50_ms"]) for k in (A, B, C)),
                    " / ".join(fmt_ms(summary[(w, k)]["p99_ms"]) for k in (A, B, C)),
                    " / ".join(
                        f"{summary[(w, k)]['cpu_per_1k']:.3f}" for k in (A, B, C)
                    ),
                )
                for w in rows
            ),
        )
        out.append("")
    if chart:
        out += ["## Chart", "", f"![requests per second per workload]({chart})", ""]
    if memory:
        out += [
            f"## Memory: one {human(MEMORY_UPLOAD)} file upload with Content-Length",
            "",
            "Peak RSS growth of the client process during the upload: the"
            " kernel's high-water mark (VmHWM, reset just before the upload"
            " through /proc/self/clear_refs) minus the RSS just before it, after"
            " a warm-up upload on the same session. One fresh process per run,"
            " the releases alternating.",
            "",
        ]
        out += md_table(
            (
                "environment",
                "median growth MiB",
                "worst MiB",
                "runs",
                "upload s (median)",
            ),
            (
                (
                    envs[k].label,
                    f"{med([r['growth_mib'] for r in v]):.1f}",
                    f"{max(r['growth_mib'] for r in v):.1f}",
                    str(len(v)),
                    f"{med([r['elapsed'] for r in v]):.2f}",
                )
                for k, v in memory.items()
            ),
        )
        out.append("")
    if imports:
        out += [
            "## Import time",
            "",
            "Fresh interpreters, alternating `import aiohttp` and `import aiohttp;"
            " import aiohttp_payloadfix`. *Adds*: the median time of the second"
            " import, measured in the process (the package's modules, its probes"
            " and the patches it applies at import). Cross-check: the median"
            " difference of the two commands' whole-process wall times, which"
            " carries the noise of interpreter start-up.",
            "",
        ]
        out += md_table(
            (
                "environment",
                "adds (median ms)",
                "whole-process difference (ms)",
                "import aiohttp alone (ms)",
                "runs of each",
            ),
            (
                (
                    envs[k].label,
                    f"{v['adds_ms']:.1f}",
                    f"{v['wall_diff_ms']:+.1f}",
                    f"{v['aiohttp_ms']:.0f}",
                    str(v["pairs"]),
                )
                for k, v in imports.items()
            ),
        )
        out.append("")
    out += [
        "## Method",
        "",
        "- Server: `benchmarks/server.py`, a plain asyncio HTTP/1.1 sink from the"
        " standard library, run by the base interpreter in its own process (the"
        " same server for every environment). It reads each request's whole body"
        " and then answers `200` with an empty body, keeping the connection open;"
        " a second listener does the same over TLS with a trustme certificate for"
        " 127.0.0.1. Everything runs on loopback.",
        "- Client: `benchmarks/workload.py`, one process per environment and"
        " round (imports, a warm-up and an unrecorded pass with a tenth of the"
        " requests outside the measurements), a new `ClientSession` per run."
        " Fresh processes every round: a process's address-space layout, hash"
        " seed and allocator history alone moved one environment's throughput"
        " by up to 25% between two processes here. Each worker first frees one"
        " 16 MiB buffer, so glibc's dynamic mmap threshold starts equal in all of"
        " them (it otherwise depends on the largest buffer a worker happened to"
        " free, and decides whether every 256 KiB socket read costs an mmap)."
        " Sequential runs post one request after the other; concurrent runs"
        " post from 64 tasks through a `TCPConnector`"
        " limited to 16 connections. Bodies: the same `bytes` object, a new"
        " `io.BytesIO` over it, or a newly opened 16 MiB file, per request.",
        "- New connections: a `TraceConfig` counting `on_connection_create_end`.",
        "- CPU: `time.process_time()` of the client process over the run.",
        "",
    ]
    path.write_text("\n".join(out))


# --------------------------------------------------------------------------
# Main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark aiohttp_payloadfix against unpatched and upstream"
        " aiohttp (issue 5).",
    )
    parser.add_argument(
        "--python",
        default="3.11",
        help="base interpreter: a path or a version (default 3.11)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke test: few requests, HTTP only, no chart,"
        " memory or import part; checks connection counts",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds of A B C per workload (default {FULL_ROUNDS}, quick 1)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the requests per run"
    )
    parser.add_argument(
        "--only",
        help="regex: run only the workloads it matches"
        " (e.g. 'http sequential bytesio')",
    )
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-import", action="store_true")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin server and client to separate CPUs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs",
        help="where benchmarks.md and benchmarks.png go (default"
        " docs/; not written by --quick)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the benchmark's processes at this niceness (negative needs"
        " root): on a machine busy with other work, e.g. -10 keeps the"
        " measurements from waiting for the CPU",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="environments and files go here (default: a temporary"
        " directory, removed afterwards)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = load_average()
    quick: bool = args.quick
    rounds: int = args.rounds or (1 if quick else FULL_ROUNDS)
    tls = not (quick or args.no_tls)
    do_memory = not (quick or args.no_memory)
    do_import = not (quick or args.no_import)
    do_chart = not (quick or args.no_chart)
    os.environ["UV_PYTHON_DOWNLOADS"] = "never"
    if args.nice:
        # Inherited by the server, the workers and every measured process.
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)

    base = find_python(args.python)
    base_exe, base_version = describe_python(base)
    uv = find_uv()
    uv_version = subprocess.run(
        [*uv, "--version"], capture_output=True, text=True
    ).stdout.strip()
    log(f"base interpreter {base_exe} (Python {base_version}); {uv_version}")

    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="payloadfix-bench-"))
        cleanup = True
    server: Optional[Server] = None
    try:
        src = workdir / f"src-{os.getpid()}-{int(time.time())}"
        digest = snapshot_package(src)
        envs: Dict[str, Env] = {
            "A": Env("A", OLD, False, workdir / "env-A"),
            "B": Env("B", OLD, True, workdir / "env-B"),
            "C": Env("C", NEW, False, workdir / "env-C"),
        }
        if do_memory or do_import:
            envs["D"] = Env("D", MEM_EXTRA, False, workdir / "env-D")
            envs["E"] = Env("E", MEM_EXTRA, True, workdir / "env-E")
            envs["F"] = Env("F", NEW, True, workdir / "env-F")
        t = time.perf_counter()
        for env in envs.values():
            reqs = [f"aiohttp=={env.aiohttp}"] + ([str(src)] if env.patched else [])
            build_env(uv, base, env.path, reqs)
        tools: Optional[Path] = None
        if tls or do_chart:
            tools = workdir / "env-tools"
            build_env(uv, base, tools, ["trustme", "matplotlib"])
        log(
            f"built {len(envs) + (1 if tools else 0)} environments in"
            f" {time.perf_counter() - t:.1f} s under {workdir}"
        )

        certs: Optional[Tuple[Path, Path]] = None
        if tls:
            assert tools is not None
            certs = (workdir / "ca.pem", workdir / "server.pem")
            subprocess.run(
                [
                    str(venv_python(tools)),
                    "-c",
                    "import sys, trustme; ca = trustme.CA();"
                    " cert = ca.issue_cert('127.0.0.1', 'localhost');"
                    " ca.cert_pem.write_to_path(sys.argv[1]);"
                    " cert.private_key_and_cert_chain_pem.write_to_path(sys.argv[2])",
                    str(certs[0]),
                    str(certs[1]),
                ],
                check=True,
                env=child_env(),
            )
        body_file = workdir / "body-16MiB.bin"
        make_file(body_file, FILE_SIZE)

        server_cpus, client_cpus = cpu_plan(not args.no_pin)
        server = Server(base_exe, workdir, certs, server_cpus)
        work = workloads(
            ["http", "tls"] if tls else ["http"],
            QUICK_REQUESTS if quick else FULL_REQUESTS,
            args.scale,
            args.only,
        )
        if not work:
            raise BenchError(f"--only {args.only!r} matches no workload")
        main_envs = [envs["A"], envs["B"], envs["C"]]
        running = server

        def start_workers() -> List[Worker]:
            started: List[Worker] = []
            try:
                for env in main_envs:
                    started.append(
                        Worker(
                            env,
                            running,
                            certs[0] if certs else None,
                            body_file,
                            workdir,
                            client_cpus,
                        )
                    )
            except BaseException:
                for worker in started:
                    worker.kill()
                raise
            return started

        log(f"{len(work)} workloads x {len(main_envs)} environments x {rounds} rounds")
        results = run_rounds(work, start_workers, server, rounds, warm=not quick)

        memory: Optional[Dict[str, List[Dict[str, Any]]]] = None
        if do_memory:
            upload = workdir / "upload-256MiB.bin"
            make_file(upload, MEMORY_UPLOAD)
            order = [envs[k] for k in ("A", "B", "D", "E", "C", "F")]
            memory = run_memory(
                workdir, order, server, upload, body_file, 3, client_cpus
            )
            upload.unlink()
        imports: Optional[Dict[str, Dict[str, Any]]] = None
        if do_import:
            imports = run_import(
                workdir, [envs[k] for k in ("B", "E", "F")], 30, client_cpus
            )
        server.close()
        server = None

        summary = summarise(results)
        problems = connection_check(work, results)
        targets = evaluate(work, summary, memory, imports, envs)
        log("")
        for target in [] if quick else targets:
            log(
                f"{'met   ' if target.met else 'MISSED'} {target.name}:"
                f" {target.measured}"
            )
        for w in work:
            if w.mode == "sequential":
                log(
                    f"connections per sequential session, {w.name}: "
                    + ", ".join(
                        f"{k} {summary[(w, k)]['connections']:.0f}"
                        for k in ("A", "B", "C")
                    )
                )

        elapsed = time.perf_counter() - started
        load_end = load_average()
        meta: Dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"
            ),
            "machine": machine_info(),
            "python": base_exe,
            "python_version": base_version,
            "python_minor": ".".join(base_version.split(".")[:2]),
            "uv": uv_version,
            "payloadfix": envs["B"].info.get("payloadfix"),
            "git": git_info(),
            "snapshot": digest,
            "pinning": (
                f"server {server_cpus}, client {client_cpus}" if server_cpus else ""
            ),
            "rounds": rounds,
            "nice": args.nice,
            "elapsed": f"{elapsed / 60:.1f} min",
            "load": f"{load_start} at the start, {load_end} at the end",
            # At the end the 1-minute load average is mostly this benchmark's
            # own client and server (1.4-1.6 on a quiet 2-CPU machine here):
            # other work shows in the load found at the start.
            "busy": busy_machine(load_start),
            "spread": round_spread(work, results),
        }
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "meta": meta,
                        "envs": {
                            k: {"label": e.label, **e.info} for k, e in envs.items()
                        },
                        "runs": [
                            {"workload": w.spec(), "env": k, "results": v}
                            for (w, k), v in results.items()
                        ],
                        "memory": memory,
                        "imports": imports,
                    },
                    indent=1,
                )
            )
        if not quick:
            args.out.mkdir(parents=True, exist_ok=True)
            chart_name: Optional[str] = None
            if do_chart and tools is not None:
                chart_data = workdir / "chart.json"
                chart_data.write_text(
                    json.dumps(
                        {
                            "labels": {k: envs[k].label for k in ("A", "B", "C")},
                            "rows": [
                                {
                                    "transport": w.transport,
                                    "mode": w.mode,
                                    "body": f"{BODY_LABEL[w.body]} {human(w.size)}",
                                    "rps": {
                                        k: summary[(w, k)]["rps"]
                                        for k in ("A", "B", "C")
                                    },
                                }
                                for w in work
                            ],
                            "title": f"requests/s, Python {base_version},"
                            f" {meta['machine']['cpus']} CPUs ({meta['date']})",
                        }
                    )
                )
                png = args.out / "benchmarks.png"
                subprocess.run(
                    [str(venv_python(tools)), str(CHART), str(chart_data), str(png)],
                    check=True,
                    env=child_env(),
                )
                chart_name = png.name
            report = args.out / "benchmarks.md"
            write_report(
                report,
                meta,
                work,
                summary,
                targets,
                memory,
                imports,
                envs,
                chart_name,
                results,
            )
            log(f"wrote {report}")
        log(f"total {elapsed:.0f} s")
        if problems:
            log("FAILED:\n  " + "\n  ".join(problems))
            return 1
        log(
            "connection check passed: the patched sequential sessions each"
            " opened 1 connection"
        )
        return 0
    except (BenchError, subprocess.CalledProcessError) as exc:
        log(f"benchmark failed: {exc}")
        return 2
    finally:
        if server is not None:
            server.proc.kill()
            server.proc.wait()
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
