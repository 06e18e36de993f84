"""Tool calls out of generated text as it streams in: a call's name as soon as it is written, then its arguments
piece by piece, so that a client watches a long call (a file's whole content, say) being written.

Under the tool grammar (tools.py) a call opens with exactly its format's tag for one of the request's tools, so
the name is known once that tag is complete; the arguments are then read as they come: their JSON text as
written, or, in the XML form, JSON made from the parameter elements (a string parameter's text streaming too).
Text that opens a call in another way (no grammar, no tools bound to the format) is read whole once complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ember.server import python_calls
from ember.server.tools import ParsedToolCall, ToolCallFormat, reads_as_text, xml_value


@dataclass
class ToolCallDelta:
    """A piece of a tool call: the first of a call carries its id and name, the last (`done`) the whole call;
    the `arguments` pieces of a call joined are its arguments' JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    done: ParsedToolCall | None = None


class ArgumentsReader(Protocol):
    def feed(self, text: str) -> tuple[int, str, bool]:
        """For the call's text not read yet: how much of it was read, the arguments' JSON text it made, and
        whether the arguments are complete. Text kept back (a possible closing tag) comes again next time."""
        ...


class PythonArgumentsReader:
    """Keyword arguments written as Python (the pythonic format): read as they come, given out whole as JSON once
    the call's parenthesis closes (a Python literal is no JSON text to pass on piece by piece)."""

    def __init__(self) -> None:
        self.text = ""

    def feed(self, text: str) -> tuple[int, str, bool]:
        self.text += text
        end = python_calls.closing_bracket("(" + self.text)
        if end is None:
            return len(text), "", False
        written = self.text[: end - 2]  # up to the closing parenthesis, which the call's end reads
        arguments = python_calls.parse_arguments(written)
        unread = len(self.text) - len(written)
        return len(text) - unread, json.dumps(arguments or {}, ensure_ascii=False), True


class JSONArgumentsReader:
    """Arguments written as JSON: the value's text as it comes, complete at the bracket that closes it."""

    def __init__(self) -> None:
        self.started = False  # past the blanks before the value
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> tuple[int, str, bool]:
        start = 0
        if not self.started:
            start = len(text) - len(text.lstrip())
            if start == len(text):
                return start, "", False
            self.started = True
        for i in range(start, len(text)):
            char = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, text[start : i + 1], True
        return len(text), text[start:], False


PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"


class XMLArgumentsReader:
    """Qwen3-Coder's `<parameter=KEY>` elements as the JSON object `{"KEY": value, ...}`: a parameter read as
    text streams as a JSON string as it comes (less the newline the format puts on either side of it); another
    is converted (tools.xml_value) once its element closes. Complete at the first thing that is no element."""

    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties
        self.count = 0
        self.key: str | None = None  # the parameter being read
        self.as_text = False  # its value streams as a string
        self.value_started = False  # past the newline that opens its value
        self.opened = False  # the object's "{" is written

    def feed(self, text: str) -> tuple[int, str, bool]:
        out = [] if self.opened else ["{"]
        self.opened = True
        read = 0
        while True:
            rest = text[read:]
            if self.key is None:
                blank = len(rest) - len(rest.lstrip())
                read, rest = read + blank, rest[blank:]
                if rest.startswith(PARAMETER_OPEN):
                    close = rest.find(">", len(PARAMETER_OPEN))
                    if close < 0:
                        return read, "".join(out), False
                    self.key = rest[len(PARAMETER_OPEN) : close]
                    read += close + 1
                    schema = self.properties.get(self.key)
                    self.as_text, self.value_started = reads_as_text(schema), False
                    comma = ", " if self.count else ""
                    out.append(f"{comma}{json.dumps(self.key, ensure_ascii=False)}: " + ('"' if self.as_text else ""))
                    self.count += 1
                    continue
                if not rest or PARAMETER_OPEN.startswith(rest) or "</function>".startswith(rest):
                    return read, "".join(out), False  # maybe another element, maybe the end
                out.append("}")
                return read, "".join(out), True
            if not self.as_text:  # converted whole: wait for the element to close
                end = rest.find(PARAMETER_CLOSE)
                if end < 0:
                    return read, "".join(out), False
                out.append(json.dumps(xml_value(rest[:end], self.properties.get(self.key)), ensure_ascii=False))
                read += end + len(PARAMETER_CLOSE)
                self.key = None
                continue
            if not self.value_started:
                if not rest:
                    return read, "".join(out), False
                if rest.startswith("\n"):
                    read, rest = read + 1, rest[1:]
                self.value_started = True
            end = rest.find(PARAMETER_CLOSE)
            if end >= 0:
                out.append(_json_string_body(rest[:end].removesuffix("\n")) + '"')
                read += end + len(PARAMETER_CLOSE)
                self.key = None
                continue
            kept = max(_longest_prefix_at_end(rest, tag) for tag in (PARAMETER_CLOSE, "\n" + PARAMETER_CLOSE))
            out.append(_json_string_body(rest[: len(rest) - kept]))
            return read + len(rest) - kept, "".join(out), False


