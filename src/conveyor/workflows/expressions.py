"""A safe expression language for workflow steps: JMESPath, compiled once, evaluated on a budget.

Expressions are `JMESPath <https://jmespath.org>`_ queries over one JSON document, the
evaluation context::

    {"input": <trigger input>,
     "steps": {"<step id>": <that step's output>, ...},
     "execution": {"id": ..., "workflowId": ..., "tenantId": ...}}

e.g. ``input.user.email``, ``steps.fetch.body.items[?price > `10`].name``,
``{id: execution.id, total: sum(steps.cart.body[*].price)}``. Step ids containing ``-`` must
be quoted: ``steps."fetch-user".body``.

JMESPath only selects and reshapes JSON: field access on a JSON object is a dictionary lookup,
so ``__class__.__mro__`` or ``constructor.constructor`` are field names that are simply absent
(``null``); there are no attribute lookups, no calls except JMESPath's fixed built-in
functions, and nothing is ever passed to ``eval``/``exec`` or a template engine.

Cost is bounded: an expression is at most :data:`MAX_EXPRESSION_CHARS` characters and
:data:`MAX_EXPRESSION_DEPTH` brackets deep; evaluation stops with :class:`ExpressionError`
after :data:`MAX_WORK` units of work or :data:`MAX_EVAL_SECONDS`, and every intermediate value
is measured (shared references counted as copies, so ``[@, @] | [@, @] | ...`` cannot blow
up) against :data:`MAX_VALUE_SIZE`.

Templates
---------
String fields of ``http`` steps (URL, header values, string leaves of the body) and ``delay``'s
``until`` are *templates*: ``{{ <jmespath> }}`` placeholders are replaced by the expression's
value. A string that is exactly one placeholder (``"{{ input.payload }}"``) becomes the value
itself (an object stays an object); otherwise each placeholder is replaced by the value as text
(strings verbatim, ``null`` as the empty string, anything else as compact JSON; in URLs the
text is percent-encoded). The placeholder ends at the first ``}}`` outside quotes and brackets,
so ``{{ {a: x} }}`` works; a literal ``{{`` is written ``{{ '{{' }}``.

Secrets
-------
The tenant's secrets are read only by a placeholder that is exactly ``{{ secrets.NAME }}``,
and only in an ``http`` step's URL, header values and body (``check_template(...,
secrets=True)``); any other expression that reads ``secrets`` at its root — in a transform, a
condition, a ``select``, a ``delay``, or a bigger expression in an ``http`` template — is a
validation error (:func:`check_expression`). The step runner gives the referenced secrets to
that step's templates alone (:func:`template_secrets` names them, :func:`secrets_for` hands
them over): only a placeholder that is exactly ``secrets.NAME`` reads one — they are never in
the expression context, so no other expression can reach them, whatever its form.
"""

from __future__ import annotations

import contextvars
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, ClassVar
from urllib.parse import quote

import jmespath
import jmespath.exceptions
import jmespath.functions
from jmespath.parser import ParsedResult
from jmespath.visitor import Options, TreeInterpreter

from conveyor.errors import PermanentStepError

__all__ = [
    "MAX_EVAL_SECONDS",
    "MAX_EXPRESSION_CHARS",
    "MAX_EXPRESSION_DEPTH",
    "MAX_OUTPUT_SIZE",
    "MAX_VALUE_SIZE",
    "MAX_WORK",
    "ExpressionError",
    "build_context",
    "check_expression",
    "check_template",
    "compact_json",
    "compile_expression",
    "evaluate",
    "is_template",
    "render_template",
    "secret_reference",
    "secrets_for",
    "template_expressions",
    "template_secrets",
    "truthy",
    "value_size",
]

