"""Tool calls written as Python (the pythonic format: `[get_weather(city="Paris"), get_time(zone="CET")]`):
reading them, writing them, and the grammar of a call's keyword arguments from the tool's JSON schema.

Arguments are Python literals, read with `ast.literal_eval` (never evaluated), so a call's arguments come out as
the JSON object the OpenAI API carries. The grammar (xgrammar's EBNF) writes strings with double quotes and lists
the schema's properties in its order, the required ones always, so that a small model's calls always parse.
"""

from __future__ import annotations

import ast
import json
from typing import Any

OPENING = {"(": ")", "[": "]", "{": "}"}
QUOTES = "\"'"


def closing_bracket(text: str) -> int | None:
    """For `text` opening with a bracket: the index just past the bracket that closes it (brackets and quotes
    inside string literals skipped), or None while it is not closed."""
    stack: list[str] = []
    quote, escaped = "", False
    for i, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in QUOTES:
            quote = char
        elif char in OPENING:
            stack.append(OPENING[char])
        elif stack and char == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return None


def parse_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """The (name, arguments) of each call in a Python list of calls with keyword arguments only, or None when
    the text is not one."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # not Python, a NUL, nesting too deep
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for call in tree.elts:
        if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name):
            return None
        arguments = keyword_values(call.keywords)
        if arguments is None:
            return None
        calls.append((call.func.id, arguments))
    return calls


def parse_arguments(text: str) -> dict[str, Any] | None:
    """Keyword arguments' text (`city="Paris", days=3`) as a dict, or None when it is not that."""
    calls = parse_calls(f"[f({text})]")
    return None if calls is None else calls[0][1]


def keyword_values(keywords: list[ast.keyword]) -> dict[str, Any] | None:
    arguments = {}
    for keyword in keywords:
        if keyword.arg is None:  # **kwargs
            return None
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):  # not a literal (a name, a call)
            return None
    return arguments


def python_literal(value: Any) -> str:
    """A JSON value as Python source: strings double-quoted, True/False/None, lists and dicts."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {python_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)  # strings and numbers: JSON's spelling is Python's


def write_call(name: str, arguments: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{key}={python_literal(value)}' for key, value in arguments.items())})"


# Python literals as xgrammar EBNF rules: double-quoted strings, JSON-like numbers, True/False/None, lists, dicts
LITERAL_RULES = r"""
str ::= "\"" ([^"\\\n] | "\\" ["\\nt'])* "\""
int ::= "-"? ("0" | [1-9] [0-9]*)
num ::= int ("." [0-9]+)? ([eE] [+-]? [0-9]+)?
bool ::= "True" | "False"
none ::= "None"
any ::= str | num | bool | none | list | dict
list ::= "[" (any (", " any)*)? "]"
dict ::= "{" (str ": " any (", " str ": " any)*)? "}"
name ::= [a-zA-Z_] [a-zA-Z0-9_]*
"""
TYPE_RULES = {"string": "str", "integer": "int", "number": "num", "boolean": "bool", "null": "none", "object": "dict"}


def arguments_grammar(schema: dict[str, Any]) -> str:
    """EBNF (root rule `root`) of the keyword arguments of a call under the parameters `schema`: its properties in
    schema order, the required ones always, values of their types; any keyword arguments where it names none."""
    rules: list[str] = []

    def value(s: dict[str, Any]) -> str:
        if "const" in s or "enum" in s:
            return " | ".join(json.dumps(python_literal(v)) for v in ([s["const"]] if "const" in s else s["enum"]))
        alternatives = s.get("anyOf") or s.get("oneOf")
        if alternatives:
            return " | ".join(f"({value(a)})" for a in alternatives)
        types = s.get("type")
        if types is None:
            return "any"
        if isinstance(types, list):
            return " | ".join(value({**s, "type": t}) for t in types)
        if types == "array":
            if "items" not in s:
                return "list"
            rule = f"array{len(rules)}"
            item = value(s["items"])
            rules.append(f'{rule} ::= "[" (({item}) (", " ({item}))*)? "]"')
            return rule
        return TYPE_RULES.get(types, "any")

    properties = schema.get("properties") or {}
    if not properties:
        root = 'root ::= "" | name "=" any (", " name "=" any)*'
    else:
        required = set(schema.get("required") or [])
        keywords = {key: f'"{key}=" ({value(s)})' for key, s in properties.items()}
        needed = [keywords[key] for key in properties if key in required]
        optional = [keywords[key] for key in properties if key not in required]
        tail = "".join(f' (", " {k})?' for k in optional)
        if needed:
            root = "root ::= " + ' ", " '.join(needed) + tail
        else:  # the first argument written has no comma before it
            firsts = [k + "".join(f' (", " {o})?' for o in optional[i + 1 :]) for i, k in enumerate(optional)]
            root = 'root ::= ""' + "".join(f" | {first}" for first in firsts)
    return "\n".join([root, *rules]) + LITERAL_RULES