def _json_string_body(text: str) -> str:
    """`text` escaped as inside a JSON string (escaping goes character by character: pieces join up)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _longest_prefix_at_end(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (it may be the tag's start)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


@dataclass
class _OpenCall:
    """A call being streamed."""

    index: int
    id: str
    name: str
    end: str  # the text that closes it after its arguments
    reader: ArgumentsReader
    arguments: list[str] = field(default_factory=list)
    arguments_done: bool = False


class ToolCallParser:
    """Splits generated text, as it streams in, into content and the tool calls written in `fmt`: text that may
    be the start of a call is held back until it is known; a call of a tool bound to `fmt` streams as it is
    written; another call is read whole, and one that does not parse stays content; the separator after a call
    is neither."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self.pending = ""
        self.num_calls = 0
        self.after_call = False  # the text so far ends with a call: its separator may come next
        self.in_group = False  # inside Mistral's array of calls, after a call's separator
        self.call: _OpenCall | None = None
        self.text_written = False  # for a format whose calls come alone: text came, so no call will
        begins = {name: fmt.tag(name)[0] for name in fmt.parameters}
        self.openings = {fmt.group[0] + begin: name for name, begin in begins.items()}  # a reply's first call
        self.group_openings = {begin: name for name, begin in begins.items()}  # the group's later calls

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """New content and pieces of calls, given the next piece of text."""
        self.pending += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self.pending:
            if self.text_written:
                content.append(self.pending)
                self.pending = ""
            elif self.call is not None:
                if not self._continue_call(deltas):
                    break
            elif self.after_call:
                if not self._after_call():
                    break
            elif self.in_group:
                if self._open_call(self.group_openings, deltas):
                    continue
                if any(opening.startswith(self.pending) for opening in self.group_openings):
                    break  # maybe the next call's opening
                self.in_group = False  # not a call: the group is broken, the rest is text
            elif self._open_call(self.openings, deltas):
                self.in_group = bool(self.fmt.group[0])
            elif any(opening.startswith(self.pending) for opening in self.openings):
                break  # maybe a call's opening
            elif self.pending.startswith(self.fmt.trigger):
                if not self._read_whole_call(content, deltas):
                    break
            elif not self._text(content):
                break
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left when generation ends: the text held back, as content, except a call cut off by
        max_tokens or the start of the separator after a call, which are no text of the reply (the grammar
        allows the trigger only as a call's start); a streamed call cut off ends with the arguments written."""
        rest, self.pending = self.pending, ""
        deltas: list[ToolCallDelta] = []
        if self.call is not None:
            self._close_call(deltas)
            return "", deltas
        cut_off = rest.startswith(self.fmt.trigger) or self.after_call or self.in_group
        return ("" if cut_off else rest), deltas

    def _open_call(self, openings: dict[str, str], deltas: list[ToolCallDelta]) -> bool:
        """Start streaming the call whose opening the pending text starts with, if any."""
        opening = next((o for o in openings if self.pending.startswith(o)), None)
        if opening is None:
            return False
        name = openings[opening]
        self.pending = self.pending[len(opening) :]
        fmt = self.fmt
        reader: ArgumentsReader = JSONArgumentsReader()
        if fmt.argument_style == "qwen_xml":
            reader = XMLArgumentsReader(fmt.parameters[name].get("properties", {}))
        elif fmt.argument_style == "python":
            reader = PythonArgumentsReader()
        self.call = _OpenCall(self.num_calls, fmt.new_id(), name, fmt.tag(name)[1], reader)
        self.num_calls += 1
        deltas.append(ToolCallDelta(self.call.index, id=self.call.id, name=name))
        return True

    def _continue_call(self, deltas: list[ToolCallDelta]) -> bool:
        """Read on in the open call; False when more text is needed."""
        call = self.call
        assert call is not None
        if not call.arguments_done:
            read, piece, call.arguments_done = call.reader.feed(self.pending)
            self.pending = self.pending[read:]
            if piece:
                call.arguments.append(piece)
                deltas.append(ToolCallDelta(call.index, arguments=piece))
            if not call.arguments_done:
                return False
        if call.end:
            rest = self.pending.lstrip()
            if rest.startswith(call.end):
                self.pending = rest[len(call.end) :]
            elif call.end.startswith(rest):
                return False  # the closing text is still being written
        self._close_call(deltas)  # closed otherwise (no grammar): the call is whole all the same
        return True

    def _close_call(self, deltas: list[ToolCallDelta]) -> None:
        call, self.call = self.call, None
        assert call is not None
        deltas.append(ToolCallDelta(call.index, done=ParsedToolCall(call.id, call.name, "".join(call.arguments))))
        self.after_call = True

    def _after_call(self) -> bool:
        """Skip the separator after a call (in a group: or the group's end); False when more text is needed."""
        separator, group_end = self.fmt.separator, self.fmt.group[1]
        if self.in_group and self.pending.startswith(group_end):
            self.pending = self.pending[len(group_end) :]
            self.in_group = False
        elif self.pending.startswith(separator):
            self.pending = self.pending[len(separator) :]
        elif separator.startswith(self.pending) or (self.in_group and group_end.startswith(self.pending)):
            return False  # maybe the separator, maybe text
        else:
            self.in_group = False
        self.after_call = False
        return True

    def _read_whole_call(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        """The call (or group of calls) the pending text starts with, once complete, as the format parses it;
        False while it is not complete."""
        found = self.fmt.call_end(self.pending)
        if found is None:
            return False
        end, block = found
        parsed = self.fmt.parse(block)
        if parsed is None:
            content.append(self.pending[:end])
            self.text_written = self.fmt.calls_alone
        else:
            for call in parsed:
                deltas.append(ToolCallDelta(self.num_calls, call.id, call.name, call.arguments, done=call))
                self.num_calls += 1
            self.after_call = True
        self.pending = self.pending[end:]
        return True

    def _text(self, content: list[str]) -> bool:
        """Pending text up to the next trigger is content; the end of it that may start one is held back.
        False when all that is left is held back."""
        start = self.pending.find(self.fmt.trigger)
        before = self.pending if start < 0 else self.pending[:start]
        if self.fmt.calls_alone and before.strip():
            self.text_written = True  # the reply opened with text: what follows is text too
            return True
        if start > 0:
            content.append(self.pending[:start])
            self.pending = self.pending[start:]
            return True
        kept = _longest_prefix_at_end(self.pending, self.fmt.trigger)
        content.append(self.pending[: len(self.pending) - kept])
        self.pending = self.pending[len(self.pending) - kept :]
        return False


def split_tool_calls(text: str, fmt: ToolCallFormat) -> tuple[str | None, list[ParsedToolCall]]:
    """A whole reply's content (None when only calls and whitespace) and calls."""
    parser = ToolCallParser(fmt)
    content, deltas = parser.feed(text)
    rest, more = parser.finish()
    calls = [delta.done for delta in deltas + more if delta.done is not None]
    return (content + rest if (content + rest).strip() or not calls else None), calls


def merged_openai_deltas(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """A chunk's pieces of calls as OpenAI `tool_calls` deltas, one per call: the first carries its id, type
    and name; the arguments are the pieces joined."""
    merged: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        entry = merged.setdefault(delta.index, {"index": delta.index, "function": {"arguments": ""}})
        if delta.id is not None:
            entry.update(id=delta.id, type="function")
            entry["function"] = {"name": delta.name, **entry["function"]}
        entry["function"]["arguments"] += delta.arguments
    return [entry for entry in merged.values() if "id" in entry or entry["function"]["arguments"]]
