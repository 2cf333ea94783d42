"""The workflow engine: runs one execution step by step, durably and fenced.

``async with Engine(store, settings) as engine: outcome = await engine.run(execution_id)``.
See :mod:`conveyor.engine._engine` for the algorithm and :class:`RunOutcome` for the answers.
"""

from conveyor.engine._engine import Engine, StepRunner
from conveyor.engine._outcome import OutcomeKind, RunOutcome

__all__ = ["Engine", "OutcomeKind", "RunOutcome", "StepRunner"]
