"""Redis Cluster without a cluster: the settings, and the key layout's hash slots.

On a cluster a Lua script, a ``MULTI`` or a multi-key command may only touch one slot;
``keys.script_keys`` lists every group of keys Conveyor touches together, and each group must
hash to one slot (``redis.cluster.key_slot``, the CRC16 Redis uses) — while different regional
queues hash to different slots, so they can live on different shards.
"""

from __future__ import annotations

import subprocess
import sys

import bullmq
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from conveyor.dispatch import keys
from conveyor.errors import ConfigError
from conveyor.queue import bull_name, execution_queue_name
from conveyor.queue.connection import location
from conveyor.settings import load_settings
from tests.conftest import REDIS_PORT
from tests.helpers import env_for, free_port


def test_cluster_nodes_are_parsed() -> None:
    s = load_settings(
        {"QUEUE_REDIS_CLUSTER_NODES": " 10.0.0.1:7000, redis-b.internal:7001,[::1]:7002 "}
    )
    assert s.queue_redis_cluster_nodes == (
        ("10.0.0.1", 7000), ("redis-b.internal", 7001), ("::1", 7002),
    )  # fmt: skip
    assert s.uses_cluster and not s.uses_sentinel
    assert location(s) == "redis+cluster://10.0.0.1:7000,redis-b.internal:7001,[::1]:7002"
    plain = load_settings({})
    assert plain.queue_redis_cluster_nodes == () and not plain.uses_cluster


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"QUEUE_REDIS_CLUSTER_NODES": "10.0.0.1:7000", "QUEUE_REDIS_SENTINELS": "10.0.0.2:26379",
             "QUEUE_REDIS_SENTINEL_MASTER": "main"},
            "QUEUE_REDIS_CLUSTER_NODES and QUEUE_REDIS_SENTINELS are both set",
        ),
        ({"QUEUE_REDIS_CLUSTER_NODES": "10.0.0.1"}, "write host:port"),
        ({"QUEUE_REDIS_CLUSTER_NODES": "10.0.0.1:70000"}, "not a number from 1 to 65535"),
        ({"QUEUE_REDIS_CLUSTER_NODES": "10.0.0.1:7000", "QUEUE_REDIS_DB": "2"}, "database 0"),
    ],
)  # fmt: skip
def test_bad_cluster_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    text = str(info.value)
    assert text.startswith("invalid setting QUEUE_REDIS_CLUSTER_NODES=") and message in text
    assert "\n" not in text


