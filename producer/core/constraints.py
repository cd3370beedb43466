"""What the request models share beyond pydantic: integers read as JSON Schema has them,
and what their JSON Schema says of a check a validator makes in its own words.

pydantic only; the contract (:mod:`producer.core.contract`), the training's request and
the OpenAI bodies use it.
"""

from __future__ import annotations

from typing import Any

#: A list that repeats no value (the validator says "must not repeat").
DISTINCT: dict[str, Any] = {"uniqueItems": True}
#: What ``str.strip()`` strips: Python's whitespace, which is not JSON Schema's ``\s``
#: (ECMA-262's has U+FEFF and lacks U+001C-U+001F and U+0085).
_SPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
#: Text that is not blank (the validator says "must not be blank"): one character that
#: ``strip()`` keeps.
NOT_BLANK: dict[str, Any] = {"pattern": f"[^{_SPACE}]"}


def integral(value: Any) -> Any:
    """An integer field's value as JSON Schema has integers: ``3.0`` (a number without a
    fraction) is 3, a list's items alike; anything else as it is (bool, text: refused)."""
    if isinstance(value, list):
        return [integral(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def only_with(field: str, other: str) -> dict[str, Any]:
    """JSON Schema for "``field`` set (not null) only with ``other`` set"."""
    not_null = {"not": {"type": "null"}}
    return {
        "if": {"properties": {field: not_null}, "required": [field]},
        "then": {"properties": {other: not_null}, "required": [other]},
    }
