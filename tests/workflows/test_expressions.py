"""The expression language: JMESPath only, bounded, and injection attempts are inert."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from conveyor.workflows import expressions
from conveyor.workflows.expressions import (
    ExpressionError,
    build_context,
    compile_expression,
    evaluate,
    render_template,
    template_expressions,
    truthy,
    value_size,
)

CONTEXT = build_context(
    {"user": {"name": "Ada", "tags": ["a", "b"]}, "n": 3, "q": "{{ input.user }}"},
    {"fetch": {"status": 200, "body": {"items": [{"p": 5}, {"p": 20}]}}, "fetch-user": {"x": 1}},
    execution_id="e1",
    workflow_id="w1",
    tenant_id="t1",
)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("input.user.name", "Ada"),
        ("steps.fetch.body.items[?p > `10`].p", [20]),
        ("sum(steps.fetch.body.items[*].p)", 25),
        ('steps."fetch-user".x', 1),
        (
            "{id: execution.id, wf: execution.workflowId, t: execution.tenantId}",
            {"id": "e1", "wf": "w1", "t": "t1"},
        ),
        ("input.missing", None),
        ("join(',', input.user.tags)", "a,b"),
    ],
)
def test_evaluate(expression: str, expected: Any) -> None:
    assert evaluate(expression, CONTEXT) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "__class__",
        "__class__.__mro__",
        "input.__class__.__mro__[1].__subclasses__",
        "constructor.constructor",
        "input.constructor.constructor",
        "steps.__dict__",
        "__globals__",
        "input.__init__.__globals__",
        '"__builtins__"',
        "input.user.name.__class__",
        "input.__proto__",
    ],
)
def test_attribute_style_injection_is_inert(expression: str) -> None:
    # JMESPath looks fields up in JSON objects only: Python attributes do not exist
    assert evaluate(expression, CONTEXT) is None


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os')", "unknown function '__import__'"),
        ("eval('1+1')", "unknown function 'eval'"),
        ("constructor.constructor('return process')()", "invalid expression"),
        ("{{7*7}}", "invalid expression"),
        ("${7*7}", "invalid expression"),
        ("input; import os", "invalid expression"),
        ("`1` | exec(@)", "unknown function 'exec'"),
        ("[" * 40 + "a" + "]" * 40, "nested deeper"),
        ("(" * 5000 + "a" + ")" * 5000, "longer than"),
        ("", "non-empty"),
    ],
)
def test_code_injection_is_rejected_at_compile_time(expression: str, reason: str) -> None:
    with pytest.raises(ExpressionError, match=reason.replace("(", r"\(")):
        compile_expression(expression)


def test_compile_is_cached() -> None:
    assert compile_expression("input.a.b") is compile_expression("input.a.b")


def test_templates_render_values_and_text() -> None:
    assert render_template("{{ input.user }}", CONTEXT) == {"name": "Ada", "tags": ["a", "b"]}
    assert render_template("Hi {{ input.user.name }} #{{ input.n }}", CONTEXT) == "Hi Ada #3"
    assert render_template("x={{ input.missing }}!", CONTEXT) == "x=!"
    assert render_template("{{ input.user.tags }}/", CONTEXT) == '["a","b"]/'
    assert render_template({"a": ["{{ input.n }}", 1, None]}, CONTEXT) == {"a": [3, 1, None]}
    assert render_template("{{ {n: input.n} }}", CONTEXT) == {"n": 3}
    assert render_template("a {{ '{{' }} b", CONTEXT) == "a {{ b"
    assert (
        render_template("/u/{{ input.q }}", CONTEXT, url=True) == "/u/%7B%7B%20input.user%20%7D%7D"
    )
    assert list(template_expressions({"a": ["x {{ b }} {{ c.d }}"]})) == ["b", "c.d"]


def test_templates_are_split_once_and_huge_ones_are_not_kept() -> None:
    tag = uuid.uuid4().hex  # a template this process has not seen
    template = f"order {{{{ input.n }}}} for {{{{ input.user.name }}}} {tag}"
    expressions._cached_parts.cache_clear()  # room for what this test adds, whatever ran before
    before = expressions._cached_parts.cache_info()
    assert render_template(template, CONTEXT) == f"order 3 for Ada {tag}"
    assert render_template(template, CONTEXT) == f"order 3 for Ada {tag}"
    after = expressions._cached_parts.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    # one at the bound is kept; one longer renders the same, split each time
    bound = expressions._PARSED_TEMPLATE_MAX_CHARS
    at_bound = tag + "x" * (bound - len(tag) - len(" {{ input.n }}")) + " {{ input.n }}"
    assert len(at_bound) == bound
    assert render_template(at_bound, CONTEXT) == at_bound.replace("{{ input.n }}", "3")
    assert expressions._cached_parts.cache_info().currsize == after.currsize + 1
    huge = "y" + at_bound
    assert render_template(huge, CONTEXT) == huge.replace("{{ input.n }}", "3")
    assert expressions._cached_parts.cache_info().currsize == after.currsize + 1
    # a bad template is refused every time (errors are not cached as parts)
    for _ in range(2):
        with pytest.raises(ExpressionError, match="unclosed"):
            render_template("a {{ input.n", CONTEXT)


def test_template_output_is_not_rendered_again() -> None:
    # a value that looks like a template (or like Jinja) is data, inserted verbatim
    assert render_template("{{ input.q }}", CONTEXT) == "{{ input.user }}"
    context = build_context({"x": "{{7*7}}"}, {})
    assert render_template("v={{ input.x }}", context) == "v={{7*7}}"


@pytest.mark.parametrize("template", ["{{ input.", "{{ }}", "{{ nope( }}"])
def test_bad_templates(template: str) -> None:
    with pytest.raises(ExpressionError):
        render_template(template, CONTEXT)


def test_truthiness() -> None:
    values: list[Any] = [None, False, "", [], {}, 0, "0", [0], True]
    assert [truthy(v) for v in values] == [False] * 5 + [True] * 4


@pytest.mark.parametrize(
    "expression",
    [
        "input.s" + " | [@, @] | join('', @)" * 60,  # string doubling
        "input.l" + " | [@, @] | []" * 60,  # list doubling
        "input" + " | [@, @]" * 200,  # shared references: a DAG whose tree is 2**200 big
        "length(to_string(input" + " | [@, @]" * 200 + "))",
        "input.l" + " | sort(@)" * 300,  # repeated heavy work
    ],
)
def test_amplification_is_bounded(expression: str) -> None:
    context = build_context({"s": "x" * 50_000, "l": list(range(50_000))}, {})
    started = time.monotonic()
    with pytest.raises(ExpressionError, match=r"budget|larger than|longer than"):
        evaluate(expression, context)
    assert time.monotonic() - started < 3


def test_output_size_limit() -> None:
    context = build_context({"s": "x" * 1000}, {})
    assert evaluate("input.s", context, max_size=2000) == "x" * 1000
    with pytest.raises(ExpressionError, match="result is larger than 500 bytes"):
        evaluate("input.s", context, max_size=500)
    with pytest.raises(ExpressionError, match="result is larger"):
        evaluate("[input.s, input.s, input.s]", context, max_size=2500)


@pytest.mark.parametrize(
    "expression",
    [
        "{n: input.n, user: input.user, tags: input.user.tags}",  # built, sharing the context
        "[input.user, input.user, {k: 'v'}]",  # one value twice: counted as two copies
        "steps.fetch.body.items[*].p",  # a projection
        "input.user",  # not built: a value of the context
        "merge(input.user, {extra: [`1`, `2.5`, null, `true`]})",
    ],
)
def test_the_output_limit_is_exact_whether_the_result_was_built_or_found(
    expression: str,
) -> None:
    result = evaluate(expression, CONTEXT)
    size = value_size(result)
    assert evaluate(expression, CONTEXT, max_size=size) == result
    with pytest.raises(ExpressionError, match=f"result is larger than {size - 1} bytes"):
        evaluate(expression, CONTEXT, max_size=size - 1)


def test_deep_values_are_rejected_cleanly() -> None:
    deep: Any = "bottom"
    for _ in range(5000):
        deep = {"a": deep}
    context = build_context(deep, {})
    with pytest.raises(ExpressionError, match="nested deeper"):
        evaluate("input", context)
    assert evaluate("input.a.a.a.a | length(keys(@))", context) == 1
    with pytest.raises(ExpressionError, match="nested deeper"):
        evaluate("[input]", context)


def test_runtime_type_errors_are_expression_errors() -> None:
    with pytest.raises(ExpressionError, match="expression failed"):
        evaluate("sum(input.user.name)", CONTEXT)
    with pytest.raises(ExpressionError, match="expression failed"):
        evaluate("to_number(input.user) | abs(@)", CONTEXT)


def _peak_mib(run: Any) -> float:
    """Peak memory (MiB) Python allocated while ``run()`` ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        run()
    finally:
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak / 2**20


@pytest.mark.parametrize("url", [False, True])
def test_many_placeholders_of_a_large_value_stop_at_the_size_cap_not_after(url: bool) -> None:
    """A template of 2,000 placeholders of a 0.9 MB input (well within a definition's size)
    would build a 2 GB string before the cap was checked: it is refused once its strings
    pass the cap, having built little more than the cap."""
    context = build_context({"big": "x" * 900_000}, {})
    template = "{{input.big}}" * 2000

    def render() -> None:
        with pytest.raises(ExpressionError, match="rendered template is larger"):
            render_template(template, context, url=url)

    started = time.monotonic()
    assert _peak_mib(render) < 64
    assert time.monotonic() - started < 2.0


def test_a_join_larger_than_the_cap_is_refused_before_it_is_built() -> None:
    """``join`` with a long separator over a long array of empty strings (small to store)
    is refused from its size, before the string is built."""
    context = build_context(None, {"x": {"output": [""] * 85_000}})

    def join() -> None:
        with pytest.raises(ExpressionError, match="larger than"):
            evaluate(f"join('{'s' * 4000}', steps.x.output)", context)

    assert _peak_mib(join) < 64
    assert evaluate("join('-', ['a', 'b'])", context) == "a-b"