def test_cluster_and_sentinels_together_exit_2_with_one_line() -> None:
    env = env_for(
        QUEUE_REDIS_CLUSTER_NODES="127.0.0.1:7000",
        QUEUE_REDIS_SENTINELS="127.0.0.1:26379",
        QUEUE_REDIS_SENTINEL_MASTER="main",
    )
    proc = subprocess.run([sys.executable, "-m", "conveyor.cli", "check"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "QUEUE_REDIS_CLUSTER_NODES" in lines[0] and "QUEUE_REDIS_SENTINELS" in lines[0]
    assert "Traceback" not in proc.stderr


REGIONS = ("us", "eu", "ap", "sa")


@pytest.mark.parametrize("region", REGIONS)
def test_keys_touched_together_share_one_slot_on_a_cluster(region: str) -> None:
    queue = execution_queue_name(region)
    groups = keys.script_keys("bull", queue, cluster=True)
    for what, names in groups.items():
        slots = {key_slot(name.encode()) for name in names}
        assert len(slots) == 1, f"{what}: {names} hash to {slots}"
    # The limits scripts are listed, several tenants in one renew and one sweep.
    limits = [what for what in groups if what.startswith("limits ")]
    assert len(limits) == 4, list(groups)
    assert len(groups["limits renew script (several tenants)"]) == 3
    assert len(groups["limits sweep script (several tenants)"]) == 2 + 2 * 3
    # Without the hash tag the tenants' keys would spread: the test can fail.
    plain = keys.script_keys("bull", queue, cluster=False)["limits sweep script (several tenants)"]
    assert len({key_slot(name.encode()) for name in plain}) > 1
    # BullMQ's own keys of the queue (its scripts touch many at once) hash with the fair hash.
    bull = f"bull:{bull_name(queue, True)}"
    fair = keys.fair("bull", queue, cluster=True)
    for suffix in ("wait", "active", "meta", "events", "marker", "stalled", "id", "42", "42:lock"):
        assert key_slot(f"{bull}:{suffix}".encode()) == key_slot(fair.encode()), suffix


def test_regional_queues_spread_over_slots_of_different_shards() -> None:
    slots = {
        key_slot(keys.fair("bull", execution_queue_name(r), cluster=True).encode()) for r in REGIONS
    }
    assert len(slots) == len(REGIONS)
    # Three masters split the 16384 slots in thirds: us and eu land on different ones.
    shard = {r: key_slot(f"{{{execution_queue_name(r)}}}".encode()) * 3 // 16384 for r in REGIONS}
    assert len(set(shard.values())) > 1, shard
    # Conveyor's own keys (heartbeats, metrics, locks) share one slot of their own.
    own = [keys.process("bull", "a", cluster=True), keys.processes("bull", cluster=True),
           keys.metrics_counters("bull", cluster=True), keys.leader("bull", "scheduler", cluster=True),
           *keys.limit_acquire_keys("bull", "t1", cluster=True),
           *keys.limit_sweep_keys("bull", ["t1", "t2"], cluster=True)]  # fmt: skip
    assert len({key_slot(k.encode()) for k in own}) == 1


def test_single_redis_and_sentinel_keep_their_key_names() -> None:
    queue = execution_queue_name("us")
    assert bull_name(queue, False) == queue
    assert keys.fair("bull", queue) == f"bull:conveyor:fair:{queue}"
    assert keys.job("bull", queue, "7") == f"bull:{queue}:7"
    assert keys.process("bull", "p1") == "bull:conveyor:process:p1"
    assert keys.leader("bull", "scheduler") == "bull:conveyor:scheduler:leader"
    assert keys.fair("bull", queue, cluster=True) == "bull:conveyor:fair:{" + queue + "}"
    assert keys.job("bull", queue, "7", cluster=True) == "bull:{" + queue + "}:7"
    assert keys.process("bull", "p1", cluster=True) == "bull:{conveyor}:process:p1"
    # The tenant limits' keys: the same on single Redis and Sentinel, in {conveyor} on a cluster.
    assert keys.limit_acquire_keys("bull", "t1") == [
        "bull:conveyor:limits:leases:t1", "bull:conveyor:limits:parked:t1",
        "bull:conveyor:limits:bucket:t1", "bull:conveyor:limits:caps",
        "bull:conveyor:limits:waiting",
    ]  # fmt: skip
    assert keys.limit_acquire_keys("bull", "t1", cluster=True) == [
        "bull:{conveyor}:limits:leases:t1", "bull:{conveyor}:limits:parked:t1",
        "bull:{conveyor}:limits:bucket:t1", "bull:{conveyor}:limits:caps",
        "bull:{conveyor}:limits:waiting",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("nodes", "says"),
    [
        (f"127.0.0.1:{free_port()}", "no node of QUEUE_REDIS_CLUSTER_NODES answered"),
        (f"127.0.0.1:{REDIS_PORT}", "is not a cluster"),  # the tests' Redis: no cluster mode
    ],
    ids=["unreachable", "not-a-cluster"],
)
def test_check_names_an_unreachable_cluster_or_a_redis_without_cluster_mode(
    nodes: str, says: str
) -> None:
    env = env_for(QUEUE_REDIS_CLUSTER_NODES=nodes, QUEUE_REDIS_CONNECT_TIMEOUT_MS="1000")
    proc = subprocess.run([sys.executable, "-m", "conveyor.cli", "check"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_key_bullmq_builds_for_a_queue_shares_the_fairness_hash_slot() -> None:
    """BullMQ's own key map of the queue as Conveyor names it on a cluster (built by bullmq,
    no I/O): each of its scripts touches a subset of these, in the count-and-add ``MULTI`` too."""
    settings = load_settings({"QUEUE_REDIS_CLUSTER_NODES": "127.0.0.1:7000"})
    for region in REGIONS:
        queue = execution_queue_name(region)
        client = aioredis.Redis(port=1)  # never used: nothing is sent
        bull = bullmq.Queue(bull_name(queue, settings.uses_cluster),
                            {"connection": client, "prefix": "bull", "skipVersionCheck": True})  # fmt: skip
        fair = key_slot(keys.fair("bull", queue, cluster=True).encode())
        slots = {name: key_slot(f"{key}x".encode()) for name, key in bull.keys.items()}
        assert set(slots.values()) == {fair}, slots
