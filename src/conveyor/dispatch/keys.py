"""Conveyor's Redis layout: every key name and Lua script Conveyor itself writes, in one place.

BullMQ owns ``{prefix}:<queue>:*`` (its queues); everything of Conveyor's own lives under
``{prefix}:conveyor:``. ``prefix`` is ``QUEUE_PREFIX`` (default ``bull``; on Redis Cluster a
hash tag such as ``{conveyor}`` keeps each queue's keys in one slot). All of it is small and
rebuildable: losing it loses no execution (the database is the source of truth).

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
"""

from __future__ import annotations

NAMESPACE = "conveyor"
"""Second segment of every Conveyor key (BullMQ queue names never equal it)."""


def own(prefix: str, *parts: str) -> str:
    """``{prefix}:conveyor:{parts...}``."""
    return ":".join((prefix, NAMESPACE, *parts))


# -- BullMQ's keys that Conveyor reads or writes next to BullMQ ------------------------------
def job(prefix: str, queue: str, job_id: str) -> str:
    """BullMQ's hash of one job (its existence means "this job id was added")."""
    return f"{prefix}:{queue}:{job_id}"


def events(prefix: str, queue: str) -> str:
    """BullMQ's events stream of one queue (capped at ``QUEUE_EVENTS_MAX_LEN``)."""
    return f"{prefix}:{queue}:events"


def backlog(prefix: str, queue: str) -> list[str]:
    """BullMQ's lists/sets of jobs not started yet: wait, paused, prioritized, delayed."""
    base = f"{prefix}:{queue}"
    return [f"{base}:wait", f"{base}:paused", f"{base}:prioritized", f"{base}:delayed"]


# -- tenant fairness --------------------------------------------------------------------------
def fair(prefix: str, queue: str) -> str:
    """Hash ``tenant -> pending jobs`` of one execution queue (approximate)."""
    return own(prefix, "fair", queue)


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
def process(prefix: str, process_id: str) -> str:
    """One process's heartbeat document."""
    return own(prefix, "process", process_id)


def processes(prefix: str) -> str:
    """Sorted set of live process ids, scored by their last beat (ms)."""
    return own(prefix, "processes")


# -- metrics ------------------------------------------------------------------------------------
def metrics_counters(prefix: str) -> str:
    return own(prefix, "metrics", "counters")


def metrics_gauges(prefix: str) -> str:
    return own(prefix, "metrics", "gauges")


def metrics_histogram(prefix: str, name: str) -> str:
    return own(prefix, "metrics", "hist", name)


# -- leader locks (Redis strategy) --------------------------------------------------------------
def leader(prefix: str, role: str) -> str:
    """The leader lock of ``role`` (``scheduler``; ``timers`` on SQLite)."""
    return own(prefix, role, "leader")


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
