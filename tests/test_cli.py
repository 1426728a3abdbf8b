"""The command line: ``python -m aiohttp_payloadfix [--json] [check [--compare]]``.

Run in fresh interpreters: the self-test logs an over-long body on purpose and
reverts and re-applies the fixes, which this process's checks would see.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List

from aiohttp_payloadfix._check import SCENARIOS
from aiohttp_payloadfix.fixes import FIXES


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiohttp_payloadfix", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_every_fix_has_a_scenario() -> None:
    known = {f.id for f in FIXES}
    covered = {s.fix_id for s in SCENARIOS}
    assert covered <= known
    # cancelled-upload-close needs a cancellation in the middle of an upload
    # (tests/fixes/test_cancelled_upload_close.py); the redirect scenario
    # belongs to file-resend on 3.12 and to file-payload-reuse before.
    assert known - covered <= {"cancelled-upload-close", "file-resend"}


def test_status_lists_every_fix() -> None:
    proc = _run("--json")
    assert proc.returncode == 0, proc.stderr
    status: Dict[str, Any] = json.loads(proc.stdout)
    assert [f["id"] for f in status["fixes"]] == [f.id for f in FIXES]
    table = _run()
    assert table.returncode == 0, table.stderr
    for fix in FIXES:
        assert fix.id in table.stdout


def test_check_compare_shows_each_active_fix_working() -> None:
    proc = _run("check", "--compare", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report: Dict[str, Any] = json.loads(proc.stdout)
    assert report["ok"] is True
    checks: List[Dict[str, Any]] = report["checks"]
    active = [c for c in checks if c["active"]]
    applied = {f["id"] for f in report["status"]["fixes"] if f["applied"]}
    assert applied - {c["fix"] for c in active} <= {"cancelled-upload-close"}
    for check in active:
        assert check["patched"]["ok"], check
        # The same scenario was run with the fixes reverted.
        assert "unpatched" in check, check
    if applied:
        # It can fail: with the fixes reverted, the bugs show.
        broken = {c["fix"] for c in active if not c["unpatched"]["ok"]}
        assert broken
        # Bugs no release up to 3.12 fixes, where they are patched.
        for fix_id in ("short-body-error", "expect-continue-close"):
            if fix_id in applied:
                assert fix_id in broken
        text = _run("check", "--compare")
        assert text.returncode == 0, text.stdout + text.stderr
        assert "hangs" in text.stdout or "short-body-error" not in applied