MAX_EXPRESSION_CHARS = 4096
MAX_EXPRESSION_DEPTH = 32
MAX_WORK = 2_000_000
"""Evaluation work budget: one unit per AST node visited plus the length of every list,
object or string an AST node produces."""
MAX_EVAL_SECONDS = 1.0
MAX_VALUE_SIZE = 8 * 1024 * 1024
"""Largest (approximate JSON bytes) intermediate value an evaluation may build."""
MAX_OUTPUT_SIZE = 1024 * 1024
"""Default largest result of one expression or template (approximate JSON bytes)."""
MAX_VALUE_DEPTH = 64

_OPEN = "([{"
_CLOSE = ")]}"
_QUOTES = "'\"`"


class ExpressionError(PermanentStepError):
    """An expression is invalid or its evaluation failed."""


# --- compiling --------------------------------------------------------------------------------


def _nesting_depth(expression: str) -> int:
    depth = deepest = 0
    quote_char = ""
    escaped = False
    for char in expression:
        if quote_char:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote_char:
                quote_char = ""
        elif char in _QUOTES:
            quote_char = char
        elif char in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSE:
            depth -= 1
    return deepest


@lru_cache(maxsize=2048)
def compile_expression(expression: str) -> ParsedResult:
    """Parse ``expression`` once (cached). Raises :class:`ExpressionError` when invalid."""
    if not isinstance(expression, str) or not expression.strip():
        raise ExpressionError("expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    if _nesting_depth(expression) > MAX_EXPRESSION_DEPTH:
        raise ExpressionError(f"expression is nested deeper than {MAX_EXPRESSION_DEPTH} levels")
    try:
        parsed: ParsedResult = jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(f"invalid expression: {_one_line(str(exc))}") from exc
    except (RecursionError, ValueError, TypeError) as exc:
        raise ExpressionError("invalid expression") from exc
    _check_functions(parsed.parsed)
    return parsed


_FUNCTIONS = frozenset(jmespath.functions.Functions().FUNCTION_TABLE)


def _check_functions(ast: dict[str, Any]) -> None:
    """Reject calls to functions JMESPath does not have (at parse time, not at run time)."""
    stack = [ast]
    while stack:
        node = stack.pop()
        if node.get("type") == "function_expression" and node.get("value") not in _FUNCTIONS:
            name = str(node.get("value"))[:64]
            raise ExpressionError(
                f"unknown function {name!r}; available: {', '.join(sorted(_FUNCTIONS))}"
            )
        stack.extend(child for child in node.get("children", ()) if isinstance(child, dict))


SECRETS_ROOT = "secrets"
SECRETS_ONLY_IN_HTTP = (
    "secrets ({{ secrets.NAME }}) may be used only in an http step's url, headers and body"
)
SECRETS_ALONE = (
    "a secret is referenced as a placeholder of its own, {{ secrets.NAME }}: no other "
    "expression may read secrets"
)


def check_expression(expression: str, *, secrets: bool = False) -> str:
    """Validate ``expression`` (for pydantic validators): returns it or raises ``ValueError``.

    An expression that reads ``secrets`` is refused unless ``secrets`` is true and it is
    exactly ``secrets.NAME`` (see the module's *Secrets*).
    """
    try:
        parsed = compile_expression(expression)
    except ExpressionError as exc:
        raise ValueError(exc.message) from None
    if _reads_secrets(parsed.parsed):
        if not secrets:
            raise ValueError(SECRETS_ONLY_IN_HTTP)
        if secret_reference(expression) is None:
            raise ValueError(SECRETS_ALONE)
    return expression


def secret_reference(expression: str) -> str | None:
    """``NAME`` when ``expression`` is exactly ``secrets.NAME``; else ``None``."""
    try:
        ast = compile_expression(expression).parsed
    except ExpressionError:
        return None
    children = ast.get("children", [])
    if ast.get("type") != "subexpression" or len(children) != 2:
        return None
    root, name = children
    if (root.get("type"), root.get("value")) != ("field", SECRETS_ROOT):
        return None
    if name.get("type") != "field" or not isinstance(name.get("value"), str):
        return None
    return str(name["value"])


# Nodes whose first child is evaluated against the same value as the node and whose other
# children against what that produced (or, for expression references, against elements).
_LEFT_ONLY = frozenset(
    {
        "subexpression",
        "index_expression",
        "projection",
        "value_projection",
        "filter_projection",
        "flatten",
        "pipe",
    }
)
_ALL_CHILDREN = frozenset(
    {
        "or_expression",
        "and_expression",
        "not_expression",
        "comparator",
        "function_expression",
        "multi_select_list",
        "multi_select_dict",
        "key_val_pair",
    }
)


def _reads_secrets(ast: dict[str, Any]) -> bool:
    """True if a ``secrets`` field is read from the root of the context."""
    stack = [ast]
    while stack:
        node = stack.pop()
        kind = node.get("type")
        if kind == "field":
            if node.get("value") == SECRETS_ROOT:
                return True
            continue
        children = [c for c in node.get("children", ()) if isinstance(c, dict)]
        if kind in _LEFT_ONLY:
            stack.extend(children[:1])
        elif kind in _ALL_CHILDREN:
            stack.extend(children)
    return False


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# --- templates --------------------------------------------------------------------------------


def _placeholder_end(text: str, start: int) -> int:
    """Index of the ``}}`` closing the placeholder whose body starts at ``start``; -1 if none."""
    depth = 0
    quote_char = ""
    escaped = False
    i = start
    while i < len(text):
        char = text[i]
        if quote_char:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote_char:
                quote_char = ""
        elif char in _QUOTES:
            quote_char = char
        elif depth == 0 and text.startswith("}}", i):
            return i
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(0, depth - 1)
        i += 1
    return -1


_PARSED_TEMPLATE_MAX_CHARS = 1024
"""Templates up to this long are split once and the parts kept (:func:`_cached_parts`, at
most 1,024 of them: a few MB at worst, whatever tenants submit); a workflow's templates are
rendered for every execution, but a longer one is split each time."""


def _parts(text: str) -> tuple[tuple[bool, str], ...]:
    """Split a template into ``(is_expression, text)`` parts. Raises ``ValueError``."""
    if len(text) <= _PARSED_TEMPLATE_MAX_CHARS:
        return _cached_parts(text)
    return _split_parts(text)


@lru_cache(maxsize=1024)
def _cached_parts(text: str) -> tuple[tuple[bool, str], ...]:
    return _split_parts(text)


def _split_parts(text: str) -> tuple[tuple[bool, str], ...]:
    parts: list[tuple[bool, str]] = []
    pos = 0
    while True:
        start = text.find("{{", pos)
        if start < 0:
            if pos < len(text):
                parts.append((False, text[pos:]))
            return tuple(parts)
        end = _placeholder_end(text, start + 2)
        if end < 0:
            raise ValueError(f"unclosed '{{{{' at character {start}")
        if start > pos:
            parts.append((False, text[pos:start]))
        body = text[start + 2 : end].strip()
        if not body:
            raise ValueError(f"empty '{{{{ }}}}' at character {start}")
        parts.append((True, body))
        pos = end + 2


def is_template(text: str) -> bool:
    """True if ``text`` contains a ``{{ ... }}`` placeholder."""
    return "{{" in text


def template_expressions(value: Any) -> Iterator[str]:
    """Every expression in the templates of a JSON value (strings anywhere inside it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "{{" in item:
                yield from (body for is_expr, body in _parts(item) if is_expr)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_template(value: Any, *, secrets: bool = False) -> Any:
    """Validate every placeholder in ``value`` (for pydantic validators); raises ``ValueError``.
    ``secrets``: placeholders ``{{ secrets.NAME }}`` are allowed (``http`` templates)."""
    try:
        for expression in template_expressions(value):
            check_expression(expression, secrets=secrets)
    except ValueError as exc:
        raise ValueError(f"template: {exc}") from None
    return value


def template_secrets(value: Any) -> set[str]:
    """The names of the secrets a (validated) template value references."""
    names = set()
    for expression in template_expressions(value):
        name = secret_reference(expression)
        if name is not None:
            names.add(name)
    return names


compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""``json.dumps(value, separators=(",", ":"), ensure_ascii=False)`` with its encoder built
once, not per call: how a template part that is not a string becomes text, and an ``http``
step's JSON body."""


def _as_text(value: Any, *, url: bool, budget: list[int], max_size: int) -> str:
    """A placeholder's value as text in a string, charged to ``budget`` (what the template's
    strings may still hold) before it is percent-encoded — encoding only makes it longer."""
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    else:
        text = compact_json(value)
    _charge(budget, len(text), max_size)
    if not url:
        return text
    quoted = quote(text, safe="")
    _charge(budget, len(quoted) - len(text), max_size)
    return quoted


def _charge(budget: list[int], size: int, max_size: int) -> None:
    budget[0] -= size
    if budget[0] < 0:
        raise ExpressionError(f"rendered template is larger than {max_size} bytes")


_SECRETS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "conveyor_template_secrets", default=None
)
"""The secrets the templates rendered in this task may name (:func:`secrets_for`)."""


