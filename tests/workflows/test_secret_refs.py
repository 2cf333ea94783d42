"""``{{ secrets.NAME }}``: where it may appear (validation), and an ``http`` step that uses
secrets against a local echo server — the server gets the values, nothing recorded shows them."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import quote

import pytest

from conveyor.errors import PermanentStepError, RetryableStepError, WorkflowInvalid
from conveyor.workflows import HttpStep, StepContext, parse_definition, run_step
from conveyor.workflows.steps import AnyStep, http_step_secrets
from tests.workflows.conftest import LocalServer, make_settings

TOKEN = 'tok-Ab3/+x y&z="q"-\u00e9'
"""Characters that URL-encoding and JSON-escaping change: every form must be redacted."""
PASSWORD = "hunter2-long-password"
SECRETS = {"TOKEN": TOKEN, "PASSWORD": PASSWORD}


def definition(*steps: dict[str, Any]) -> Any:
    return parse_definition({"name": "t", "steps": [*steps, {"id": "end", "type": "noop"}]})


def invalid(*steps: dict[str, Any]) -> str:
    with pytest.raises(WorkflowInvalid) as caught:
        definition(*steps)
    return json.dumps(caught.value.details)


HTTP = {"id": "h", "type": "http", "url": "https://example.com/"}


def test_http_url_headers_and_body_may_reference_secrets() -> None:
    parsed = definition(
        {
            **HTTP,
            "method": "POST",
            "url": "https://example.com/{{ secrets.TOKEN }}?a={{ input.a }}",
            "headers": {
                "Authorization": "Bearer {{ secrets.TOKEN }}",
                "X-P": "{{secrets.PASSWORD}}",
            },
            "body": {"pw": "{{ secrets.PASSWORD }}", "list": ["x{{ secrets.OTHER }}y"]},
        },
        # a field called "secrets" inside the input is just data
        {"id": "t", "type": "transform", "expression": "input.secrets"},
    )
    assert http_step_secrets(parsed.steps[0]) == {"TOKEN", "PASSWORD", "OTHER"}


@pytest.mark.parametrize(
    "step",
    [
        {"id": "t", "type": "transform", "expression": "secrets.TOKEN"},
        {"id": "t", "type": "transform", "expression": "{a: secrets.TOKEN}"},
        {"id": "c", "type": "condition", "expression": "secrets.TOKEN == 'x'"},
        {"id": "c", "type": "condition", "cases": [{"when": "!secrets", "then": "end"}]},
        {"id": "d", "type": "delay", "until": "{{ secrets.TOKEN }}"},
        {**HTTP, "select": "secrets.TOKEN"},
        {"id": "t", "type": "transform", "expression": "input", "select": "secrets"},
    ],
)
def test_secrets_anywhere_else_are_refused(step: dict[str, Any]) -> None:
    assert "may be used only in an http step's url, headers and body" in invalid(step)


@pytest.mark.parametrize(
    "template",
    ["{{ secrets }}", "{{ length(secrets.TOKEN) }}", "{{ secrets.TOKEN || 'x' }}",
     "{{ [secrets.TOKEN] }}", "{{ secrets[0] }}"],
)  # fmt: skip
def test_an_http_template_reads_a_secret_only_as_a_placeholder_of_its_own(template: str) -> None:
    assert "placeholder of its own" in invalid({**HTTP, "headers": {"X-A": template}})
    assert "placeholder of its own" in invalid({**HTTP, "body": {"a": template}})


def resolver(values: Mapping[str, str]) -> Any:
    async def resolve(names: Collection[str]) -> Mapping[str, str]:
        for name in sorted(names):
            if name not in values:
                raise PermanentStepError(f"secret {name!r} is not defined", secret=name)
        return {name: values[name] for name in names}

    return resolve


def ctx(server: LocalServer, values: Mapping[str, str] | None = SECRETS) -> StepContext:
    return StepContext(
        input={"a": 1},
        steps={},
        execution_id="e1",
        workflow_id="w1",
        tenant_id="t1",
        settings=make_settings(f"127.0.0.1:{server.port}"),
        secrets=None if values is None else resolver(values),
    )


def http_step(server: LocalServer, path: str = "/echo", **fields: Any) -> AnyStep:
    step: AnyStep = definition(
        {
            "id": "h",
            "type": "http",
            "method": "POST",
            "url": server.url(path) + "?t={{ secrets.TOKEN }}&a={{ input.a }}",
            "headers": {
                "Authorization": "Bearer {{ secrets.TOKEN }}",
                "X-Custom": "{{ secrets.PASSWORD }}",
            },
            "body": {"password": "{{ secrets.PASSWORD }}", "note": "pw={{ secrets.PASSWORD }}"},
            "response_headers": ["x-echo"],
            **fields,
        }
    ).steps[0]
    return step


def assert_clean(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    for secret in SECRETS.values():
        assert secret not in text
        assert json.dumps(secret)[1:-1] not in text
        assert json.dumps(secret, ensure_ascii=False)[1:-1] not in text
    from urllib.parse import quote, quote_plus

    for secret in SECRETS.values():
        assert quote(secret, safe="") not in text and quote_plus(secret) not in text
        assert secret.encode().decode("latin-1") not in text


async def test_the_target_gets_the_values_and_nothing_recorded_shows_them(
    local_server: LocalServer,
) -> None:
    result = await run_step(http_step(local_server), ctx(local_server))
    seen = local_server.requests[-1]
    # http.server reads header bytes as Latin-1
    assert seen.headers["authorization"].encode("latin-1").decode() == f"Bearer {TOKEN}"
    assert seen.headers["x-custom"] == PASSWORD
    assert json.loads(seen.body) == {"password": PASSWORD, "note": f"pw={PASSWORD}"}
    from urllib.parse import parse_qs, urlsplit

    assert parse_qs(urlsplit(seen.path).query)["t"] == [TOKEN]
    # the echo server sent everything back: the output shows [secret] instead
    assert_clean(result.output)
    assert_clean(result.rendered_input)
    assert result.output["body"]["headers"]["x-custom"] == "[secret]"
    assert json.loads(result.output["body"]["body"]) == {
        "password": "[secret]",
        "note": "pw=[secret]",
    }
    assert result.rendered_input["url"].endswith("?t=[secret]&a=1")
    assert result.rendered_input["headers"]["X-Custom"] == "[secret]"
    assert result.rendered_input["body"] == {"password": "[secret]", "note": "pw=[secret]"}


async def test_a_failing_request_shows_no_secret_in_its_error(local_server: LocalServer) -> None:
    context = ctx(local_server)
    with pytest.raises(PermanentStepError) as caught:
        await run_step(http_step(local_server, "/status/404"), context)
    assert "HTTP 404" in caught.value.message
    assert_clean({"message": caught.value.message, "details": caught.value.details})
    assert "[secret]" in caught.value.message  # the URL, redacted
    assert_clean(context.rendered.value)


async def test_a_redacted_error_keeps_its_kind_for_the_retry_policy(
    local_server: LocalServer,
) -> None:
    """An error of a step that uses secrets is rebuilt without them — and keeps what a retry
    policy reads: its kind (``status``) and its status, so ``retry_on`` / ``retry_statuses``
    decide as for a step without secrets."""
    with pytest.raises(RetryableStepError) as caught:
        await run_step(http_step(local_server, "/status/503"), ctx(local_server))
    error = caught.value
    assert_clean({"message": error.message, "details": error.details})
    assert error.kind == "status" and error.details["status"] == 503
    step = http_step(local_server, "/status/503", retry={"retry_on": ["status"]})
    assert isinstance(step, HttpStep)
    assert step.retry is not None and step.retry.retries(error.kind, 503, retryable=True)


@pytest.mark.parametrize(("pad", "charset"), [(990, "utf-8"), (1005, "utf-8"), (40, "utf-16")])
async def test_an_error_excerpt_keeps_no_part_of_a_secret(
    local_server: LocalServer, pad: int, charset: str
) -> None:
    """A refusal that echoes the secret (a 401 quoting the key it got): the secret is taken
    out of the response before the excerpt kept in the error is cut to 1,024 characters — cut
    first, the secret's head was kept — and the body is read in its own charset (read as
    UTF-8, a UTF-16 echo kept the secret, a NUL between each character)."""
    with pytest.raises(PermanentStepError) as caught:
        await run_step(http_step(local_server, f"/deny/{pad}/{charset}"), ctx(local_server))
    body = caught.value.details["body"]
    assert_clean({"message": caught.value.message, "details": caught.value.details})
    seen = body.replace("\x00", "")
    assert not any(TOKEN[:k] in seen for k in range(6, len(TOKEN) + 1)), body[-80:]
    assert len(body) <= 1024 and body.startswith("x" * min(pad, 100))
    if pad + 20 < 1024:
        assert body.endswith("invalid key [secret]")


async def test_an_invalid_url_is_quoted_without_part_of_a_secret(
    local_server: LocalServer,
) -> None:
    """A URL the client refuses is quoted in the error, cut to 200 characters — after its
    secrets were taken out, so the cut leaves no secret's head."""
    url = "https://api.example.test:80a/" + "p" * 160 + "?k={{ secrets.TOKEN }}"
    step = definition({"id": "h", "type": "http", "method": "GET", "url": url}).steps[0]
    with pytest.raises(PermanentStepError, match="invalid URL") as caught:
        await run_step(step, ctx(local_server))
    message = caught.value.message
    assert not any(TOKEN[:k] in message for k in range(3, len(TOKEN) + 1)), message


