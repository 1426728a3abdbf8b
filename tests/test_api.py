"""The public API: apply / revert / is_applied / status and the env opt-out.

Import-time behaviour runs in a subprocess (``sys.executable -c ...``), where
the classes can be snapshot before ``import aiohttp_payloadfix`` touches them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import aiohttp
import pytest
from aiohttp import client, client_reqrep, http_writer, payload

import aiohttp_payloadfix
from aiohttp_payloadfix import (
    FixStatus,
    PayloadFixWarning,
    Status,
    _api,
    apply,
    is_applied,
    revert,
    status,
)
from aiohttp_payloadfix._fix import AIOHTTP_VERSION, Fix
from aiohttp_payloadfix._ledger import LEDGER, MARKER, Patch
from aiohttp_payloadfix.fixes import FIXES

ROOT = Path(__file__).resolve().parent.parent
STATES = frozenset(
    {
        "applied",
        "not-needed",
        "unsupported",
        "disabled",
        "failed",
        "reverted",
        "available",
    }
)
FIX_IDS = tuple(fix.id for fix in FIXES)
PATCHES_SOMETHING = (3, 9, 0) <= AIOHTTP_VERSION < (3, 13, 0)
needs_affected_release = pytest.mark.skipif(
    not PATCHES_SOMETHING,
    reason=f"aiohttp {aiohttp.__version__} is patched by no fix",
)

# Every class a fix replaces something on, and their relatives: a stray write
# to any of them shows up in a snapshot comparison.
TOUCHED: Tuple[Type[Any], ...] = (
    client_reqrep.ClientRequest,
    client.ClientSession,
    payload.Payload,
    payload.BytesPayload,
    payload.IOBasePayload,
    payload.TextIOPayload,
    payload.BytesIOPayload,
    payload.BufferedReaderPayload,
    payload.StringIOPayload,
    payload.AsyncIterablePayload,
    http_writer.StreamWriter,
)

Snapshot = Dict[Type[Any], Dict[str, Any]]


def snapshot() -> Snapshot:
    return {cls: dict(vars(cls)) for cls in TOUCHED}


def changed(before: Snapshot) -> List[str]:
    """Attributes that are not the very objects recorded in ``before``."""
    out = []
    for cls, old in before.items():
        new = vars(cls)
        for name in sorted(set(old) | set(new)):
            if name not in old or name not in new or new[name] is not old[name]:
                out.append(f"{cls.__name__}.{name}")
    return out


def needed_ids() -> Tuple[str, ...]:
    return tuple(record.id for record in status().fixes if record.needed)


@pytest.fixture(autouse=True)
def restore_api_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Leave the process exactly as the test found it.

    Tests revert and apply at will; afterwards the replacements that were in
    place before (the same objects, not rebuilt ones) are put back together
    with the ledger's records, so a vars() snapshot taken by anyone around
    this test still matches.
    """
    monkeypatch.delenv(_api.ENV_DISABLE, raising=False)
    monkeypatch.setattr(_api, "_failed", dict(_api._failed))
    monkeypatch.setattr(_api, "_reverted", set(_api._reverted))
    monkeypatch.setattr(_api, "_warned", set(_api._warned))
    records = {fix_id: list(recs) for fix_id, recs in LEDGER._records.items()}
    order = list(LEDGER._order)
    before = snapshot()
    yield
    revert()
    for fix_id in order:
        for record in records[fix_id]:
            setattr(record.owner, record.name, record.replacement)
    LEDGER._records.update(records)
    LEDGER._order[:] = order
    assert changed(before) == []


# -- apply / revert ----------------------------------------------------------


def test_apply_is_idempotent() -> None:
    revert()
    first = apply()
    assert first == needed_ids()
    after_first = snapshot()
    assert apply() == first
    assert changed(after_first) == []


def test_apply_returns_active_ids_in_registry_order() -> None:
    revert()
    ids = apply()
    assert ids == tuple(i for i in FIX_IDS if i in ids)


def test_revert_restores_every_attribute_exactly() -> None:
    revert()
    pristine = snapshot()
    apply()
    written = changed(pristine)
    recorded = {
        f"{record.owner.__name__}.{record.name}"
        for records in LEDGER._records.values()
        for record in records
    }
    # Nothing is written to these classes except through the ledger.
    assert set(written) == recorded
    assert bool(written) == PATCHES_SOMETHING

    assert revert() == tuple(reversed(needed_ids()))
    assert changed(pristine) == []
    assert revert() == ()
    assert changed(pristine) == []


