"""Test aiohttp-payloadfix across aiohttp releases and local Pythons.

    nox -s tests --parallel 2  # the full suite on representative cells
    nox -t ci --parallel 2     # the subset .ci/run runs
    nox -s matrix              # every release x every Python -> COMPATIBILITY.md
    nox -s bench               # benchmarks/run.py
    nox -s soak                # the long reliability run (issue 6)

uv installs everything, and only the interpreters already on this machine are
used (pyenv's, else ``pythonX.Y`` on PATH): nothing downloads a Python.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import nox

# --parallel arrived in 2026.08.10; download_python in 2025.02.09.
nox.needs_version = ">=2026.8.10"
nox.options.default_venv_backend = "uv"
nox.options.download_python = "never"
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True
os.environ["UV_PYTHON_DOWNLOADS"] = "never"

ROOT = Path(__file__).parent
PYTHON_MINORS = ("3.9", "3.10", "3.11", "3.12", "3.13")


def _local_python(minor: str) -> Optional[str]:
    """The newest pyenv build of ``minor``, else ``pythonX.Y`` on PATH."""
    versions = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser() / "versions"
    found: List[Tuple[Tuple[int, ...], Path]] = []
    for path in versions.glob(f"{minor}.*/bin/python3"):
        patch = path.parent.parent.name
        if re.fullmatch(re.escape(minor) + r"\.\d+", patch):
            found.append((tuple(int(p) for p in patch.split(".")), path))
    if found:
        return str(max(found)[1])
    return shutil.which(f"python{minor}")


PYTHONS: Dict[str, str] = {
    minor: path for minor in PYTHON_MINORS if (path := _local_python(minor))
}

# First and last release of each line, both sides of each fix boundary
# (cancelled-upload-close <3.10.6, file-payload-reuse <3.12.0, chunked-file-reads
# <3.12.9, write-bytes-signature <3.12.15) and the newest 3.13.x and 3.14.x,
# where nothing is patched. `nox -s matrix` covers every release.
RELEASES = (
    "3.9.0",
    "3.9.5",
    "3.10.0",
    "3.10.5",
    "3.10.6",
    "3.10.11",
    "3.11.0",
    "3.11.18",
    "3.12.0",
    "3.12.8",
    "3.12.9",
    "3.12.14",
    "3.12.15",
    "3.13.5",
    "3.14.5",
)
# On Python 3.12+ aiohttp starts the body write eagerly (eager_start=True), and
# its StreamWriter takes another path on Python < 3.12.9: the local 3.12.x
# (pyenv's 3.12.1) covers that combination, one release per patched line.
EAGER_RELEASES = ("3.10.5", "3.11.18", "3.12.8", "3.12.15")

TEST_CELLS = [
    (python, release) for python in ("3.9", "3.13") for release in RELEASES
] + [("3.12", release) for release in EAGER_RELEASES]

# The cells .ci/run runs (`nox -t ci`), to stay within its time: both sides
# of every fix boundary on the oldest Python, the eager-task path on 3.12 and
# 3.13, and one release where nothing is patched.
CI_CELLS = {
    ("3.9", release)
    for release in (
        "3.9.0",
        "3.9.5",
        "3.10.5",
        "3.10.6",
        "3.11.18",
        "3.12.0",
        "3.12.8",
        "3.12.15",
    )
} | {
    ("3.13", "3.10.5"),
    ("3.13", "3.12.8"),
    ("3.13", "3.12.15"),
    ("3.13", "3.14.5"),
    ("3.12", "3.11.18"),
    ("3.12", "3.12.15"),
}

# What uv says when a release has no wheel for the interpreter, or no release
# for it at all (Requires-Python).
NO_WHEEL = re.compile(
    r"no usable wheels|no wheels with a matching|does not satisfy Python"
)


def _uv() -> List[str]:
    try:
        from uv import find_uv_bin
    except ImportError:
        found = shutil.which("uv")
        return [found] if found else [sys.executable, "-m", "uv"]
    return [find_uv_bin()]


def _install_aiohttp_wheel(session: nox.Session, release: str) -> None:
    """Install ``aiohttp==release`` from wheels only; skip the cell if none fits."""
    assert isinstance(session.virtualenv, nox.virtualenv.VirtualEnv)
    cmd = [*_uv(), "pip", "install", "--only-binary", ":all:"]
    cmd += ["--python", session.virtualenv.location, f"aiohttp=={release}"]
    session.log(" ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return
    if NO_WHEEL.search(done.stderr):
        python = next((k for k, v in PYTHONS.items() if v == session.python), "")
        session.skip(f"no aiohttp {release} wheel for Python {python}")
    session.error(f"installing aiohttp {release} failed:\n{done.stderr}")


def _test_pins() -> List[str]:
    """requirements/test.txt without its aiohttp pin (each cell brings its own)."""
    lines = (ROOT / "requirements" / "test.txt").read_text().splitlines()
    pins = [line.split("#")[0].strip() for line in lines]
    return [pin for pin in pins if pin and not re.match(r"aiohttp\b", pin)]


@nox.session(allow_parallel=True)
@nox.parametrize(
    ("python", "aiohttp"),
    [
        nox.param(
            PYTHONS.get(py, py),
            release,
            id=f"python='{py}', aiohttp='{release}'",
            tags=["ci"] if (py, release) in CI_CELLS else [],
        )
        for py, release in TEST_CELLS
    ],
)
def tests(session: nox.Session, aiohttp: str) -> None:
    """The full test suite against one aiohttp release."""
    _install_aiohttp_wheel(session, aiohttp)
    session.install("-e", ".", *_test_pins(), f"aiohttp=={aiohttp}")
    session.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs
    )


@nox.session(venv_backend="none")
def matrix(session: nox.Session) -> None:
    """Every aiohttp release from 3.9.0 on x every local Python -> COMPATIBILITY.md."""
    args = [f"--python={minor}={path}" for minor, path in PYTHONS.items()]
    session.run(sys.executable, "tools/matrix.py", *args, *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks (benchmarks/run.py), with the package installed."""
    session.install("-e", ".", "matplotlib")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=PYTHONS.get("3.11", "3.11"))
def soak(session: nox.Session) -> None:
    """The long reliability session (issue 6): 25,000 generated requests
    (tests/test_desync.py; PAYLOADFIX_SOAK_EXAMPLES to change) and 5,000
    uploads at concurrency 64 with injected faults (tests/test_load.py), on
    loopback; counts go to docs/reliability.json, or
    docs/reliability-<release>.json for another release (docs/reliability.md
    quotes them). Not part of `ci`.

        nox -s soak                      # aiohttp 3.11.18
        SOAK_AIOHTTP=3.12.15 nox -s soak # another release
    """
    release = os.environ.get("SOAK_AIOHTTP", "3.11.18")
    _install_aiohttp_wheel(session, release)
    session.install("-e", ".", *_test_pins(), f"aiohttp=={release}")
    name = "reliability" if release == "3.11.18" else f"reliability-{release}"
    report = ROOT / "docs" / f"{name}.json"
    report.unlink(missing_ok=True)
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_desync.py",
        "tests/test_load.py",
        *session.posargs,
        env={"PAYLOADFIX_SOAK": "1", "PAYLOADFIX_SOAK_REPORT": str(report)},
    )
