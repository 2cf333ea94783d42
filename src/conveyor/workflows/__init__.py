"""Workflow definitions and step runners.

* :mod:`conveyor.workflows.definition` — the workflow model, ``parse_definition``, JSON Schema.
* :mod:`conveyor.workflows.step_models` — the step models, retry policies and actions
  (re-exported by ``definition``).
* :mod:`conveyor.workflows.expressions` — the safe JMESPath expression language and templates.
* :mod:`conveyor.workflows.http` — the SSRF-guarded HTTP client used by ``http`` steps.
* :mod:`conveyor.workflows.steps` — ``run_step(step, ctx) -> StepResult`` (with what the step
  did, its ``rendered_input``).
"""

from conveyor.workflows.definition import (
    Action,
    ConditionStep,
    DelayStep,
    ForeachStep,
    GotoAction,
    HttpStep,
    NoopStep,
    ParallelStep,
    RetryPolicy,
    Step,
    TransformStep,
    WaitStep,
    WorkflowDefinition,
    WorkflowStep,
    parse_definition,
    validate_input,
    workflow_json_schema,
)
from conveyor.workflows.expressions import ExpressionError
from conveyor.workflows.http import SafeHttpClient
from conveyor.workflows.steps import (
    AnyStep,
    RenderedInput,
    SecretResolver,
    StepContext,
    StepResult,
    run_pure_step,
    run_step,
)

__all__ = [
    "Action",
    "AnyStep",
    "ConditionStep",
    "DelayStep",
    "ExpressionError",
    "ForeachStep",
    "GotoAction",
    "HttpStep",
    "NoopStep",
    "ParallelStep",
    "RenderedInput",
    "RetryPolicy",
    "SafeHttpClient",
    "SecretResolver",
    "Step",
    "StepContext",
    "StepResult",
    "TransformStep",
    "WaitStep",
    "WorkflowDefinition",
    "WorkflowStep",
    "parse_definition",
    "run_pure_step",
    "run_step",
    "validate_input",
    "workflow_json_schema",
]