@pytest.mark.parametrize(
    "sneaky",
    [
        "{{ @.secrets.TOKEN || 'none' }}",
        "{{ [@][0].secrets.TOKEN || 'none' }}",
        "{{ map(&secrets.TOKEN, [@])[0] || 'none' }}",
        "{{ *.TOKEN | [0] || 'none' }}",
    ],
)
async def test_only_a_placeholder_that_names_a_secret_reads_it(
    local_server: LocalServer, sneaky: str
) -> None:
    """A secret is read by a placeholder that is exactly ``secrets.NAME``, never through the
    expression context: an expression that reaches for it another way (through ``@``, an
    expression reference, a wildcard over the root) finds nothing, whether or not the
    definition's check saw through it — a transformed secret would be recorded unredacted."""
    step = http_step(local_server)
    assert isinstance(step, HttpStep)
    step.headers["X-Sneaky"] = sneaky
    await run_step(step, ctx(local_server))
    seen = local_server.requests[-1]
    assert seen.headers["authorization"].encode("latin-1").decode() == f"Bearer {TOKEN}"
    assert seen.headers["x-sneaky"] == "none"


async def test_a_missing_secret_fails_the_step_naming_it(local_server: LocalServer) -> None:
    context = ctx(local_server, {"TOKEN": TOKEN})
    with pytest.raises(PermanentStepError, match="'PASSWORD'"):
        await run_step(http_step(local_server), context)
    assert local_server.requests == []  # nothing was sent
    with pytest.raises(PermanentStepError, match="no secrets are available"):
        await run_step(http_step(local_server), ctx(local_server, None))


