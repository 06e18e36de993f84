"""The schema keywords Ember refuses are exactly those the installed xgrammar accepts without enforcing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ember.engine.schema_check import unenforced_keywords

INTEGERS = {"type": "array", "items": {"type": "integer"}}
PAIR = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}

# keyword: (a schema using it, a valid instance, an instance that breaks only that keyword)
UNENFORCED: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "not": ({"not": {"type": "string"}}, 1, "s"),
    "if": ({"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 5}}, 3, 7),
    "contains": ({**INTEGERS, "contains": {"const": 5}}, [5], [1]),
    "minContains": ({**INTEGERS, "contains": {"const": 5}, "minContains": 2}, [5, 5], [5, 1]),
    "maxContains": ({**INTEGERS, "contains": {"const": 5}, "maxContains": 1}, [5, 1], [5, 5]),
    "dependentRequired": ({**PAIR, "dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
    "dependentSchemas": ({**PAIR, "dependentSchemas": {"a": {"required": ["b"]}}}, {"a": 1, "b": 2}, {"a": 1}),
    "multipleOf": ({"type": "number", "multipleOf": 0.5}, 1.5, 0.3),
    "uniqueItems": ({**INTEGERS, "uniqueItems": True}, [1, 2], [1, 1]),
    "allOf": ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "ab", "abc"),
}
ENFORCED: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "multipleOf on integers": ({"type": "integer", "multipleOf": 3}, 6, 4),
    "allOf of one schema": ({"allOf": [{"type": "string", "maxLength": 2}]}, "ab", "abc"),
    "pattern": ({"type": "string", "pattern": "^a+$"}, "aa", "b"),
    "maxItems": ({**INTEGERS, "maxItems": 1}, [1], [1, 2]),
    "required": ({**PAIR, "required": ["a"]}, {"a": 1}, {"b": 1}),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "s"),
    "format": ({"type": "string", "format": "date"}, "2024-01-02", "yesterday"),
    "exclusiveMaximum": ({"type": "number", "exclusiveMaximum": 2}, 1.5, 2.0),
}


def grammar_accepts(schema: dict[str, Any], instance: Any) -> bool:
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    return bool(_is_grammar_accept_string(grammar, json.dumps(instance)))


@pytest.mark.parametrize("keyword", UNENFORCED)
def test_each_refused_keyword_is_one_xgrammar_lets_through(keyword: str) -> None:
    """If xgrammar starts enforcing one, this fails: take it off the list."""
    schema, valid, breaking = UNENFORCED[keyword]
    assert grammar_accepts(schema, valid) and grammar_accepts(schema, breaking)
    assert any(f"'{keyword}'" in found for found in unenforced_keywords(schema))


@pytest.mark.parametrize("keyword", ENFORCED)
def test_keywords_xgrammar_enforces_pass(keyword: str) -> None:
    schema, valid, breaking = ENFORCED[keyword]
    assert grammar_accepts(schema, valid) and not grammar_accepts(schema, breaking)
    assert list(unenforced_keywords(schema)) == []


def test_keywords_are_found_in_subschemas_and_named_by_path() -> None:
    schema = {
        "type": "object",
        "properties": {
            "not": {"type": "string"},  # a property named like a keyword
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "choice": {"enum": [{"not": 1}], "const": {"if": 2}},  # data, not schemas
            "any": {"anyOf": [{"type": "number", "multipleOf": 0.1}, {"$ref": "#/$defs/node"}]},
        },
        "$defs": {"node": {"type": "object", "additionalProperties": {"not": {"type": "null"}}}},
    }
    assert sorted(unenforced_keywords(schema)) == [
        "'multipleOf' at #/properties/any/anyOf/0 (on numbers)",
        "'not' at #/$defs/node/additionalProperties",
        "'uniqueItems' at #/properties/tags",
    ]
