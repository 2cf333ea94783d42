"""Plain-text rendering of the admin status document (``GET /api/admin/workers/status``) and
of the storage document (``GET /api/admin/storage``).

Pure functions from the JSON document to lines of text; they tolerate absent sections (an API
older or newer than this client) and show ``-`` for missing values. Ages are computed against
the document's own ``timestamp`` (the server's clock), not the local one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from conveyor.runtime import TIMER_ROLES

_QUEUE_PREFIX = "workflow.execute."
_FIRST_COUNTS = ("waiting", "active")
_LAST_COUNTS = ("total",)
_FLAGS = ("isPaused",)
"""Entries of a queue's depth that are not counts (shown in the REGION cell instead)."""


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 string or a number of epoch milliseconds as an aware datetime."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000.0, UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _duration(seconds: float) -> str:
    s = round(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def age(value: Any, now: datetime | None) -> str:
    """``3s ago`` / ``in 4m05s`` for a timestamp relative to ``now``; ``-`` when unknown."""
    when = parse_time(value)
    if when is None or now is None:
        return "-"
    delta = (now - when).total_seconds()
    if abs(delta) < 0.5:
        return "now"
    return f"{_duration(delta)} ago" if delta > 0 else f"in {_duration(delta)}"


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = ()
) -> list[str]:
    """Columns padded to their widest cell; columns in ``right`` (numbers) right-aligned."""
    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    aligned = set(right)

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in aligned else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(list(headers)), *(line(r) for r in body)]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first(doc: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if doc.get(key) is not None:
            return doc[key]
    return None


def queue_rows(
    depths: Mapping[str, Any], consumers: Sequence[Any] = ()
) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the queue-depth table (one row per queue, sorted).

    ``consumers`` is the document's ``regions`` list (``{queue, workers, status}`` per queue):
    when present, two columns say how many live workers consume each queue and whether it is
    ``consumed``, ``idle``, ``unconsumed`` (jobs waiting, nobody consuming) or ``paused``; a
    paused queue says ``(PAUSED)`` after its region.
    """
    extra = sorted(
        {k for counts in depths.values() for k in _dict(counts)}
        - {*_FIRST_COUNTS, *_LAST_COUNTS, *_FLAGS}
    )
    columns = [*_FIRST_COUNTS, *extra, *_LAST_COUNTS]
    by_queue = {str(c.get("queue")): c for c in consumers if isinstance(c, dict)}
    headers = ["QUEUE", "REGION", *(c.upper() for c in columns)]
    if by_queue:
        headers += ["WORKERS", "CONSUMERS"]
    rows = []
    for name in sorted(set(depths) | set(by_queue)):
        counts = _dict(depths.get(name))
        region = name.removeprefix(_QUEUE_PREFIX) if name.startswith(_QUEUE_PREFIX) else "-"
        if counts.get("isPaused"):
            region += " (PAUSED)"
        row = [name, region, *(counts.get(c) for c in columns)]
        if by_queue:
            consumer = _dict(by_queue.get(name))
            row += [consumer.get("workers"), consumer.get("status")]
        rows.append(row)
    return headers, rows


def _role_detail(proc: Mapping[str, Any], now: datetime | None) -> str:
    role = proc.get("role")
    parts: list[str] = []
    if role == "scheduler":
        held = proc.get("lockHeld")
        parts.append("lock holder" if held else "standby" if held is not None else "")
        if proc.get("lastTick") is not None:
            parts.append(f"last tick {age(proc['lastTick'], now)}")
    elif role in TIMER_ROLES:
        if proc.get("nextDueAt") is not None:
            parts.append(f"next due {age(proc['nextDueAt'], now)}")
        if proc.get("backlog") is not None:
            parts.append(f"backlog {proc['backlog']}")
    elif proc.get("jobsDone") is not None or proc.get("jobsFailed") is not None:
        parts.append(f"done {cell(proc.get('jobsDone'))}, failed {cell(proc.get('jobsFailed'))}")
    if proc.get("lagMs") is not None:
        parts.append(f"lag {cell(proc['lagMs'])}ms")
    return ", ".join(p for p in parts if p)


def process_rows(processes: Iterable[Mapping[str, Any]], now: datetime | None) -> list[list[Any]]:
    rows = []
    for proc in processes:
        active = proc.get("activeJobs")
        concurrency = proc.get("concurrency")
        slots = f"{cell(active)}/{cell(concurrency)}" if concurrency is not None else active
        rows.append([
            proc.get("role"), proc.get("regions") or proc.get("region"), proc.get("pid"),
            proc.get("host"),
            slots, age(proc.get("lastHeartbeat"), now), age(proc.get("startedAt"), now),
            _role_detail(proc, now),
        ])  # fmt: skip
    rows.sort(key=lambda r: (cell(r[0]), cell(r[3]), cell(r[2])))
    return rows


PROCESS_HEADERS = ("ROLE", "REGIONS", "PID", "HOST", "ACTIVE", "HEARTBEAT", "STARTED", "DETAIL")


def _processes(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    procs = _first(data, "processes", "workers")
    if isinstance(procs, dict):  # {"worker": [...], ...} or {id: doc}
        procs = [p for v in procs.values() for p in (v if isinstance(v, list) else [v])]
    return [p for p in procs or [] if isinstance(p, dict)]


def _scheduler_lines(data: Mapping[str, Any], now: datetime | None) -> list[str]:
    sched = _dict(data.get("scheduler"))
    lock = _dict(sched.get("lock"))
    holder = _first(sched, "lockHolder", "lock_holder") or _first(lock, "holder", "owner", "id")
    if isinstance(holder, dict):
        holder = holder.get("id") or holder.get("host")
    if not holder:  # fall back on the heartbeats: the scheduler that says it holds the lock
        holder = next(
            (
                p.get("id")
                for p in _processes(data)
                if p.get("role") == "scheduler" and p.get("lockHeld")
            ),
            None,
        )
    rows = [
        ["strategy", _first(sched, "preferredStrategy", "strategy")],
        ["redis", _dict(sched.get("redis")).get("status")],
        ["lock holder", holder or ("none" if sched else None)],
        ["last tick", age(_first(sched, "lastTick", "lastTickAt"), now)],
    ]
    if sched.get("lagMs") is not None:
        rows.append(["lag", f"{cell(sched['lagMs'])}ms"])
    if sched.get("ticksInWindow") is not None:
        window = sched.get("windowMs") or sched.get("lookaheadMs")
        suffix = f" (next {cell(window)}ms)" if window is not None else ""
        rows.append(["in window", f"{cell(sched['ticksInWindow'])}{suffix}"])
    if sched.get("misfiresPerMinute") is not None:
        rows.append(["misfires/min", sched["misfiresPerMinute"]])
    return ["SCHEDULER", *(f"  {k:<12} {cell(v)}" for k, v in rows)]


def _timer_lines(data: Mapping[str, Any], now: datetime | None) -> list[str]:
    timers = _dict(_first(data, "timers", "timerDispatcher"))
    if not timers:  # fall back on a timer dispatcher's heartbeat
        timers = next((p for p in _processes(data) if p.get("role") in TIMER_ROLES), {})
    if not timers:
        return ["TIMERS", "  -"]
    rows = [
        ["next due", _next_due(timers, now)],
        ["backlog", _first(timers, "backlog", "due", "overdue")],
    ]
    if timers.get("lagMs") is not None:
        rows.append(["lag", f"{cell(timers['lagMs'])}ms"])
    return ["TIMERS", *(f"  {k:<12} {cell(v)}" for k, v in rows)]


def _next_due(timers: Mapping[str, Any], now: datetime | None) -> str:
    raw = _first(timers, "nextDueAt", "nextDue")
    if isinstance(raw, dict):
        raw = _first(raw, "dueAt", "fireAt", "at")
    when = parse_time(raw)
    if when is None:
        return "none"
    return f"{when.isoformat(timespec='seconds')} ({age(raw, now)})"


def redis_line(queue: Mapping[str, Any]) -> str | None:
    """``redis master 10.0.0.5:6379 | sentinel main: 3/3 answering, quorum 2 ok``; ``None``
    for a document without the address (an older API, or the in-memory driver)."""
    address = queue.get("address")
    view = _dict(queue.get("sentinel"))
    cluster = _dict(queue.get("cluster"))
    if cluster:
        masters = cluster.get("masters") or []
        line = (
            f"redis cluster {cell(cluster.get('state'))}: {len(masters)} masters, "
            f"{cell(cluster.get('replicas'))} replicas, {cell(cluster.get('knownNodes'))} nodes "
            f"known, {cell(cluster.get('slotsOk'))}/16384 slots served"
        )
        errors = cluster.get("errors") or []
        return line + (f" | {errors[0]}" if errors else "")
    if not address and not view:
        return None
    line = f"redis master {cell(address)}"
    if view:
        quorum = "ok" if view.get("quorumOk") else "NOT REACHABLE"
        line += (
            f" | sentinel {cell(view.get('master'))}: {cell(view.get('reachable'))}/"
            f"{cell(view.get('sentinels'))} answering, quorum {cell(view.get('quorum'))} {quorum}"
        )
        if view.get("masterDown"):
            line += " | master seen down (failover under way?)"
    return line


def size(value: Any) -> str:
    """Bytes as ``812 B``, ``4.2 KB``, ``1.5 GB`` (powers of 1024); ``-`` when unknown."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(amount) < 1024 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return "-"  # unreachable


def _keep(value: Any) -> str:
    keep = _dict(value)
    if not keep:
        return "-"
    return f"{cell(keep.get('count'))} jobs/{_duration(float(keep.get('ageS') or 0))}"


def storage_lines(document: Mapping[str, Any] | None, note: str = "") -> list[str]:
    """The storage document as a section: tables, Redis and its queues, retention settings."""
    if not document:
        return ["STORAGE", f"  {note or '-'}"]
    data = _dict(document.get("data", document))
    now = parse_time(data.get("timestamp"))
    db, redis = _dict(data.get("database")), _dict(data.get("redis"))
    head = f"STORAGE  database {cell(db.get('dialect'))} {size(db.get('totalBytes'))}"
    if redis.get("status") == "ready":
        head += f" | redis {size(redis.get('usedMemory'))} used"
    else:
        head += f" | redis {cell(redis.get('status'))}"
    rows = [
        [t.get("name"), ("" if t.get("rowsExact", True) else "~") + cell(t.get("rows")),
         size(t.get("bytes")), age(t.get("oldest"), now)]
        for t in (x for x in db.get("tables") or [] if isinstance(x, dict))
    ]  # fmt: skip
    lines = [head, *table(["TABLE", "ROWS", "SIZE", "OLDEST"], rows, right=(1, 2))]
    queues = [q for q in redis.get("queues") or [] if isinstance(q, dict)]
    if queues:
        qrows = [[q.get("queue"), q.get("completed"), q.get("failed"), q.get("events")]
                 for q in queues]  # fmt: skip
        lines += ["", *table(["QUEUE", "KEPT COMPLETED", "KEPT FAILED", "EVENTS"], qrows,
                             right=(1, 2, 3))]  # fmt: skip
    ret = _dict(data.get("retention"))
    if ret:
        retention = _duration(float(ret.get("executionRetentionS") or 0))
        lines.append(
            f"retention {retention}, cap {cell(ret.get('maxPerTenant'))}, "
            f"{cell(ret.get('tenantsOverriding'))} tenant(s) override | queue keeps completed "
            f"{_keep(ret.get('queueKeepCompleted'))}, failed {_keep(ret.get('queueKeepFailed'))}"
            f" | events <= {cell(ret.get('queueEventsMaxLen'))}"
        )
    if note:
        lines.append(f"!! {note}")
    return lines


def render(
    document: Mapping[str, Any],
    *,
    source: str = "",
    storage: Mapping[str, Any] | None = None,
    storage_note: str = "",
) -> str:
    """The status document as text: header, queues, processes, scheduler, timers; then the
    storage document when given (or ``storage_note``: why it is not)."""
    data = _dict(document.get("data", document))
    now = parse_time(data.get("timestamp"))
    worker = _dict(data.get("executionWorker"))
    redis_status = _dict(_dict(data.get("scheduler")).get("redis")).get("status")
    head = f"Conveyor status{'  ' + source if source else ''}  at {cell(data.get('timestamp'))}"
    summary = (
        f"queue driver {cell(worker.get('queueDriver'))} | redis {cell(redis_status)}"
        f" | execution worker started {cell(worker.get('started'))}"
    )
    depths = _dict(_dict(worker.get("metrics")).get("queueDepths"))
    regions = data.get("regions")
    headers, rows = queue_rows(depths, regions if isinstance(regions, list) else ())
    errors = data["errors"] if isinstance(data.get("errors"), list) else []
    redis = redis_line(_dict(data.get("queue")))
    lines = [head, summary, *([redis] if redis else []), *(f"!! {e}" for e in errors)]
    lines += ["", "QUEUES"]
    numeric = range(2, len(headers) - (1 if "CONSUMERS" in headers else 0))
    lines += table(headers, rows, right=numeric) if rows else ["  (no queues)"]
    processes = _processes(data)
    lines += ["", f"PROCESSES ({len(processes)} live)"]
    if processes:
        lines += table(PROCESS_HEADERS, process_rows(processes, now), right=(2, 4))
    else:
        lines.append("  (no live process: is a worker running?)")
    lines += ["", *_scheduler_lines(data, now), "", *_timer_lines(data, now)]
    if storage is not None or storage_note:
        lines += ["", *storage_lines(storage, storage_note)]
    return "\n".join(lines) + "\n"