async def test_a_redirect_to_another_origin_does_not_carry_secrets(
    local_server: LocalServer,
) -> None:
    # the same server under another name is another origin
    elsewhere = local_server.url("/echo", host="localhost")
    context = StepContext(
        input={},
        steps={},
        execution_id="e1",
        workflow_id="w1",
        tenant_id="t1",
        settings=make_settings(f"127.0.0.1:{local_server.port}", f"localhost:{local_server.port}"),
        secrets=resolver(SECRETS),
    )
    step = definition(
        {
            "id": "h",
            "type": "http",
            "url": local_server.url("/redirect") + "?to=" + quote(elsewhere, safe=""),
            "headers": {"X-Custom": "{{ secrets.PASSWORD }}", "X-Plain": "kept"},
        }
    ).steps[0]
    result = await run_step(step, context)
    first, second = local_server.requests
    assert first.headers["x-custom"] == PASSWORD  # the origin the step names gets it
    assert "x-custom" not in second.headers and second.headers["x-plain"] == "kept"
    assert result.output["body"]["headers"]["host"] == f"localhost:{local_server.port}"
    # a body with a secret is not sent to the other origin (307 keeps the body)
    local_server.requests.clear()
    posting = definition(
        {
            "id": "h",
            "type": "http",
            "method": "POST",
            "url": local_server.url("/redirect") + "?code=307&to=" + quote(elsewhere, safe=""),
            "body": {"pw": "{{ secrets.PASSWORD }}"},
        }
    ).steps[0]
    with pytest.raises(PermanentStepError, match="redirect to another origin"):
        await run_step(posting, context)
    assert len(local_server.requests) == 1
