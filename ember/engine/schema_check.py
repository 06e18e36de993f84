"""The JSON-schema keywords that xgrammar (0.2.x) accepts but does not enforce.

xgrammar compiles such a schema with a warning, or none, and the output may then break the keyword: a
`uniqueItems` array with repeats, a `multipleOf: 0.5` number of 0.3. Each keyword here was checked by asking
the compiled grammar to accept an instance that breaks only that keyword (see the test of this module).
Ember refuses these schemas rather than promise output that may not match. `oneOf` is left out: xgrammar
reads it as `anyOf`, which differs only where the branches overlap (a discriminated union's do not).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

ALWAYS_UNENFORCED = ("not", "if", "then", "else", "contains", "minContains", "maxContains")
ALWAYS_UNENFORCED += ("dependentRequired", "dependentSchemas")

# where subschemas sit: maps of name to schema, lists of schemas, and single schemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "unevaluatedProperties", "propertyNames", "not", "if", "then")
_SCHEMA_VALUES += ("else", "contains", "additionalItems", "unevaluatedItems")


def unenforced_keywords(schema: Any, path: str = "#") -> Iterator[str]:
    """Each keyword of `schema` (and its subschemas) that the grammar would not enforce, as `'keyword' at
    path`, the path a JSON pointer."""
    if not isinstance(schema, dict):
        return
    for keyword in ALWAYS_UNENFORCED:
        if keyword in schema:
            yield f"'{keyword}' at {path}"
    if "multipleOf" in schema and schema.get("type") != "integer":  # enforced on integers only
        yield f"'multipleOf' at {path} (on numbers)"
    if schema.get("uniqueItems") is True:
        yield f"'uniqueItems' at {path}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        yield f"'allOf' of several schemas at {path}"
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from unenforced_keywords(sub, f"{path}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for index, sub in enumerate(schema[key]):
                yield from unenforced_keywords(sub, f"{path}/{key}/{index}")
    for key in _SCHEMA_VALUES:
        yield from unenforced_keywords(schema.get(key), f"{path}/{key}")


def check_enforceable(schema: Any) -> None:
    """Raise ValueError naming each keyword of `schema` the grammar would not enforce."""
    unenforced = list(unenforced_keywords(schema))
    if unenforced:
        raise ValueError(
            f"the schema uses {', '.join(unenforced)}, which the grammar engine accepts but does not enforce: "
            "remove it (and check that rule on the output yourself)"
        )
