"""Conveyor: durable, fair, multi-tenant workflow execution on BullMQ/Redis."""

import sys as _sys

__version__ = "0.1.0"

# httpx's command-line client (``httpx._main``) is imported by ``import httpx`` whenever click
# and rich are installed, and with them pygments: ~5 MB in every process, for a CLI Conveyor
# never runs. Marking it absent makes httpx define its stub ``httpx.main`` instead; nothing
# else of httpx changes (``tests/test_footprint.py``).
_sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
