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
``{prefix}:conveyor:limits:leases:<tenant>``   sorted set lease id (job id) → expiry ms
``{prefix}:conveyor:limits:parked:<tenant>``   sorted set ``<queue>|<job id>`` → parked at ms
``{prefix}:conveyor:limits:bucket:<tenant>``   hash ``tat`` and ``r:<job id>`` (start rate)
``{prefix}:conveyor:limits:caps``              hash tenant → its cap (last acquire's)
``{prefix}:conveyor:limits:waiting``           set of tenants with parked jobs
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
* the rest (heartbeats, metrics, leader locks, tenant limits) is ``{prefix}:{conveyor}:…``:
  one slot, so the heartbeat index can ``MGET`` the processes' documents and a limits script
  can touch the shared ``caps``/``waiting`` keys with any tenant's keys — the renew and sweep
  scripts touch several tenants' keys in one call (the limits keys, few and small, all live
  on that slot's master).

:func:`script_keys` lists, for every script and transaction, the keys it touches together
(``tests/redis_cluster/test_settings_keys.py`` asserts each list is one slot).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    prefix: str,
    queue: str,
    *,
    cluster: bool,
    job_ids: tuple[str, ...] = ("1", "2"),
    tenants: tuple[str, ...] = ("tenant-a", "tenant-b", "tenant-c"),
) -> dict[str, list[str]]:
    """Every group of keys one script, transaction or multi-key command touches together
    (``queue``: an execution queue; ``tenants``: those one limits call names), by what
    touches them. On Redis Cluster each group must be one slot; the BullMQ scripts run in the
    same transaction as the count script touch only ``{prefix}:{<queue>}:*`` keys."""
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
        "limits acquire script": limit_acquire_keys(prefix, tenants[0], cluster=cluster),
        "limits renew script (several tenants)": limit_renew_keys(prefix, tenants,
                                                                  cluster=cluster),
        "limits release script": limit_release_keys(prefix, tenants[0], cluster=cluster),
        "limits sweep script (several tenants)": limit_sweep_keys(prefix, tenants,
                                                                  cluster=cluster),
    }  # fmt: skip


# -- tenant limits (cluster-wide concurrency, start rate) ---------------------------------------
def limit_leases(prefix: str, tenant: str, *, cluster: bool = False) -> str:
    """Sorted set of one tenant's running executions: lease id (the job id) -> expiry (ms)."""
    return own(prefix, "limits", "leases", tenant, cluster=cluster)


def limit_parked(prefix: str, tenant: str, *, cluster: bool = False) -> str:
    """Sorted set of one tenant's jobs parked at its cap: ``<queue>|<job id>`` -> parked at."""
    return own(prefix, "limits", "parked", tenant, cluster=cluster)


def limit_bucket(prefix: str, tenant: str, *, cluster: bool = False) -> str:
    """Hash of one tenant's start rate: ``tat`` (the next start's theoretical time, ms) and
    ``r:<job id>`` (a start time reserved for a parked job)."""
    return own(prefix, "limits", "bucket", tenant, cluster=cluster)


def limit_caps(prefix: str, *, cluster: bool = False) -> str:
    """Hash tenant -> the cap its last acquire used (read by releases and sweeps)."""
    return own(prefix, "limits", "caps", cluster=cluster)


def limit_waiting(prefix: str, *, cluster: bool = False) -> str:
    """Set of tenants that have parked jobs (what a sweep looks at)."""
    return own(prefix, "limits", "waiting", cluster=cluster)


def limit_acquire_keys(prefix: str, tenant: str, *, cluster: bool = False) -> list[str]:
    """KEYS of :data:`LIMIT_ACQUIRE_SCRIPT` for ``tenant``."""
    return [
        limit_leases(prefix, tenant, cluster=cluster),
        limit_parked(prefix, tenant, cluster=cluster),
        limit_bucket(prefix, tenant, cluster=cluster),
        limit_caps(prefix, cluster=cluster),
        limit_waiting(prefix, cluster=cluster),
    ]


def limit_renew_keys(prefix: str, tenants: Sequence[str], *, cluster: bool = False) -> list[str]:
    """KEYS of :data:`LIMIT_RENEW_SCRIPT`: the lease set of each lease's tenant (several
    tenants in one call)."""
    return [limit_leases(prefix, tenant, cluster=cluster) for tenant in tenants]