def test_revert_one_fix() -> None:
    revert()
    pristine = snapshot()
    apply()
    for fix_id in needed_ids():
        # A fix that needs one reverted before it is already held back.
        was_applied = is_applied(fix_id)
        assert revert([fix_id]) == ((fix_id,) if was_applied else ())
        assert not is_applied(fix_id)
        assert revert([fix_id]) == ()
    assert changed(pristine) == []


def test_apply_explicit_ids() -> None:
    revert()
    for fix_id in needed_ids():
        assert fix_id in apply([fix_id])
        assert is_applied(fix_id)


@pytest.mark.parametrize(
    "call",
    [
        lambda: apply(["no-such-fix"]),
        lambda: revert(["no-such-fix"]),
        lambda: is_applied("no-such-fix"),
    ],
    ids=["apply", "revert", "is_applied"],
)
def test_unknown_fix_id(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="unknown fix id 'no-such-fix'"):
        call()


# -- is_applied / status -----------------------------------------------------


def test_is_applied() -> None:
    revert()
    needed = needed_ids()
    assert is_applied() == (not needed)
    for fix_id in FIX_IDS:
        assert not is_applied(fix_id)
    if needed:
        apply(needed[:1])
        assert is_applied(needed[0])
        assert is_applied() == (len(needed) == 1)
    apply()
    assert is_applied()
    for fix_id in FIX_IDS:
        assert is_applied(fix_id) == (fix_id in needed)


def test_is_applied_ignores_fixes_disabled_by_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    revert()
    needed = needed_ids()
    apply([i for i in needed if i != FIX_IDS[0]])
    monkeypatch.setenv(_api.ENV_DISABLE, FIX_IDS[0])
    assert is_applied()
    monkeypatch.setenv(_api.ENV_DISABLE, "all")
    revert()
    assert is_applied()


def test_status_fields() -> None:
    result = status()
    assert isinstance(result, Status)
    assert result.aiohttp_version == aiohttp.__version__
    assert result.python_version == platform.python_version()
    assert result.supported is True
    assert result.version == aiohttp_payloadfix.__version__
    assert tuple(record.id for record in result.fixes) == FIX_IDS
    for record in result.fixes:
        assert isinstance(record, FixStatus)
        assert record.upstream and isinstance(record.upstream, str)
        assert record.summary and isinstance(record.summary, str)
        assert record.reason and isinstance(record.reason, str)
        assert isinstance(record.needed, bool)
        assert isinstance(record.applied, bool)
        assert record.state in STATES
    json.dumps(result.as_dict())


def test_status_follows_apply_and_revert() -> None:
    revert()
    apply()
    for record in status().fixes:
        assert record.applied == record.needed
        assert record.state == ("applied" if record.needed else "not-needed")
    revert()
    for record in status().fixes:
        assert record.applied is False
        assert record.state == ("reverted" if record.needed else "not-needed")
    apply()
    assert all(r.state != "reverted" for r in status().fixes)


def test_status_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    revert()
    monkeypatch.setattr(_api, "_reverted", set())
    monkeypatch.setenv(_api.ENV_DISABLE, "1")
    for record in status().fixes:
        assert record.state == ("disabled" if record.needed else "not-needed")


# -- a fix that cannot be applied ----------------------------------------------


def _fake_fix(
    fix_id: str,
    probe: Callable[[], Optional[str]],
    patches: Callable[[], Sequence[Patch]],
) -> Fix:
    return Fix(
        id=fix_id,
        upstream="nowhere#0",
        summary="a fix that goes wrong",
        affected=((3, 9, 0), None),
        probe=probe,
        patches=patches,
    )


def _broken_patches() -> Sequence[Patch]:
    raise RuntimeError("patches() exploded")


@needs_affected_release
def test_failing_fix_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _fake_fix("broken-fix", lambda: "needed", _broken_patches)
    monkeypatch.setattr(_api, "FIXES", (broken, *FIXES))
    revert()
    with pytest.warns(PayloadFixWarning, match="'broken-fix' not applied"):
        ids = apply()
    assert "broken-fix" not in ids
    assert ids == needed_ids()[1:]  # the real fixes still went in
    record = status().fixes[0]
    assert record.id == "broken-fix"
    assert record.state == "failed"
    assert record.applied is False
    assert "patches() exploded" in record.reason
    assert not is_applied()
    apply()  # warned once only: a second warning would fail this test


