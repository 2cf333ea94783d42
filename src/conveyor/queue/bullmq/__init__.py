"""The ``bullmq`` driver: Conveyor's queues, workers and event streams on the official ``bullmq``
package (the Python port of BullMQ), so Node.js producers and BullMQ dashboards share them.

* :mod:`~conveyor.queue.bullmq.queue` — :class:`BullQueue` (producer) and
  :class:`BullQueueEvents` (the queue's global event stream).
* :mod:`~conveyor.queue.bullmq.worker` — :class:`BullWorker`, a supervised, bounded worker.
* :mod:`~conveyor.queue.bullmq.compat` — the only module that touches bullmq's internals.
"""

from conveyor.queue.bullmq.queue import BullQueue, BullQueueEvents
from conveyor.queue.bullmq.worker import BullWorker

__all__ = ["BullQueue", "BullQueueEvents", "BullWorker"]