def limit_release_keys(prefix: str, tenant: str, *, cluster: bool = False) -> list[str]:
    """KEYS of :data:`LIMIT_RELEASE_SCRIPT` for ``tenant``."""
    return [
        limit_leases(prefix, tenant, cluster=cluster),
        limit_parked(prefix, tenant, cluster=cluster),
        limit_caps(prefix, cluster=cluster),
        limit_waiting(prefix, cluster=cluster),
    ]


def limit_sweep_keys(prefix: str, tenants: Sequence[str], *, cluster: bool = False) -> list[str]:
    """KEYS of :data:`LIMIT_SWEEP_SCRIPT`: caps, waiting, then each tenant's leases and parked."""
    names = [limit_caps(prefix, cluster=cluster), limit_waiting(prefix, cluster=cluster)]
    for tenant in tenants:
        names += [
            limit_leases(prefix, tenant, cluster=cluster),
            limit_parked(prefix, tenant, cluster=cluster),
        ]
    return names


# Every limits script takes "now" (ms) as an argument for tests; "" reads Redis's clock (TIME),
# so all workers share one clock. Lua numbers go to Redis as "%.14g": times are formatted
# explicitly ("%.3f") so they keep their precision.
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(x) return string.format('%.3f', x) end
"""

# KEYS[1] leases, KEYS[2] parked, KEYS[3] bucket, KEYS[4] caps, KEYS[5] waiting.
# ARGV[1] now ("" = TIME), ARGV[2] tenant, ARGV[3] lease id (job id), ARGV[4] parked member,
# ARGV[5] cap (0 = none), ARGV[6] lease ttl ms, ARGV[7] rate per second (0 = none),
# ARGV[8] burst, ARGV[9] longest reservation ms, ARGV[10] parked set ttl ms, ARGV[11] slack ms,
# ARGV[12] a lease of the same tenant to drop first ("" = none: a run of this process that just
# ended, whose release had not been sent yet — its slot goes to this job), ARGV[13] the lease's
# member ("" = the job id; a worker names each lease it takes apart, so a job that comes back
# never finds a lease of its earlier run passed on to another run), ARGV[14] "1": a hand-off —
# the slot of ARGV[12] (passed from run to run long enough) goes to the tenant's parked jobs
# first: this job takes a slot only if the leases and the other parked jobs leave one free.
# Returns {1} (started: lease taken, token used) or {0, reason, parked count, wait ms, ...}:
#   "concurrency": at the cap; the job is in the parked set, wait = the first lease's expiry;
#   when ARGV[12] was dropped, the members of the parked jobs popped into the slots it freed
#   follow (oldest first; never this job's own): the caller promotes them — popped here, in
#   the script that freed the slot, so no acquire can take it between a release and the pop;
#   "rate": wait = until its reserved start (a reservation is kept for the job id), or, beyond
#   the longest reservation, until it may try again (no reservation).
LIMIT_ACQUIRE_SCRIPT = (
    _NOW
    + """