@needs_affected_release
def test_failing_fix_is_rolled_back_on_aiohttp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = client_reqrep.ClientRequest

    def passthrough(original: Callable[..., Any]) -> Callable[..., Any]:
        def replacement(self: Any, *args: Any, **kwargs: Any) -> Any:
            return original(self, *args, **kwargs)

        return replacement

    def half_done() -> Sequence[Patch]:
        return (
            Patch(request, "update_headers", passthrough),
            Patch(request, "no_such_method", passthrough),
        )

    broken = _fake_fix("half-done", lambda: "needed", half_done)
    monkeypatch.setattr(_api, "FIXES", (broken,))
    revert()
    pristine = snapshot()
    with pytest.warns(PayloadFixWarning, match="no_such_method"):
        assert apply() == ()
    assert changed(pristine) == []
    assert not hasattr(vars(request)["update_headers"], MARKER)
    assert status().fixes[0].state == "failed"


@needs_affected_release
def test_failing_probe_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe() -> Optional[str]:
        raise RuntimeError("probe exploded")

    broken = _fake_fix("broken-probe", probe, lambda: ())
    monkeypatch.setattr(_api, "FIXES", (broken,))
    with pytest.warns(PayloadFixWarning, match="broken-probe"):
        apply()
    assert status().fixes[0].state == "failed"


# -- import time, in a subprocess --------------------------------------------

_SCRIPT = """\
import json
import warnings

import aiohttp
from aiohttp import client, client_reqrep, http_writer, payload

{setup}

TOUCHED = (
    client_reqrep.ClientRequest,
    client.ClientSession,
    payload.Payload,
    payload.BytesPayload,
    payload.IOBasePayload,
    payload.TextIOPayload,
    payload.BytesIOPayload,
    payload.BufferedReaderPayload,
    payload.StringIOPayload,
    payload.AsyncIterablePayload,
    http_writer.StreamWriter,
)


def snapshot():
    return {{cls: dict(vars(cls)) for cls in TOUCHED}}


def changed(before):
    out = []
    for cls, old in before.items():
        new = vars(cls)
        for name in sorted(set(old) | set(new)):
            if name not in old or name not in new or new[name] is not old[name]:
                out.append(cls.__name__ + "." + name)
    return out


BEFORE = snapshot()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import aiohttp_payloadfix

    result = {{
        "changed_on_import": changed(BEFORE),
        "is_applied": aiohttp_payloadfix.is_applied(),
        "status": aiohttp_payloadfix.status().as_dict(),
    }}
{body}
result["warnings"] = [
    str(w.message) for w in caught
    if issubclass(w.category, aiohttp_payloadfix.PayloadFixWarning)
]
print(json.dumps(result))
"""


