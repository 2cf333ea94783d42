"""The payload model the queue tests use (also imported by the stall-worker subprocess)."""

from __future__ import annotations

from conveyor.queue import Payload, register_payload

TEST_QUEUE = "conveyor.test.q"


class Probe(Payload):
    """A tiny test payload: ``{"n": int, "tag": str}``."""

    n: int
    tag: str = ""


SPEC = register_payload(
    "conveyor.test",
    Probe,
    job_options={
        "attempts": 3,
        "backoff": {"type": "fixed", "delay": 50},
        "removeOnComplete": {"count": 100},
        "removeOnFail": {"count": 100},
    },
    replace=True,
)
