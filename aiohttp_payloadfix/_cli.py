"""``python -m aiohttp_payloadfix [--json] [check [--compare]]``."""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence, Tuple

from . import _api
from ._check import SCENARIOS, Outcome, Scenario, run_checks

__all__ = ("main",)


def _table(rows: Sequence[Tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _header(status: _api.Status) -> str:
    return (
        f"aiohttp-payloadfix {status.version} on aiohttp {status.aiohttp_version},"
        f" Python {status.python_version}"
    )


def _print_status(as_json: bool) -> int:
    status = _api.status()
    if as_json:
        print(json.dumps(status.as_dict(), indent=2))
        return 0
    print(_header(status))
    rows: List[Tuple[str, ...]] = [
        ("fix", "state", "affected releases", "upstream", "why")
    ]
    for fix in status.fixes:
        rows.append((fix.id, fix.state, fix.releases, fix.upstream, fix.reason))
    print(_table(rows))
    if not status.supported:
        print(
            "\nThis aiohttp release is not supported (3.9.0 or newer):"
            " nothing is patched."
        )
    return 0


def _check(compare: bool, as_json: bool) -> int:
    status = _api.status()
    active = tuple(f.id for f in status.fixes if f.applied)
    patched = dict(_by_name(run_checks()))
    unpatched: Dict[str, Outcome] = {}
    if compare and active:
        _api.revert(active)
        try:
            unpatched = dict(_by_name(run_checks()))
        finally:
            _api.apply(active)
    failed = [
        s.name for s in SCENARIOS if s.fix_id in active and not patched[s.name].ok
    ]
    if as_json:
        print(
            json.dumps(
                {
                    "status": status.as_dict(),
                    "checks": [
                        {
                            "scenario": s.name,
                            "fix": s.fix_id,
                            "active": s.fix_id in active,
                            "patched": vars(patched[s.name]),
                            **(
                                {"unpatched": vars(unpatched[s.name])}
                                if s.name in unpatched
                                else {}
                            ),
                        }
                        for s in SCENARIOS
                    ],
                    "ok": not failed,
                },
                indent=2,
            )
        )
        return 1 if failed else 0
    print(_header(status))
    rows: List[Tuple[str, ...]] = [
        ("scenario", "fix", "unpatched", "patched", "")
        if compare
        else ("scenario", "fix", "result", "")
    ]
    for scenario in SCENARIOS:
        outcome = patched[scenario.name]
        if scenario.fix_id not in active:
            verdict = "untouched"
        else:
            verdict = "ok" if outcome.ok else "FAILED"
        row: Tuple[str, ...] = (scenario.name, scenario.fix_id)
        if compare:
            before = unpatched.get(scenario.name)
            row += (before.text if before else "(same)",)
        rows.append(row + (outcome.text, verdict))
    print(_table(rows))
    if not active:
        print("\nNo fix is active here: the installed aiohttp is left untouched.")
    if failed:
        print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def _by_name(results: List[Tuple[Scenario, Outcome]]) -> List[Tuple[str, Outcome]]:
    return [(s.name, o) for s, o in results]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aiohttp_payloadfix",
        description="Show which aiohttp request-body fixes are active,"
        " or test them live.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="run a live self-test on 127.0.0.1")
    check.add_argument(
        "--compare",
        action="store_true",
        help="run it with the fixes reverted too and show both columns",
    )
    check.add_argument("--json", action="store_true", dest="check_json")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.compare, args.json or args.check_json)
    return _print_status(args.json)