def run_import(
    env: Optional[Dict[str, str]] = None, setup: str = "", body: str = ""
) -> Dict[str, Any]:
    """Import the package in a fresh interpreter; return what it observed."""
    script = _SCRIPT.format(
        setup=textwrap.dedent(setup),
        body=textwrap.indent(textwrap.dedent(body), "    "),
    )
    environ = dict(os.environ)
    environ.pop(_api.ENV_DISABLE, None)
    environ.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: Dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def fix_records(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {record["id"]: record for record in result["status"]["fixes"]}


def applied_ids(result: Dict[str, Any]) -> List[str]:
    return [r["id"] for r in result["status"]["fixes"] if r["applied"]]


def test_import_applies_what_is_needed() -> None:
    result = run_import()
    records = fix_records(result)
    needed = [i for i, r in records.items() if r["needed"]]
    assert applied_ids(result) == needed
    assert result["is_applied"] is True
    assert result["warnings"] == []
    assert bool(result["changed_on_import"]) == bool(needed)
    for record in records.values():
        assert record["state"] == ("applied" if record["needed"] else "not-needed")


def test_revert_after_import_restores_the_originals() -> None:
    result = run_import(
        body="""
        result["reverted"] = list(aiohttp_payloadfix.revert())
        result["after_revert"] = changed(BEFORE)
        result["revert_again"] = list(aiohttp_payloadfix.revert())
        result["reapplied"] = list(aiohttp_payloadfix.apply())
        aiohttp_payloadfix.revert()
        result["after_second_revert"] = changed(BEFORE)
        """
    )
    needed = [i for i, r in fix_records(result).items() if r["needed"]]
    assert result["reverted"] == list(reversed(needed))
    assert result["after_revert"] == []
    assert result["revert_again"] == []
    assert result["reapplied"] == needed
    assert result["after_second_revert"] == []
    assert result["warnings"] == []


@pytest.mark.parametrize("value", ["1", "true", "yes", "all", "TRUE", " Yes "])
def test_env_disables_everything(value: str) -> None:
    result = run_import(env={_api.ENV_DISABLE: value})
    assert result["changed_on_import"] == []
    assert applied_ids(result) == []
    assert result["is_applied"] is True  # nothing is both needed and enabled
    assert result["warnings"] == []
    for record in fix_records(result).values():
        assert record["state"] == ("disabled" if record["needed"] else "not-needed")


@pytest.mark.parametrize(
    "value",
    [
        "file-payload-reuse",
        "content-length-limit",
        " content-length-limit , file-payload-reuse ",
    ],
)
def test_env_skips_listed_fixes(value: str) -> None:
    skipped = {part.strip() for part in value.split(",")}
    result = run_import(env={_api.ENV_DISABLE: value})
    records = fix_records(result)
    needed = [i for i, r in records.items() if r["needed"]]
    # A fix that needs a skipped one is held back with it.
    held = {f.id for f in FIXES if skipped.intersection(f.requires)}
    assert applied_ids(result) == [i for i in needed if i not in skipped | held]
    for fix_id in held & set(needed):
        assert records[fix_id]["state"] == "disabled"
        assert "needs" in records[fix_id]["reason"]
    assert result["is_applied"] is True
    assert result["warnings"] == []
    for fix_id in skipped:
        expected = "disabled" if records[fix_id]["needed"] else "not-needed"
        assert records[fix_id]["state"] == expected


def test_env_unknown_id_warns_once() -> None:
    result = run_import(
        env={_api.ENV_DISABLE: "no-such-fix,content-length-limit"},
        body="""
        aiohttp_payloadfix.status()
        aiohttp_payloadfix.is_applied()
        """,
    )
    assert len(result["warnings"]) == 1
    assert "no-such-fix" in result["warnings"][0]
    assert "file-payload-reuse" in result["warnings"][0]  # lists the known ids
    records = fix_records(result)
    needed = [i for i, r in records.items() if r["needed"]]
    # The fixes that require the limit are held back with it.
    held = {f.id for f in FIXES if "content-length-limit" in f.requires}
    assert held
    assert applied_ids(result) == [
        i for i in needed if i != "content-length-limit" and i not in held
    ]
    assert {i: records[i]["state"] for i in held & set(needed)} == dict.fromkeys(
        held & set(needed), "disabled"
    )


@needs_affected_release
def test_import_survives_a_fix_that_cannot_be_applied() -> None:
    # Take away the target of content-length-limit's second patch: the import
    # must go on, report the fix failed, and undo its first patch.
    result = run_import(
        setup="""
        for klass in client_reqrep.ClientRequest.__mro__:
            if "write_bytes" in vars(klass):
                delattr(klass, "write_bytes")
        """
    )
    records = fix_records(result)
    failed = records["content-length-limit"]
    assert failed["state"] == "failed"
    assert failed["applied"] is False
    assert "write_bytes" in failed["reason"]
    # Every fix that touches write_bytes says so, once; content-length-limit too.
    assert all("write_bytes" in w for w in result["warnings"])
    assert any("content-length-limit" in w for w in result["warnings"])
    assert len(result["warnings"]) == len(set(result["warnings"]))
    assert result["is_applied"] is False
    assert not any(
        name.startswith(("ClientRequest.update_headers", "AsyncIterablePayload."))
        for name in result["changed_on_import"]
    )
    other = records["file-payload-reuse"]
    assert other["applied"] == other["needed"]


@pytest.mark.skipif(
    AIOHTTP_VERSION < (3, 13, 0),
    reason=f"aiohttp {aiohttp.__version__} is older than 3.13",
)
def test_import_changes_nothing_on_aiohttp_3_13_and_newer() -> None:
    result = run_import(
        body="""
        result["apply"] = list(aiohttp_payloadfix.apply())
        result["after_apply"] = changed(BEFORE)
        """
    )
    assert result["changed_on_import"] == []
    assert result["apply"] == []
    assert result["after_apply"] == []
    assert result["warnings"] == []
    assert result["status"]["supported"] is True
    for record in fix_records(result).values():
        assert record["needed"] is False
        assert record["applied"] is False
        assert record["state"] == "not-needed"
        assert "nothing is patched on 3.13 and newer" in record["reason"]
