"""Conveyor's Redis layout: every key name and Lua script Conveyor itself writes, in one place.

BullMQ owns ``{prefix}:<queue>:*`` (its queues); everything of Conveyor's own lives under
``{prefix}:conveyor:``. ``prefix`` is ``QUEUE_PREFIX`` (default ``bull``; on Redis Cluster the
names get hash tags, below). All of it is small and rebuildable: losing it loses no execution (the database is the source of truth).

=============================================  ==============================================
key                                            what
=============================================  ==============================================
``{prefix}:conveyor:fair:<queue>``             hash tenant → pending jobs (fair priorities)
``{prefix}:conveyor:process:<id>``             one process's heartbeat (JSON, expires)
``{prefix}:conveyor:processes``                sorted set of live process ids by last beat
``{prefix}:conveyor:metrics:counters``         hash ``name|labels`` → count
``{prefix}:conveyor:metrics:gauges``           hash ``name`` → value, ``updated_at``
``{prefix}:conveyor:metrics:hist:<name>``      hash ``labels|le=…``/``sum``/``count``
``{prefix}:conveyor:<role>:leader``            leader lock (Redis strategy): owner token, PX
=============================================  ==============================================

On **Redis Cluster** (``QUEUE_REDIS_CLUSTER_NODES``) a Lua script, a ``MULTI`` and a multi-key
command may only touch keys of one hash slot, so the names carry hash tags (``{…}``: only the
part inside the braces is hashed) — in cluster mode only, single Redis and Sentinel keep the
names above:

* each queue is known to BullMQ as ``{<queue>}``: ``{prefix}:{<queue>}:*`` share the queue's
  slot, and different queues (regions) hash to different slots, so they spread over the shards;
* the fairness hash of a queue is ``{prefix}:conveyor:fair:{<queue>}``: in the queue's slot,
  since the count script runs in one transaction with BullMQ's add and the clamp reads the
  queue's backlog;
* the rest (heartbeats, metrics, leader locks) is ``{prefix}:{conveyor}:…``: one slot, so the
  heartbeat index can ``MGET`` the processes' documents.

:func:`script_keys` lists, for every script and transaction, the keys it touches together
(``tests/redis_cluster/test_keys.py`` asserts each list is one slot).
"""

from __future__ import annotations

from conveyor.queue import bull_name

NAMESPACE = "conveyor"
"""Second segment of every Conveyor key (BullMQ queue names never equal it)."""


def own(prefix: str, *parts: str, cluster: bool = False) -> str:
    """``{prefix}:conveyor:{parts...}`` (on Redis Cluster ``{prefix}:{conveyor}:…``: one slot)."""
    namespace = f"{{{NAMESPACE}}}" if cluster else NAMESPACE
    return ":".join((prefix, namespace, *parts))


# -- BullMQ's keys that Conveyor reads or writes next to BullMQ ------------------------------
def job(prefix: str, queue: str, job_id: str, *, cluster: bool = False) -> str:
    """BullMQ's hash of one job (its existence means "this job id was added")."""
    return f"{prefix}:{bull_name(queue, cluster)}:{job_id}"


def events(prefix: str, queue: str, *, cluster: bool = False) -> str:
    """BullMQ's events stream of one queue (capped at ``QUEUE_EVENTS_MAX_LEN``)."""
    return f"{prefix}:{bull_name(queue, cluster)}:events"


def backlog(prefix: str, queue: str, *, cluster: bool = False) -> list[str]:
    """BullMQ's lists/sets of jobs not started yet: wait, paused, prioritized, delayed."""
    base = f"{prefix}:{bull_name(queue, cluster)}"
    return [f"{base}:wait", f"{base}:paused", f"{base}:prioritized", f"{base}:delayed"]


# -- tenant fairness --------------------------------------------------------------------------
def fair(prefix: str, queue: str, *, cluster: bool = False) -> str:
    """Hash ``tenant -> pending jobs`` of one execution queue (approximate); on Redis Cluster
    in the queue's slot."""
    return own(prefix, "fair", bull_name(queue, cluster))


FAIR_TTL_MS = 24 * 3600 * 1000
"""The fairness hash expires after a day without enqueues (garbage collection only)."""