local cap, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local lease = ARGV[13]
if not lease or lease == '' then lease = ARGV[3] end
if ARGV[12] ~= '' then redis.call('ZREM', KEYS[1], ARGV[12]) end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local held = redis.call('ZCARD', KEYS[1])
  local ahead = 0
  if ARGV[14] == '1' then
    ahead = redis.call('ZCARD', KEYS[2])
    if redis.call('ZSCORE', KEYS[2], ARGV[4]) then ahead = ahead - 1 end
  end
  if not redis.call('ZSCORE', KEYS[1], lease) and held + ahead >= cap then
    local out = {0, 'concurrency', 0, 0}
    if ARGV[12] ~= '' and held < cap then
      local heads = redis.call('ZRANGE', KEYS[2], 0, cap - held)
      for _, member in ipairs(heads) do
        if member ~= ARGV[4] and #out - 4 < cap - held then
          redis.call('ZREM', KEYS[2], member)
          out[#out + 1] = member
        end
      end
    end
    redis.call('ZADD', KEYS[2], 'NX', fmt(now), ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[10])
    redis.call('HSET', KEYS[4], ARGV[2], cap)
    redis.call('SADD', KEYS[5], ARGV[2])
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if first[2] then out[4] = math.max(0, math.ceil(tonumber(first[2]) - now)) end
    out[3] = redis.call('ZCARD', KEYS[2])
    return out
  end
end
local rate = tonumber(ARGV[7])
if rate > 0 then
  local field = 'r:' .. ARGV[3]
  local reserved = tonumber(redis.call('HGET', KEYS[3], field))
  if reserved then
    if reserved > now + tonumber(ARGV[11]) then
      return {0, 'rate', 0, math.ceil(reserved - now)}
    end
    redis.call('HDEL', KEYS[3], field)
  else
    local interval = 1000 / rate
    local tat = tonumber(redis.call('HGET', KEYS[3], 'tat')) or now
    if tat < now then tat = now end
    local at = tat - (tonumber(ARGV[8]) - 1) * interval
    local keep = math.ceil(tat + interval - now) + 3600000
    if at > now then
      if at - now > tonumber(ARGV[9]) then
        return {0, 'rate', 0, tonumber(ARGV[9])}
      end
      redis.call('HSET', KEYS[3], 'tat', fmt(tat + interval), field, fmt(at))
      redis.call('PEXPIRE', KEYS[3], keep)
      return {0, 'rate', 0, math.ceil(at - now)}
    end
    redis.call('HSET', KEYS[3], 'tat', fmt(tat + interval))
    redis.call('PEXPIRE', KEYS[3], keep)
  end
end
if cap > 0 then
  redis.call('ZADD', KEYS[1], fmt(now + ttl), lease)
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  redis.call('HSET', KEYS[4], ARGV[2], cap)
  if redis.call('ZREM', KEYS[2], ARGV[4]) == 1 and redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('SREM', KEYS[5], ARGV[2])
  end
end
return {1}
"""
)

# KEYS[1] leases of lease 1, KEYS[2] of lease 2, ... ; ARGV[1] now, ARGV[2] ttl ms,
# ARGV[3..] lease ids. Extends each lease; a lease that expired (purged or not) is added
# again, since its execution does run. Returns the 1-based indexes of those re-added.
LIMIT_RENEW_SCRIPT = (
    _NOW
    + """
local ttl = tonumber(ARGV[2])
local lost = {}
for i = 1, #KEYS do
  local score = redis.call('ZSCORE', KEYS[i], ARGV[i + 2])
  if not score or tonumber(score) <= now then lost[#lost + 1] = i end
  redis.call('ZADD', KEYS[i], fmt(now + ttl), ARGV[i + 2])
  redis.call('PEXPIRE', KEYS[i], 2 * ttl)
end
return lost
"""
)

# Shared by release and sweep: purge the expired leases of one tenant, pop as many parked jobs as
# it has free slots; forget the tenant in the waiting set once nothing is parked.
_POP = """
local function pop(leases, parked, caps, waiting, tenant, out)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  local cap = tonumber(redis.call('HGET', caps, tenant)) or 0
  local free = cap - redis.call('ZCARD', leases)
  if free > 0 then
    local popped = redis.call('ZPOPMIN', parked, free)
    for i = 1, #popped, 2 do out[#out + 1] = popped[i] end
  end
  if redis.call('ZCARD', parked) == 0 then
    redis.call('SREM', waiting, tenant)
    return nil
  end
  local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return nil
end
"""

# KEYS[1] leases, KEYS[2] parked, KEYS[3] caps, KEYS[4] waiting; ARGV[1] now, ARGV[2] tenant,
# ARGV[3] lease id ("" = none). Drops the lease; returns the parked members to promote now.
LIMIT_RELEASE_SCRIPT = (
    _NOW
    + _POP
    + """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[1], ARGV[3]) end
local out = {}
pop(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], out)
return out
"""
)

# KEYS: caps, waiting, then leases and parked of each tenant; ARGV[1] now, ARGV[2..] tenants.
# Frees the slots of crashed workers (expired leases) and pops parked jobs into them. Returns
# {ms until the earliest lease expiry among tenants still waiting (-1: none), members...}.
LIMIT_SWEEP_SCRIPT = (
    _NOW
    + _POP
    + """
local out = {}
local earliest = nil
for i = 2, #ARGV do
  local k = 3 + (i - 2) * 2
  local nxt = pop(KEYS[k], KEYS[k + 1], KEYS[1], KEYS[2], ARGV[i], out)
  if nxt and (not earliest or nxt < earliest) then earliest = nxt end
end
local wait = -1
if earliest then wait = math.max(0, math.ceil(earliest - now)) end
table.insert(out, 1, wait)
return out
"""
)