@contextmanager
def secrets_for(values: Mapping[str, str]) -> Iterator[None]:
    """Within the block, a template placeholder that is exactly ``secrets.NAME`` reads
    ``values[NAME]`` (``null`` when not given); no expression sees them otherwise."""
    token = _SECRETS.set(values)
    try:
        yield
    finally:
        _SECRETS.reset(token)


def _evaluate_placeholder(expression: str, context: Mapping[str, Any]) -> Any:
    if "secrets" in expression:
        secrets = _SECRETS.get()
        name = secret_reference(expression)
        if name is not None:  # read here, never through the context
            return None if secrets is None else secrets.get(name)
    return evaluate(expression, context)


def render_template(
    value: Any,
    context: Mapping[str, Any],
    *,
    url: bool = False,
    max_size: int = MAX_OUTPUT_SIZE,
) -> Any:
    """Replace the placeholders in ``value`` (a JSON value) using ``context``.

    ``url=True`` percent-encodes interpolated text (not a value that is the whole string).
    Raises :class:`ExpressionError`.
    """
    # The strings built from placeholders are charged as they are built, all of them against
    # ``max_size``: checked only once built, thousands of placeholders of a 1 MiB input (a
    # template within the 64 KiB definition limit) would allocate gigabytes first.
    result = _render(value, context, url=url, depth=0, budget=[max_size], max_size=max_size)
    _check_output(result, max_size)
    return result


