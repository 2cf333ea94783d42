"""The bullmq internals Conveyor relies on are all there, with the shape it uses.

``conveyor.queue.bullmq.compat`` is the only module that reaches inside bullmq; its
``RELIED_ON`` list names every internal attribute and method it uses. A bullmq upgrade that
removes or reshapes one fails here, with the attribute named, instead of somewhere at run time.
"""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

import pytest

from conveyor.queue.bullmq import compat

SRC = Path(compat.__file__).resolve().parents[2]


def test_every_internal_relied_on_is_there() -> None:
    problems = compat.missing_internals()
    assert not problems, (
        "bullmq changed under conveyor.queue.bullmq.compat — adapt compat.py (and the pin in "
        "pyproject.toml) before upgrading:\n  " + "\n  ".join(problems)
    )


def test_the_check_notices_a_missing_or_reshaped_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    relied = (
        *compat.RELIED_ON,
        compat.Internal("Worker", "noSuchMethod", ()),
        compat.Internal("Worker", "moveToActive", ("job_token",)),
        compat.Internal("Worker", "noSuchAttribute"),
        compat.Internal("NoSuchClass", "x"),
    )
    monkeypatch.setattr(compat, "RELIED_ON", relied)
    problems = compat.missing_internals()
    assert len(problems) == 4, problems
    assert any("Worker.noSuchMethod is gone" in p for p in problems)
    assert any("Worker.moveToActive takes (token" in p for p in problems)
    assert any("Worker.noSuchAttribute is no longer set" in p for p in problems)
    assert any("NoSuchClass is gone" in p for p in problems)


def test_bullmq_is_pinned_to_the_version_checked() -> None:
    """``pyproject.toml`` pins bullmq exactly: an upgrade is a deliberate change of the pin."""
    pyproject = (SRC.parents[1] / "pyproject.toml").read_text()
    pin = f'"bullmq=={version("bullmq")}"'
    assert pin in pyproject, f"pyproject.toml should pin {pin}"


INTERNAL_ATTRIBUTES = {
    "backend",
    "lockManager",
    "stalledCheckTimer",
    "blockUntil",
    "forceClosing",
    "nextJobFromJobData",
    "_ensure_client_names",
    "jobsOpts",
    "blocking_connection",
    "extendLocks",
    "_dispatch_entry",
    "bclient",
    "blockingRedisConnection",
}


def test_no_other_module_touches_bullmqs_internals() -> None:
    """Outside ``compat.py`` no Conveyor module names one of bullmq's internal attributes."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "compat.py" and path.parent.name == "bullmq":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRIBUTES:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
    assert not offenders, "bullmq internals used outside compat.py: " + ", ".join(offenders)