# KEYS[1] fairness hash, KEYS[2..n+1] BullMQ job hashes; ARGV[1] ttl ms, ARGV[2..n+1] tenants.
# Returns, per job, the tenant's new pending count, or 0 when the job id already exists.
COUNT_SCRIPT = """
local out = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    out[i - 1] = 0
  else
    out[i - 1] = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return out
"""

# KEYS[1] fairness hash; ARGV: tenant, count, tenant, count, ... Undo or consume counts.
DECREMENT_SCRIPT = """
for i = 1, #ARGV, 2 do
  local v = redis.call('HINCRBY', KEYS[1], ARGV[i], -tonumber(ARGV[i + 1]))
  if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 0
"""

# KEYS[1] fairness hash, KEYS[2] wait, KEYS[3] paused, KEYS[4] prioritized, KEYS[5] delayed.
# Clamp every tenant's counter to the queue's backlog; returns the backlog.
CLAMP_SCRIPT = """
local pending = redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3])
  + redis.call('ZCARD', KEYS[4]) + redis.call('ZCARD', KEYS[5])
if pending == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = tonumber(all[i + 1])
  if v <= 0 then
    redis.call('HDEL', KEYS[1], all[i])
  elseif v > pending then
    redis.call('HSET', KEYS[1], all[i], pending)
  end
end
return pending
"""


# -- process heartbeats -----------------------------------------------------------------------
def process(prefix: str, process_id: str, *, cluster: bool = False) -> str:
    """One process's heartbeat document."""
    return own(prefix, "process", process_id, cluster=cluster)


def processes(prefix: str, *, cluster: bool = False) -> str:
    """Sorted set of live process ids, scored by their last beat (ms)."""
    return own(prefix, "processes", cluster=cluster)


# -- metrics ------------------------------------------------------------------------------------
def metrics_counters(prefix: str, *, cluster: bool = False) -> str:
    return own(prefix, "metrics", "counters", cluster=cluster)


def metrics_gauges(prefix: str, *, cluster: bool = False) -> str:
    return own(prefix, "metrics", "gauges", cluster=cluster)


def metrics_histogram(prefix: str, name: str, *, cluster: bool = False) -> str:
    return own(prefix, "metrics", "hist", name, cluster=cluster)


# -- leader locks (Redis strategy) --------------------------------------------------------------
def leader(prefix: str, role: str, *, cluster: bool = False) -> str:
    """The leader lock of ``role`` (``scheduler``; ``timers`` on SQLite)."""
    return own(prefix, role, "leader", cluster=cluster)


# KEYS[1] lock; ARGV[1] owner token, ARGV[2] ttl ms. Extend only our own lock.
RENEW_LOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lock; ARGV[1] owner token. Delete only our own lock.
RELEASE_LOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# -- what is touched together -------------------------------------------------------------------
def script_keys(
    prefix: str, queue: str, *, cluster: bool, job_ids: tuple[str, ...] = ("1", "2")
) -> dict[str, list[str]]:
    """Every group of keys one script, transaction or multi-key command touches together
    (``queue``: an execution queue), by what touches them. On Redis Cluster each group must
    be one slot; the BullMQ scripts run in the same transaction as the count script touch
    only ``{prefix}:{<queue>}:*`` keys."""
    bull = f"{prefix}:{bull_name(queue, cluster)}"
    count = [fair(prefix, queue, cluster=cluster)]
    count += [job(prefix, queue, j, cluster=cluster) for j in job_ids]
    return {
        "count script + BullMQ add (one MULTI)": [*count, f"{bull}:wait", f"{bull}:meta",
                                                   f"{bull}:id", f"{bull}:events"],
        "decrement script": [fair(prefix, queue, cluster=cluster)],
        "clamp script": [fair(prefix, queue, cluster=cluster),
                         *backlog(prefix, queue, cluster=cluster)],
        "heartbeat MGET": [process(prefix, p, cluster=cluster) for p in ("a", "b")],
        "leader lock scripts": [leader(prefix, "scheduler", cluster=cluster)],
    }  # fmt: skip
