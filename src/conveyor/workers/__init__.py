"""Conveyor's long-running worker processes (one module per process, runnable with ``-m``).

* :mod:`conveyor.workers.execution` — ``conveyor worker``: runs ``workflow.execute.<region>``
  jobs through the engine with a process-wide concurrency budget, a per-tenant cap and tenant
  fairness (see ``docs/fairness.md``).
* :mod:`conveyor.workers.fleet` — ``conveyor worker --processes N``: N execution workers under
  one supervisor (restarts, drain, no orphans; see ``docs/scaling.md``).
"""