def _render(
    value: Any,
    context: Mapping[str, Any],
    *,
    url: bool,
    depth: int,
    budget: list[int],
    max_size: int,
) -> Any:
    if depth > MAX_VALUE_DEPTH:
        raise ExpressionError(f"template is nested deeper than {MAX_VALUE_DEPTH} levels")
    if isinstance(value, dict):
        return {
            k: _render(v, context, url=url, depth=depth + 1, budget=budget, max_size=max_size)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _render(v, context, url=url, depth=depth + 1, budget=budget, max_size=max_size)
            for v in value
        ]
    if not isinstance(value, str) or "{{" not in value:
        return value
    try:
        parts = _parts(value)
    except ValueError as exc:
        raise ExpressionError(f"invalid template: {exc}") from None
    if len(parts) == 1 and parts[0][0]:
        return _evaluate_placeholder(parts[0][1], context)  # the value itself: not copied
    return "".join(
        _as_text(_evaluate_placeholder(text, context), url=url, budget=budget, max_size=max_size)
        if is_expr
        else text
        for is_expr, text in parts
    )


# --- evaluating -------------------------------------------------------------------------------


def build_context(
    input: Any,
    steps: Mapping[str, Any],
    *,
    execution_id: str = "",
    workflow_id: str = "",
    tenant_id: str = "",
) -> dict[str, Any]:
    """The document expressions are evaluated against."""
    return {
        "input": input,
        "steps": dict(steps),
        "execution": {"id": execution_id, "workflowId": workflow_id, "tenantId": tenant_id},
    }


