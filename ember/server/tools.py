"""Tool calling: the tools into the prompt, a grammar that keeps every call well formed, the calls out of the text.

Each model family writes calls its own way, a `ToolCallFormat`:
- Hermes (Qwen2.5, Qwen3, Hermes; vLLM's `hermes`): a block per call,
  `<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>`;
- Llama 3.1-3.3 (vLLM's `llama3_json`): the reply is the call, `{"name": "get_weather", "parameters": {"city":
  "Paris"}}`, several joined by "; ";
- Mistral (7B-v0.3, Nemo, Small; vLLM's `mistral`): the special token `[TOOL_CALLS]`, then the calls as one JSON
  array, `[{"name": "get_weather", "arguments": {"city": "Paris"}}]`; ids of 9 letters and digits;
- Mistral's v11 tokenizers (Small 3.1+, Devstral, Magistral; vLLM's `mistral` on such a tokenizer): per call the
  special tokens `[TOOL_CALLS]`, the name, `[ARGS]`, then the arguments' JSON: `[TOOL_CALLS]get_weather[ARGS]{"city":
  "Paris"}`, several back to back;
- Qwen3-Coder and Qwen3.5 (vLLM's `qwen3_coder`): a block per call, each argument an XML-like element whose text
  is the value, `<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>`;
- pythonic (Llama 3.2 and 4 with vLLM's pythonic templates, which vLLM also offers for Gemma 3; vLLM's
  `pythonic`): the reply is a Python list of calls and nothing else, `[get_weather(city="Paris")]`.
The server speaks the format its chat template speaks (`--tool-call-parser auto`), or the one named. A model
whose template speaks the format gets the tools through its own template; any other (SmolLM2's template knows no
tools) gets Ember's own system instructions for it. Unless `tool_choice` is "none", an xgrammar structural tag
constrains the output, so that even a small model's calls always parse:
- "auto": free text, optionally followed by calls and nothing after them: the reply ends where the client must
  run the tools;
- "required": only calls, at least one; a named function: exactly one call of it.
Each call names one of the tools, with arguments valid under its parameters' schema.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import secrets
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.engine.structured_output import StructuredOutputs
from ember.server import python_calls
from ember.server.protocol import NamedToolChoice, Tool

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
HOLE = "\x00"  # where a call's arguments go, in `ToolCallFormat.write`


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family of models writes a tool call: `before` + `{"name": ..., "<arguments_key>": ...}` + `after`,
    several in one reply joined by `separator`, all of them between `group`'s two texts (Mistral's JSON array).
    `trigger` starts the calls; the free text of a reply never holds it. `marks`: what a chat template that speaks
    the format contains (besides `tools`). `parallel`: whether a reply holds several calls when the request does
    not say (Llama 3's template takes one per turn). `special_trigger`: the trigger is a special token, which the
    reply's text must keep. `short_ids`: call ids of 9 letters and digits (Mistral's templates take no others)."""

    name: str
    trigger: str
    marks: tuple[str, ...]
    separator: str
    before: str = ""
    after: str = ""
    arguments_key: str = "arguments"
    parallel: bool = True
    group: tuple[str, str] = ("", "")
    special_trigger: bool = False
    short_ids: bool = False
    argument_style: str = "json"  # how the grammar lays out arguments: xgrammar's JSONSchemaFormat style, or "python"
    # a reply is either text or calls (the trigger, "[", is too common in text to keep out of it)
    calls_alone: bool = False
    # the request's tools, name -> parameters schema (`for_tools`): their calls' opening tags are known, so that
    # they stream as they are written (tool_stream.py)
    parameters: Mapping[str, dict[str, Any]] = dataclasses.field(default_factory=dict, compare=False)

    def for_tools(self, tools: list[Tool]) -> ToolCallFormat:
        """The format for a request offering `tools`."""
        schemas = {schema["function"]["name"]: schema["function"]["parameters"] for schema in tool_schemas(tools)}
        return dataclasses.replace(self, parameters=schemas)

    def speaks(self, chat_template: str | None) -> bool:
        """Whether `chat_template` renders `tools` and calls in this format itself."""
        return bool(chat_template and "tools" in chat_template and all(m in chat_template for m in self.marks))

    def write(self, name_json: str, arguments_json: str) -> str:
        """A call's text, from its name and arguments as JSON text."""
        return f'{self.before}{{"name": {name_json}, "{self.arguments_key}": {arguments_json}}}{self.after}'

    def render(self, calls: list[tuple[str, Any]]) -> str:
        """Earlier calls, (name, arguments), as the model writes them (for conversations sent back with them)."""
        written = [self.write(json.dumps(n, ensure_ascii=False), json.dumps(a, ensure_ascii=False)) for n, a in calls]
        return self.group[0] + self.separator.join(written) + self.group[1]

    def example(self) -> str:
        """A call with placeholders, for Ember's own instructions."""
        return self.group[0] + self.write('"<function name>"', "{<arguments as a JSON object>}") + self.group[1]

    def tag(self, name: str) -> tuple[str, str]:
        """The text around a call of `name`'s arguments: the grammar's begin and end of its tag."""
        begin, end = self.write(json.dumps(name, ensure_ascii=False), HOLE).split(HOLE)
        return begin, end

    def call_end(self, text: str) -> tuple[int, str] | None:
        """For `text` that starts with `trigger`: where the call (or the group of calls) ends, and its JSON text;
        None while it is not complete (a block's closing tag, or the JSON value's last bracket, has not come)."""
        if self.after:
            end = text.find(self.after.strip())
            return None if end < 0 else (end + len(self.after.strip()), text[len(self.trigger) : end])
        start = len(self.trigger) if self.group[0] else 0  # a group: the JSON array after the trigger
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            _, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        return end, text[start:end]

    def parse(self, block: str) -> list[ParsedToolCall] | None:
        """The calls in a call's (or a group's) JSON text, or None when it is not calls."""
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            return None
        written = value if self.group[0] else [value]
        if not isinstance(written, list) or not written:
            return None
        calls = []
        for call in written:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return None
            arguments = call.get(self.arguments_key, call.get("arguments", {}))
            calls.append(ParsedToolCall(self.new_id(), call["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls

    def new_id(self) -> str:
        if self.short_ids:
            return "".join(secrets.choice(ID_CHARACTERS) for _ in range(SHORT_ID_LENGTH))
        return f"call_{uuid.uuid4().hex[:24]}"

    def template_id(self, call_id: str) -> str:
        """A call id as the chat template takes it: for `short_ids`, any other id mapped to 9 letters and digits
        (the same each time, so that a call and its result still match)."""
        if not self.short_ids or (len(call_id) == SHORT_ID_LENGTH and call_id.isalnum()):
            return call_id
        digest = hashlib.sha256(call_id.encode()).digest()
        return "".join(ID_CHARACTERS[b % len(ID_CHARACTERS)] for b in digest[:SHORT_ID_LENGTH])


@dataclass(frozen=True)
class XMLToolCallFormat(ToolCallFormat):
    """Qwen3-Coder's and Qwen3.5's calls: `<function=NAME>` and one `<parameter=KEY>` element per argument in a
    `<tool_call>` block. A value's text is a string as written or another value as JSON (or, as these models'
    templates write them, Python's True, False and None): `parameters`, each tool's schema, says which."""

    def tag(self, name: str) -> tuple[str, str]:
        return f"{self.trigger}\n<function={name}>\n", "</function>\n</tool_call>"

    def render(self, calls: list[tuple[str, Any]]) -> str:
        blocks = []
        for name, arguments in calls:
            if not isinstance(arguments, dict):
                raise ValueError(f"a tool call's arguments must be a JSON object, not {arguments!r}")
            begin, end = self.tag(name)
            elements = "".join(
                f"<parameter={key}>\n{_xml_text(value)}\n</parameter>\n" for key, value in arguments.items()
            )
            blocks.append(begin + elements + end)
        return self.separator.join(blocks)

    def example(self) -> str:
        begin, end = self.tag("<function name>")
        return begin + "<parameter=<parameter name>>\n<its value>\n</parameter>\n" + end

    def parse(self, block: str) -> list[ParsedToolCall] | None:
        """The call in a block's text (between `<tool_call>` and `</tool_call>`), or None when it is none."""
        function = XML_FUNCTION.fullmatch(block)
        if function is None:
            return None
        name, body = function.group(1).strip(), function.group(2)
        if XML_PARAMETER.sub("", body).strip():  # text beside the parameters: not a call
            return None
        properties = self.parameters.get(name, {}).get("properties", {})
        arguments = {key: xml_value(text, properties.get(key)) for key, text in XML_PARAMETER.findall(body)}
        return [ParsedToolCall(self.new_id(), name, json.dumps(arguments, ensure_ascii=False))]


@dataclass(frozen=True)
class NamedArgumentsFormat(ToolCallFormat):
    """Mistral's v11 calls: `trigger`, the function's name, `name_end`, the arguments as a JSON object."""

    name_end: str = "[ARGS]"

    def tag(self, name: str) -> tuple[str, str]:
        return f"{self.trigger}{name}{self.name_end}", ""

    def render(self, calls: list[tuple[str, Any]]) -> str:
        return self.separator.join(
            self.tag(name)[0] + json.dumps(arguments, ensure_ascii=False) for name, arguments in calls
        )

    def example(self) -> str:
        return self.tag("<function name>")[0] + "{<arguments as a JSON object>}"

    def call_end(self, text: str) -> tuple[int, str] | None:
        """Where the call's JSON object ends (None while it is not complete), and the call's text after the trigger."""
        name_end = text.find(self.name_end, len(self.trigger))
        if name_end < 0:
            return None
        start = name_end + len(self.name_end)
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            _, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        return end, text[len(self.trigger) : end]

    def parse(self, block: str) -> list[ParsedToolCall] | None:
        name, _, arguments_text = block.partition(self.name_end)
        try:
            arguments = json.loads(arguments_text)
        except json.JSONDecodeError:
            return None
        if not FUNCTION_NAME.fullmatch(name) or not isinstance(arguments, dict):
            return None
        return [ParsedToolCall(self.new_id(), name, json.dumps(arguments, ensure_ascii=False))]


@dataclass(frozen=True)
class PythonicFormat(ToolCallFormat):
    """Calls as Python: `[name(key=value, ...), ...]`, arguments Python literals (python_calls.py)."""

    def tag(self, name: str) -> tuple[str, str]:
        return f"{name}(", ")"

    def render(self, calls: list[tuple[str, Any]]) -> str:
        for _, arguments in calls:
            if not isinstance(arguments, dict):
                raise ValueError(f"a tool call's arguments must be a JSON object, not {arguments!r}")
        return "[" + self.separator.join(python_calls.write_call(name, arguments) for name, arguments in calls) + "]"

    def example(self) -> str:
        return '[function_name(parameter="a string", other_parameter=1), other_function()]'

    def call_end(self, text: str) -> tuple[int, str] | None:
        end = python_calls.closing_bracket(text)
        return None if end is None else (end, text[:end])

    def parse(self, block: str) -> list[ParsedToolCall] | None:
        calls = python_calls.parse_calls(block)
        if calls is None:
            return None
        return [ParsedToolCall(self.new_id(), name, json.dumps(args, ensure_ascii=False)) for name, args in calls]


FUNCTION_NAME = re.compile(r"[\w.-]+")  # OpenAI's names are letters, digits, '_' and '-'
XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.DOTALL)
XML_PARAMETER = re.compile(r"<parameter=([^>\n]+?)>(.*?)</parameter>", re.DOTALL)
PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def _xml_text(value: Any) -> str:
    """A value as these models write it: a string bare, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _schema_types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a schema admits (its `type`, or those of its anyOf/oneOf branches); empty: any."""
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else set(kind or ())
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        for branch in branches if isinstance(branches, list) else []:
            types |= _schema_types(branch) if isinstance(branch, dict) else set()
    return types


def reads_as_text(schema: dict[str, Any] | None) -> bool:
    """Whether a parameter's value is its element's text whatever it says: a string parameter that cannot be
    null, or one the schema does not know."""
    types = _schema_types(schema) if isinstance(schema, dict) else {"string"}
    return "string" in types and "null" not in types


def xml_value(text: str, schema: dict[str, Any] | None) -> Any:
    """A parameter's value from its element's text, less the newline the format puts on either side: a string
    where the schema takes one (or does not know the parameter), else the JSON (or Python literal) it spells,
    else the text itself."""
    text = text.removeprefix("\n").removesuffix("\n")
    types = _schema_types(schema) if isinstance(schema, dict) else {"string"}
    if reads_as_text(schema) or ("string" in types and text.strip() not in ("null", "None")):
        return text
    literal = text.strip()
    if literal in PYTHON_LITERALS:
        return PYTHON_LITERALS[literal]
    try:
        return json.loads(literal)
    except json.JSONDecodeError:
        pass
    try:
        value = ast.literal_eval(literal)  # a dict or list in Python's spelling ('single quotes', True)
        json.dumps(value)  # a set, bytes or a complex number is no JSON value: the text stays
        return value
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


ID_CHARACTERS = string.ascii_letters + string.digits
SHORT_ID_LENGTH = 9
HERMES = ToolCallFormat("hermes", "<tool_call>", ("<tool_call>",), "\n", before="<tool_call>\n", after="\n</tool_call>")
# its instructions' format and the role its tool results take mark its templates; they take one call per turn
LLAMA3_JSON = ToolCallFormat(
    "llama3_json", '{"name"', ('"parameters"', "ipython"), "; ", arguments_key="parameters", parallel=False
)
# Mistral-7B-Instruct-v0.3, Mistral-Nemo, Mistral-Small 2409/2501 (v3 tokenizers): the JSON-array form
MISTRAL = ToolCallFormat(
    "mistral",
    "[TOOL_CALLS]",
    ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]"),
    ", ",
    group=("[TOOL_CALLS][", "]"),
    special_trigger=True,
    short_ids=True,
)
# Mistral Small 3.1+, Devstral, Magistral (v11 tokenizers and later): looked for before the v3 form
MISTRAL_V11 = NamedArgumentsFormat(
    "mistral_v11", "[TOOL_CALLS]", ("[TOOL_CALLS]", "[ARGS]"), "", special_trigger=True, short_ids=True
)
# its templates hold `<tool_call>` too: it is looked for before Hermes
QWEN3_CODER = XMLToolCallFormat(
    "qwen3_coder", "<tool_call>", ("<function=", "<parameter="), "\n", after="\n</tool_call>", argument_style="qwen_xml"
)
# the instructions of vLLM's pythonic templates (Llama 3.2, Llama 4, Gemma 3) name their parameters so
PYTHONIC = PythonicFormat(
    "pythonic", "[", ("[func_name1(",), ", ", group=("[", "]"), argument_style="python", calls_alone=True
)
TOOL_CALL_FORMATS = {f.name: f for f in (QWEN3_CODER, HERMES, LLAMA3_JSON, MISTRAL_V11, MISTRAL, PYTHONIC)}


def tool_call_format(name: str, chat_template: str | None) -> ToolCallFormat:
    """`--tool-call-parser`: the format named, or for "auto" the one `chat_template` speaks (Hermes when none);
    "mistral" is the v11 form where the template speaks it."""
    if name == "mistral" and MISTRAL_V11.speaks(chat_template):  # as vLLM's `mistral`: the form the model speaks
        return MISTRAL_V11
    if name != "auto":
        return TOOL_CALL_FORMATS[name]
    return next((f for f in TOOL_CALL_FORMATS.values() if f.speaks(chat_template)), HERMES)


def tool_schemas(tools: list[Tool]) -> list[dict[str, Any]]:
    """The tools as OpenAI function objects, with a parameters schema for every function."""
    schemas = []
    for tool in tools:
        function = tool.function.model_dump(exclude_none=True)
        function["parameters"] = tool.function.parameters or NO_PARAMETERS
        schemas.append({"type": "function", "function": function})
    return schemas


CALL_INSTRUCTIONS = {
    "block": "To call a function, reply with a block like this one for each call:",
    "json": "To call a function, reply with a JSON object like this one for each call:",
    "pythonic": "To call functions, reply with nothing but a Python list of the calls, like this one:",
}


def tools_instructions(tools: list[Tool], fmt: ToolCallFormat) -> str:
    """Ember's system-prompt section for models whose template knows no tools (or not `fmt`)."""
    lines = "\n".join(json.dumps(schema["function"], ensure_ascii=False) for schema in tool_schemas(tools))
    example = fmt.example()
    return (
        "You can call functions (tools) to help with the user's request. The available functions, one JSON "
        f"signature per line, are:\n<tools>\n{lines}\n</tools>\n\n"
        f"{CALL_INSTRUCTIONS.get(fmt.name, CALL_INSTRUCTIONS['block' if fmt.after else 'json'])}\n{example}\n"
        "The results come back in <tool_response></tool_response> blocks. Answer directly when no function helps."
    )


def tool_call_constraint(
    tools: list[Tool], tool_choice: str | NamedToolChoice | None, parallel_tool_calls: bool, fmt: ToolCallFormat
) -> StructuredOutputs:
    """The structural tag that keeps calls to `tools`, written in `fmt`, well formed under `tool_choice` ("auto",
    "required" or a named function; the caller handles "none")."""
    from xgrammar import structural_tag as st

    if isinstance(tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == tool_choice.function.name]
        parallel_tool_calls = False
    tags = []
    for schema in tool_schemas(tools):
        begin, end = fmt.tag(schema["function"]["name"])
        parameters = schema["function"]["parameters"]
        # a small model left free pads JSON with whitespace until max_tokens: at most one blank at a time
        content: Any = (
            st.GrammarFormat(grammar=python_calls.arguments_grammar(parameters))
            if fmt.argument_style == "python"
            else st.JSONSchemaFormat(json_schema=parameters, style=fmt.argument_style, max_whitespace_cnt=1)
        )
        tags.append(st.TagFormat(begin=begin, content=content, end=end))
    calls: Any = st.TagsWithSeparatorFormat(
        tags=tags, separator=fmt.separator, at_least_one=True, stop_after_first=not parallel_tool_calls
    )
    if fmt.group[0]:
        opening, closing = (st.ConstStringFormat(value=text) for text in fmt.group)
        calls = st.SequenceFormat(elements=[opening, calls, closing])
    if tool_choice not in (None, "auto"):
        reply = calls
    elif fmt.calls_alone:  # text that does not open with the trigger, or calls
        text = st.SequenceFormat(elements=[st.RegexFormat(pattern=f"[^{re.escape(fmt.trigger)}]"), st.AnyTextFormat()])
        reply = st.OrFormat(elements=[text, calls])
    else:
        text = st.AnyTextFormat(excludes=[fmt.trigger])
        reply = st.OrFormat(elements=[text, st.SequenceFormat(elements=[text, calls])])
    return StructuredOutputs(structural_tag=st.StructuralTag(format=reply).model_dump_json())


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}
