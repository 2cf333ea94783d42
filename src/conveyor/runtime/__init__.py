"""What every Conveyor process runs on: the process life (:mod:`~conveyor.runtime.process`:
entry, event loop, signals, supervised loops, checked start, heartbeat loop, heap freeze), and
the status it publishes through Redis for the API and operators —
:mod:`~conveyor.runtime.heartbeat` (live processes) and :mod:`~conveyor.runtime.metrics`
(counters and histograms behind ``/metrics``, rendered by
:mod:`~conveyor.runtime.prometheus`, which only the API imports)."""

from conveyor.runtime.heartbeat import TIMER_ROLES, Heartbeat, list_processes
from conveyor.runtime.metrics import (
    MetricsPublisher,
    MetricsSnapshot,
    read_metrics,
)
from conveyor.runtime.process import (
    LoopDied,
    Supervisor,
    bounded,
    cancel_tasks,
    entry,
    freeze_startup_heap,
    heartbeat_loop,
    open_checked,
    run_loop,
    serve_checked,
)

__all__ = [
    "TIMER_ROLES",
    "Heartbeat",
    "LoopDied",
    "MetricsPublisher",
    "MetricsSnapshot",
    "Supervisor",
    "bounded",
    "cancel_tasks",
    "entry",
    "freeze_startup_heap",
    "heartbeat_loop",
    "list_processes",
    "open_checked",
    "read_metrics",
    "run_loop",
    "serve_checked",
]