def evaluate(
    expression: str, context: Mapping[str, Any], *, max_size: int = MAX_OUTPUT_SIZE
) -> Any:
    """Evaluate a JMESPath ``expression`` against ``context`` on a bounded budget.

    Raises :class:`ExpressionError` when it is invalid, exceeds the budget, or its result
    is larger than ``max_size`` (approximate JSON bytes).
    """
    parsed = compile_expression(expression)
    interpreter = _BudgetInterpreter()
    try:
        result = interpreter.visit(parsed.parsed, context)
    except ExpressionError:
        raise
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(f"expression failed: {_one_line(str(exc))}") from exc
    except RecursionError as exc:
        raise ExpressionError("expression failed: value nested too deeply") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ExpressionError(f"expression failed: {type(exc).__name__}") from exc
    known = interpreter.known_size(result)
    if known is None:
        _check_output(result, max_size)
    elif known > max_size:
        raise ExpressionError(f"result is larger than {max_size} bytes")
    return result


def truthy(value: Any) -> bool:
    """JMESPath truthiness: ``false``, ``null``, ``""``, ``[]`` and ``{}`` are false (0 is true)."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


def _check_output(result: Any, max_size: int) -> None:
    size = value_size(result, limit=max_size)
    if size > max_size:
        raise ExpressionError(f"result is larger than {max_size} bytes")


def value_size(value: Any, *, limit: int = MAX_VALUE_SIZE) -> int:
    """Approximate JSON size of ``value``, counting shared references as copies.

    Stops counting once ``limit`` is passed (returns a number > ``limit``), so it is cheap
    for huge values. Raises :class:`ExpressionError` when nested deeper than the limit.
    """
    if not isinstance(value, dict | list):
        return _scalar_size(value)
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            raise ExpressionError(f"value is nested deeper than {MAX_VALUE_DEPTH} levels")
        total += _scalar_size(item)
        if isinstance(item, dict):
            total += sum(len(k) + 4 for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        if total > limit:
            return total
    return total


def _scalar_size(item: Any) -> int:
    if isinstance(item, str):
        return len(item) + 2
    if isinstance(item, dict | list):
        return 2 + len(item)
    if isinstance(item, float) and not math.isfinite(item):
        raise ExpressionError("result is not JSON (NaN or infinity)")
    return 8


_CREATING = frozenset(
    {
        "function_expression",
        "multi_select_list",
        "multi_select_dict",
        "projection",
        "value_projection",
        "filter_projection",
        "flatten",
        "slice",
        "index_expression",
    }
)


class _Functions(jmespath.functions.Functions):  # type: ignore[misc]
    """JMESPath's functions; ``join`` refuses a result over the value-size cap before it
    builds it (checked once built, a separator repeated between 85,000 empty strings — an
    array a step's output may hold — allocated hundreds of megabytes first)."""

    @jmespath.functions.signature({"types": ["string"]}, {"types": ["array-string"]})  # type: ignore[untyped-decorator]
    def _func_join(self, separator: str, array: list[str]) -> str:
        size = sum(map(len, array)) + len(separator) * max(len(array) - 1, 0)
        if size > MAX_VALUE_SIZE:
            raise ExpressionError(f"intermediate value is larger than {MAX_VALUE_SIZE} bytes")
        return separator.join(array)


_OPTIONS = Options(dict_cls=dict, custom_functions=_Functions())
"""Shared by every evaluation (jmespath's ``Functions`` holds no state of its own)."""


class _BudgetInterpreter(TreeInterpreter):  # type: ignore[misc]
    """JMESPath's tree interpreter with a work budget, a deadline and a value-size cap.

    The size of every list/object/string an AST node builds is computed with memoisation by
    identity (the objects are kept alive in the memo, so identities are not reused), which
    makes the check linear in new data even when values share references.
    """

    def __init__(self) -> None:
        super().__init__(_OPTIONS)
        self._work = 0
        self._next_clock_check = 256
        self._deadline = time.monotonic() + MAX_EVAL_SECONDS
        self._sizes: dict[int, tuple[Any, int]] = {}

    _methods: ClassVar[dict[str, Callable[..., Any]]] = {}
    """Node type -> this class's ``visit_*`` function (shared by every evaluation, where
    jmespath's ``Visitor`` builds a cache of bound methods per interpreter)."""

    def visit(self, node: dict[str, Any], value: Any) -> Any:
        # jmespath always calls it with (node, value); no *args/**kwargs packing per node
        self._work += 1
        node_type = node["type"]
        method = self._methods.get(node_type)
        if method is None:
            method = getattr(type(self), f"visit_{node_type}", type(self).default_visit)
            self._methods[node_type] = method
        result = method(self, node, value)
        if node_type in _CREATING and isinstance(result, (str, list, dict)):
            # a value this evaluation built: charge it, and measure it (values that merely
            # point into the context are free: the context's size is bounded elsewhere)
            self._work += len(result)
            size = len(result) if isinstance(result, str) else self._size(result)
            if size > MAX_VALUE_SIZE:
                raise ExpressionError(f"intermediate value is larger than {MAX_VALUE_SIZE} bytes")
        if self._work > MAX_WORK:
            raise ExpressionError("expression exceeded its work budget")
        if self._work >= self._next_clock_check:
            self._next_clock_check = self._work + 256
            if time.monotonic() > self._deadline:
                raise ExpressionError(f"expression took longer than {MAX_EVAL_SECONDS}s")
        return result

    def known_size(self, value: Any) -> int | None:
        """The size of ``value`` if this evaluation built and measured it (the same measure
        as :func:`value_size`), else ``None``."""
        if not isinstance(value, list | dict):
            return None
        known = self._sizes.get(id(value))
        return None if known is None or known[0] is not value else known[1]

    def _size(self, value: Any) -> int:
        """Memoised tree size (iterative post-order; depth-limited)."""
        sizes = self._sizes
        known = sizes.get(id(value))
        if known is not None:
            return known[1]
        stack: list[tuple[Any, int, bool]] = [(value, 0, False)]
        while stack:
            item, depth, expanded = stack.pop()
            if id(item) in sizes:
                continue
            children = list(item.values()) if isinstance(item, dict) else item
            if not expanded:
                if depth > MAX_VALUE_DEPTH:
                    raise ExpressionError(f"value is nested deeper than {MAX_VALUE_DEPTH} levels")
                stack.append((item, depth, True))
                for child in children:
                    if isinstance(child, (list, dict)) and id(child) not in sizes:
                        stack.append((child, depth + 1, False))
                continue
            total = _container_size(item, children, sizes)
            sizes[id(item)] = (item, min(total, 1 << 62))
        return sizes[id(value)][1]


def _container_size(item: Any, children: Any, sizes: dict[int, tuple[Any, int]]) -> int:
    """Size of a list/dict whose container children are already in ``sizes``."""
    total = 2 + len(item)
    if isinstance(item, dict):
        total += sum(len(str(k)) + 4 for k in item)
    for child in children:
        if isinstance(child, str):
            total += len(child) + 2
        elif isinstance(child, (list, dict)):
            total += sizes[id(child)][1]
        elif isinstance(child, float) and not math.isfinite(child):
            raise ExpressionError("result is not JSON (NaN or infinity)")
        else:
            total += 8
    return total
