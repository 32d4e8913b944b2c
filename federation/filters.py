"""Per-peer filters: CloudEvents Subscriptions API filter expressions (README "Routing: scopes and filters"). Pure: no Django.

A peer's `filters` is a list of expressions that must all match for an event to go to it, on
top of its scopes. Each expression is an object with exactly one dialect:

- `exact`, `prefix`, `suffix`: `{attribute: string, …}`; every attribute named must be present
  and equal / start with / end with the string (case-sensitive). An attribute the event lacks
  does not match (so `{"not": {"exact": {"subject": "test"}}}` lets an event without a subject go).
- `all`, `any`: a non-empty list of expressions; `not`: one expression.

The optional `sql` dialect (CloudEvents SQL) is not supported, and as the specification asks of
an unsupported dialect, a peer naming it is refused when saved. Expressions are evaluated on the
context attributes the peer would receive, in their canonical string form (an integer extension
`kitefedhops: 2` is "2", a boolean is "true" / "false").
"""

import json
import re
from collections.abc import Mapping

ATTRIBUTE_NAME = re.compile(r"[a-z0-9]{1,20}")  # the CloudEvents rule; ingest stores no longer names
MAX_DEPTH = 8  # a top-level expression is at depth 1
MAX_EXPRESSIONS = 32  # in all, nested ones included
MAX_ATTRIBUTES = 16  # named by one exact / prefix / suffix
MAX_VALUE = 1000  # characters; as long as an extension value may be
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")  # as ingest refuses in attribute values
MAX_BYTES = 16_384  # the whole list as compact JSON: every route cache holds it
COMPARISONS = {"exact": str.__eq__, "prefix": str.startswith, "suffix": str.endswith}
DIALECTS = ("exact", "prefix", "suffix", "all", "any", "not")
SHAPE = "a filter expression is an object with exactly one dialect: exact, prefix, suffix, all, any or not"


class InvalidFilters(ValueError):
    """The first wrong part of a filter list: `path` names it, e.g. `filters[1].not.exact`."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def validate(filters) -> list:
    """`filters` unchanged when every expression is well formed; else InvalidFilters."""
    if not isinstance(filters, list):
        raise InvalidFilters("filters", 'must be a list of filter expressions, e.g. [{"prefix": {"type": "com.'
                                        'stripe."}}] ([] for none)')  # fmt: skip
    seen = [0]
    for index, expression in enumerate(filters):
        _check(expression, f"filters[{index}]", 1, seen)
    size = len(json.dumps(filters, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_BYTES:
        raise InvalidFilters("filters", f"at most {MAX_BYTES} bytes as JSON ({size} given)")
    return filters


def _check(expression, path: str, depth: int, seen: list[int]) -> None:
    seen[0] += 1
    if seen[0] > MAX_EXPRESSIONS:
        raise InvalidFilters(path, f"more than {MAX_EXPRESSIONS} filter expressions in all (nested ones count)")
    if depth > MAX_DEPTH:
        raise InvalidFilters(path, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(expression, dict) or len(expression) != 1:
        raise InvalidFilters(path, SHAPE)
    ((dialect, body),) = expression.items()
    if dialect == "sql":
        raise InvalidFilters(f"{path}.sql", "the sql dialect (CloudEvents SQL) is not supported: use exact, prefix, "
                                            "suffix, all, any and not")  # fmt: skip
    if dialect not in DIALECTS:
        raise InvalidFilters(path, f"unknown dialect {dialect[:40]!r}: {SHAPE}")
    path = f"{path}.{dialect}"
    if dialect in COMPARISONS:
        _check_comparison(body, path)
    elif dialect == "not":
        if not isinstance(body, dict):
            raise InvalidFilters(path, "must be one filter expression (an object), e.g. "
                                       '{"not": {"exact": {"subject": "test"}}}')  # fmt: skip
        _check(body, path, depth + 1, seen)
    else:
        if not isinstance(body, list) or not body:
            raise InvalidFilters(path, "must be a non-empty list of filter expressions")
        for index, nested in enumerate(body):
            _check(nested, f"{path}[{index}]", depth + 1, seen)


def _check_comparison(body, path: str) -> None:
    if not isinstance(body, dict) or not body or len(body) > MAX_ATTRIBUTES:
        raise InvalidFilters(path, f"must be an object of 1-{MAX_ATTRIBUTES} attribute names to strings, e.g. "
                                   '{"type": "com.stripe."}')  # fmt: skip
    for name, value in body.items():
        if not ATTRIBUTE_NAME.fullmatch(name):
            raise InvalidFilters(path, f"{name[:40]!r} is not a CloudEvents attribute name (1-20 lower-case "
                                       "letters a-z and digits 0-9)")  # fmt: skip
        if not isinstance(value, str) or not value:
            raise InvalidFilters(f"{path}.{name}", "must be a non-empty string")
        if len(value) > MAX_VALUE:
            raise InvalidFilters(f"{path}.{name}", f"must be at most {MAX_VALUE} characters")
        if UNPRINTABLE.search(value):
            raise InvalidFilters(f"{path}.{name}", "must be printable text (no control characters)")


def matches(filters: list, attributes: Mapping[str, str]) -> bool:
    """Every expression of a validated list matches the event's attributes (an empty list: yes)."""
    return all(_matches(expression, attributes) for expression in filters)


def _matches(expression: dict, attributes: Mapping[str, str]) -> bool:
    ((dialect, body),) = expression.items()
    compare = COMPARISONS.get(dialect)
    if compare is not None:
        for name, wanted in body.items():
            value = attributes.get(name)
            if value is None or not compare(value, wanted):
                return False
        return True
    if dialect == "all":
        return all(_matches(nested, attributes) for nested in body)
    if dialect == "any":
        return any(_matches(nested, attributes) for nested in body)
    return not _matches(body, attributes)  # not


def canonical(attributes: Mapping) -> dict[str, str]:
    """CloudEvents context attributes as the strings filters compare: integers in decimal, booleans
    as true / false; a value of no attribute type (None, a list) is left out."""
    shown = {}
    for name, value in attributes.items():
        if isinstance(value, bool):
            shown[name] = "true" if value else "false"
        elif isinstance(value, (str, int)):
            shown[name] = str(value)
    return shown
