"""Check every aiohttp release on every local Python and write COMPATIBILITY.md.

    python tools/matrix.py --python 3.9=/path/to/python3.9 --python 3.13=... \\
        [--releases 3.12.0,3.12.8] [--workers 2] [--output COMPATIBILITY.md]

``nox -s matrix`` passes the local interpreters. For each Python one venv is
made with uv and the checkout installed into it (editable, no dependencies);
then, release after release, aiohttp is installed from wheels only (never
compiled: no wheel is a result, not an error) and
``python -m aiohttp_payloadfix check --json`` runs. On the newest Python each
3.12.x release also gets a memory probe (tools/memprobe.py): a 256 MiB file
upload with the package active and with its fixes disabled. Two Pythons run
at a time; uv's cache makes each reinstall a fraction of a second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".nox" / "matrix-venvs"
OLDEST = (3, 9, 0)
NEWEST_LINE = (3, 14)
FIXED_UPSTREAM = (3, 13, 0)  # nothing is patched from here on
PROBE_LINE = (3, 12)
PROBE_LIMIT_MIB = 32.0  # peak growth allowed with the package
# What uv says when a release has no wheel for the interpreter, or no release
# for it at all (Requires-Python).
NO_WHEEL = re.compile(
    r"no usable wheels|no wheels with a matching|does not satisfy Python"
)
STATES = ("ok", "untouched", "failed", "no wheel")

Version = Tuple[int, ...]


def version(text: str) -> Version:
    return tuple(int(part) for part in text.split("."))


@dataclass
class Cell:
    release: str
    python: str
    state: str
    detail: str = ""
    patched: Tuple[str, ...] = ()
    python_version: str = ""
    package_version: str = ""


@dataclass
class Probe:
    release: str
    with_package: Optional[float] = None
    disabled: Optional[float] = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.with_package is not None and self.with_package < PROBE_LIMIT_MIB


@dataclass
class Row:
    python: str
    cells: List[Cell] = field(default_factory=list)
    probes: List[Probe] = field(default_factory=list)


def uv_command() -> List[str]:
    found = os.environ.get("UV") or shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def run(
    cmd: Sequence[str], timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {timeout} s")


def list_releases() -> List[str]:
    """aiohttp 3.9.0 ... newest 3.14.x from the registry; no pre-releases, no yanked."""
    done = run([sys.executable, "-m", "pip", "index", "versions", "aiohttp"])
    match = re.search(r"Available versions: (.*)", done.stdout)
    if done.returncode != 0 or not match:
        sys.exit(f"pip index versions aiohttp failed:\n{done.stdout}{done.stderr}")
    found = [v.strip() for v in match.group(1).split(",")]
    final = [v for v in found if re.fullmatch(r"\d+\.\d+\.\d+", v)]
    return sorted(
        (v for v in final if OLDEST <= version(v) and version(v)[:2] <= NEWEST_LINE),
        key=version,
    )


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def classify(release: str, python: str, done: subprocess.CompletedProcess[str]) -> Cell:
    try:
        report = json.loads(done.stdout)
    except ValueError:
        detail = f"check exited {done.returncode} without JSON:\n{tail(done.stderr)}"
        return Cell(release, python, "failed", detail)
    status = report["status"]
    fixes = status["fixes"]
    patched = tuple(f["id"] for f in fixes if f["state"] == "applied")
    unhandled = [
        f"{f['id']} is {f['state']}: {f['reason']}"
        for f in fixes
        if f["needed"] and f["state"] != "applied"
    ]
    broken = [
        f"{c['scenario']} [{c['fix']}{'' if c['active'] else ', inactive'}]:"
        f" {c['patched']['text']}"
        for c in report["checks"]
        if not c["patched"]["ok"]
    ]
    cell = Cell(
        release,
        python,
        "ok",
        patched=patched,
        python_version=status["python_version"],
        package_version=status["version"],
    )
    if version(release) >= FIXED_UPSTREAM:
        # By design nothing is patched; scenarios that upstream still gets
        # wrong are worth a note, not a failure of this package.
        cell.state = "failed" if patched or done.returncode else "untouched"
        if patched:
            broken.insert(0, f"patched on a release fixed upstream: {patched}")
    elif done.returncode or unhandled or broken or not status["supported"]:
        cell.state = "failed"
        broken = [f"check exited {done.returncode}", *unhandled, *broken]
    cell.detail = "\n".join(broken)
    return cell


def memprobe(python: Path, mib: int, disabled: bool) -> Tuple[Optional[float], str]:
    env = dict(os.environ, AIOHTTP_PAYLOADFIX_DISABLE="1" if disabled else "0")
    cmd = [str(python), str(ROOT / "tools" / "memprobe.py"), f"--mib={mib}"]
    done = run(cmd, env=env, cwd=ROOT)
    try:
        result = json.loads(done.stdout)
        if result["received"] != mib << 20:
            return None, f"server received {result['received']} bytes"
        return float(result["peak_growth_mib"]), ""
    except (ValueError, KeyError):
        return None, tail(done.stderr, 5) or f"exit {done.returncode}"


def run_row(
    python: str, interpreter: str, releases: Sequence[str], probe_mib: int
) -> Row:
    row = Row(python)
    uv = uv_command()
    venv = VENVS / f"py{python}"
    bin_python = venv / "bin" / "python"
    setup = run([*uv, "venv", "--quiet", "--clear", "--python", interpreter, str(venv)])
    pip_install = [*uv, "pip", "install", "--quiet", "--python", str(bin_python)]
    if setup.returncode == 0:
        setup = run([*pip_install, "--no-deps", "-e", str(ROOT)])
    if setup.returncode:
        detail = f"venv setup failed:\n{tail(setup.stderr)}"
        row.cells = [Cell(r, python, "failed", detail) for r in releases]
        return row
    for release in releases:
        start = time.monotonic()
        install = run([*pip_install, "--only-binary", ":all:", f"aiohttp=={release}"])
        if install.returncode:
            if NO_WHEEL.search(install.stderr):
                cell = Cell(release, python, "no wheel")
            else:
                detail = f"install failed:\n{tail(install.stderr)}"
                cell = Cell(release, python, "failed", detail)
        else:
            env = dict(os.environ)
            env.pop("AIOHTTP_PAYLOADFIX_DISABLE", None)
            check = [str(bin_python), "-m", "aiohttp_payloadfix", "check", "--json"]
            cell = classify(release, python, run(check, env=env, cwd=ROOT))
            if probe_mib and version(release)[:2] == PROBE_LINE:
                with_package, error = memprobe(bin_python, probe_mib, disabled=False)
                disabled, error2 = memprobe(bin_python, probe_mib, disabled=True)
                row.probes.append(
                    Probe(release, with_package, disabled, error or error2)
                )
        row.cells.append(cell)
        took = time.monotonic() - start
        print(
            f"[py{python}] aiohttp {release}: {cell.state} ({took:.1f} s)", flush=True
        )
    return row


def mib(value: Optional[float]) -> str:
    return "error" if value is None else f"{value:.1f} MiB"


def render(
    rows: Sequence[Row],
    releases: Sequence[str],
    probe_mib: int,
    probe_python: str,
    elapsed: float,
    subset: bool,
) -> str:
    cells: Dict[Tuple[str, str], Cell] = {
        (c.release, c.python): c for row in rows for c in row.cells
    }
    pythons = [row.python for row in rows]
    counts = {state: 0 for state in STATES}
    for cell in cells.values():
        counts[cell.state] += 1
    package = next(
        (c.package_version for c in cells.values() if c.package_version), "?"
    )
    versions = {c.python: c.python_version for c in cells.values() if c.python_version}
    commit = run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]
    ).stdout.strip()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    out = [
        "# Compatibility",
        "",
        f"Generated on {today} by `nox -s matrix` (tools/matrix.py) for"
        f" aiohttp-payloadfix {package} (commit `{commit or 'unknown'}`),"
        f" in {elapsed / 60:.1f} minutes. Do not edit by hand: run it again.",
        "",
        (
            "A subset of aiohttp releases (--releases)"
            if subset
            else "Every aiohttp release from 3.9.0 to the newest 3.14.x"
            " (pre-releases and yanked releases left out)"
        )
        + " on every local Python"
        f" ({', '.join(versions.get(p, p) for p in pythons)}), installed from wheels,"
        " then `python -m aiohttp_payloadfix check --json` (a live self-test"
        " against an aiohttp server on 127.0.0.1).",
        "",
        "- **ok**: the check passed, every fix this release needs is applied and"
        " every scenario behaves.",
        "- **untouched**: aiohttp 3.13 and newer: nothing is patched, by design"
        " (what the self-test finds there is listed at the end).",
        "- **failed**: see [Failures](#failures).",
        "- **no wheel**: no aiohttp wheel for that Python (or the release does"
        " not support it); nothing was compiled.",
        "",
        "**" + ", ".join(f"{counts[s]} {s}" for s in STATES) + "**"
        f" ({len(cells)} cells).",
        "",
        "| aiohttp | "
        + " | ".join(f"Python {p}" for p in pythons)
        + " | fixes applied |",
        "|---" * (len(pythons) + 2) + "|",
    ]
    for release in reversed(releases):
        row_cells = [cells.get((release, p)) for p in pythons]
        marks = [c.state if c else "-" for c in row_cells]
        applied = sorted({fix for c in row_cells if c for fix in c.patched})
        mark_cells = ["**failed**" if m == "failed" else m for m in marks]
        out.append(
            f"| {release} | " + " | ".join(mark_cells) + f" | {', '.join(applied)} |"
        )
    probes = [p for row in rows for p in row.probes]
    if probes:
        out += [
            "",
            f"## Memory: a {probe_mib} MiB file upload on the 3.12 line",
            "",
            f"Peak RSS growth of a client process (Python"
            f" {versions.get(probe_python, probe_python)}) that posts a"
            f" {probe_mib} MiB file with `Content-Length` to an aiohttp server in"
            " another process (tools/memprobe.py), with the package imported;"
            " the last column with its fixes disabled"
            " (`AIOHTTP_PAYLOADFIX_DISABLE=1`). With the package the growth must"
            f" stay under {PROBE_LIMIT_MIB:.0f} MiB.",
            "",
            "| aiohttp | with aiohttp-payloadfix | fixes disabled |",
            "|---|---|---|",
        ]
        for p in sorted(probes, key=lambda p: version(p.release), reverse=True):
            note = f" ({p.error})" if p.error else ""
            note += "" if p.ok else " **failed**"
            out.append(
                f"| {p.release} | {mib(p.with_package)}{note} | {mib(p.disabled)} |"
            )
    failed = [c for c in cells.values() if c.state == "failed"]
    # What untouched cells report -> on which releases and Pythons.
    notes: Dict[str, List[Cell]] = {}
    for c in cells.values():
        if c.state == "untouched" and c.detail:
            notes.setdefault(c.detail, []).append(c)
    out += ["", "## Failures", ""]
    if not failed:
        out.append("None.")
    for cell in sorted(failed, key=lambda c: (version(c.release), version(c.python))):
        out += [
            f"aiohttp {cell.release}, Python {cell.python}:",
            "",
            "```",
            cell.detail,
            "```",
            "",
        ]
    if notes:
        out += [
            "",
            "## Upstream behaviour on untouched releases",
            "",
            "Scenarios of the self-test that these releases, left as they are"
            " (the package patches nothing there), do not pass:",
        ]
        for detail, group in notes.items():
            on_releases = sorted({c.release for c in group}, key=version)
            on_pythons = sorted({c.python for c in group}, key=version)
            out += [
                "",
                f"aiohttp {', '.join(on_releases)} (Python {', '.join(on_pythons)}):",
                "",
            ]
            out += [f"- {line}" for line in detail.splitlines()]
    return "\n".join(out).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--python",
        action="append",
        required=True,
        metavar="X.Y=PATH",
        help="an interpreter to use (repeat)",
    )
    parser.add_argument("--releases", help="comma-separated subset of releases")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--probe-mib", type=int, default=256, help="0: no probe")
    parser.add_argument("--output", type=Path, default=ROOT / "COMPATIBILITY.md")
    args = parser.parse_args(argv)
    os.environ["UV_PYTHON_DOWNLOADS"] = "never"
    interpreters = dict(spec.split("=", 1) for spec in args.python)
    releases = args.releases.split(",") if args.releases else list_releases()
    probe_python = max(interpreters, key=version)
    print(f"{len(releases)} releases x {len(interpreters)} Pythons", flush=True)
    start = time.monotonic()
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [
            pool.submit(
                run_row,
                python,
                path,
                releases,
                args.probe_mib if python == probe_python else 0,
            )
            # The probe's row has the most work: start it first.
            for python, path in sorted(
                interpreters.items(), key=lambda item: item[0] != probe_python
            )
        ]
        rows = sorted((f.result() for f in futures), key=lambda r: version(r.python))
    elapsed = time.monotonic() - start
    subset = bool(args.releases)
    text = render(rows, releases, args.probe_mib, probe_python, elapsed, subset)
    args.output.write_text(text)
    failed = sum(c.state == "failed" for row in rows for c in row.cells)
    bad_probes = sum(not p.ok for row in rows for p in row.probes)
    print(
        f"wrote {args.output} in {elapsed / 60:.1f} minutes;"
        f" {failed} failed cell(s), {bad_probes} failed memory probe(s)"
    )
    return 1 if failed or bad_probes else 0


if __name__ == "__main__":
    sys.exit(main())
