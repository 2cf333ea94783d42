"""The payload registry and the ``workflow.execute`` model (pure unit tests)."""

from __future__ import annotations

import pytest

from conveyor.errors import PayloadInvalid
from conveyor.queue import (
    Payload,
    WorkflowExecute,
    execution_queue_name,
    payload_spec,
    register_payload,
    unregister_payload,
)
from conveyor.queue.payloads import DEFAULT_JOB_OPTIONS

NODE_PAYLOAD = {
    "executionId": "exec-1",
    "tenantId": "tenant-1",
    "workflowId": "wf-1",
    "region": "us",
    "workflowVersion": 3,
    "enqueuedAt": 1_700_000_000_000,
    "reason": "trigger",
    "addedByANewerProducer": True,
}


def test_workflow_execute_is_camel_case_json_and_ignores_unknown_keys() -> None:
    payload = WorkflowExecute.model_validate(NODE_PAYLOAD)
    assert (payload.execution_id, payload.workflow_version, payload.reason) == (
        "exec-1",
        3,
        "trigger",
    )
    dumped = payload.model_dump(mode="json", by_alias=True)
    assert dumped == {k: v for k, v in NODE_PAYLOAD.items() if k != "addedByANewerProducer"}
    by_name = WorkflowExecute(execution_id="e", tenant_id="t", workflow_id="w", region="eu")
    assert by_name.model_dump(by_alias=True)["workflowVersion"] is None


def test_registry_resolves_queue_names_to_specs() -> None:
    spec = payload_spec(execution_queue_name("us"))
    assert spec.base_name == "workflow.execute" and spec.model is WorkflowExecute
    assert payload_spec("workflow.execute") is spec
    assert spec.default_job_id is not None
    assert spec.default_job_id(WorkflowExecute.model_validate(NODE_PAYLOAD)) == "exec-1"
    assert spec.job_options == DEFAULT_JOB_OPTIONS
    assert DEFAULT_JOB_OPTIONS["attempts"] == 5
    assert DEFAULT_JOB_OPTIONS["backoff"] == {"type": "exponential", "delay": 1000}
    assert DEFAULT_JOB_OPTIONS["removeOnComplete"]["count"] > 0
    with pytest.raises(ValueError, match=r"no payload model registered for queue 'nope\.us'"):
        payload_spec("nope.us")
    with pytest.raises(ValueError, match="invalid region"):
        execution_queue_name("US West")


def test_register_and_validate() -> None:
    class Ping(Payload):
        target_host: str

    try:
        spec = register_payload("ping", Ping, job_options={"attempts": 1})
        with pytest.raises(ValueError, match="already registered"):
            register_payload("ping", Ping)
        assert payload_spec("ping.eu.west") is spec
        assert spec.validate("ping.eu", {"targetHost": "a"}) == Ping(target_host="a")
        with pytest.raises(
            PayloadInvalid, match=r"invalid payload for queue ping\.eu: targetHost: Field required"
        ):
            spec.validate("ping.eu", {"target": "a"})
        model, data = spec.dump("ping", {"target_host": "b"})
        assert model == Ping(target_host="b") and data == {"targetHost": "b"}
    finally:
        unregister_payload("ping")
    with pytest.raises(ValueError):
        payload_spec("ping")
