"""Chat templates and logprob formatting: turning OpenAI messages into token ids and tokens into JSON."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

from ember.engine.request import TokenLogprob
from ember.server.protocol import ChatMessage, Tool
from ember.server.reasoning import template_thinks
from ember.server.tools import tool_call_format, tool_schemas, tools_instructions


def load_chat_template(value: str) -> str:
    """`--chat-template`: a Jinja file's path, or the template itself; checked for syntax at once, so that a
    typo is a start-up error rather than a 400 on every chat request."""
    path = Path(value).expanduser()
    if _is_file(path):
        template = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    check_template_syntax(template, "--chat-template")
    return template


def check_template_syntax(template: str, source: str) -> None:
    """Raise ValueError naming `source` and the line when `template` is not valid Jinja."""
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: line {e.lineno}: {e.message}") from e


def system_in_first_user_turn(conversation: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation with its system message's text put before the first user message's (as Gemma 3's own
    template does), for templates that refuse a system role; None when there is no system message."""
    if not conversation or conversation[0]["role"] != "system":
        return None
    system, rest = conversation[0]["content"], conversation[1:]
    if rest and rest[0]["role"] == "user" and isinstance(rest[0]["content"], str):
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; False for text that cannot be a path (a template longer than a file name)."""
    try:
        return path.is_file()
    except OSError:
        return False


class ChatFormatter:
    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None = None,
        thinks: bool | None = None,
        tool_call_parser: str = "auto",
    ) -> None:
        """`chat_template` replaces the model's own (`--chat-template`); `thinks`: whether replies may hold a
        think block to split off (None: when the template writes them); `tool_call_parser`: the format of tool
        calls (`--tool-call-parser`; "auto": the template's)."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)
        self.tool_format = tool_call_format(tool_call_parser, self.chat_template)
        self.native_tools = self.tool_format.speaks(self.chat_template)
        self.thinks = template_thinks(self.chat_template) if thinks is None else thinks

    def prompt(
        self,
        messages: list[ChatMessage],
        tools: list[Tool] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """Apply the model's chat template and tokenize: (the text, its token ids). The assistant's turn is
        opened (unless not `add_generation_prompt`), or the last message left open (`continue_final_message`).
        Tools, earlier tool calls and tool results go through the template when it speaks the tool-call format,
        else in Ember's own rendering of that format (see `tools.py`). `template_kwargs` are more of the
        template's variables (vLLM's `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`)."""
        if self.tokenizer is None or not self.chat_template:
            raise ValueError(
                "this model has no chat template; use /v1/completions, or start the server with --chat-template"
            )
        conversation = [self._message(m) for m in messages]
        kwargs: dict[str, Any] = dict(template_kwargs or {})
        if tools and self.native_tools:
            kwargs["tools"] = tool_schemas(tools)
        elif tools:
            if conversation[0]["role"] == "system":
                conversation[0] = {**conversation[0], "content": f"{conversation[0]['content']}\n\n"}
            else:
                conversation.insert(0, {"role": "system", "content": ""})
            conversation[0]["content"] += tools_instructions(tools, self.tool_format)

        def render(turns: list[dict[str, Any]]) -> str:
            return self.tokenizer.apply_chat_template(
                turns,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=self.chat_template,
                **kwargs,
            )

        try:
            text = render(conversation)
        except Exception as e:  # jinja raises for conversations the template rejects
            folded = system_in_first_user_turn(conversation)
            if folded is None:
                raise ValueError(f"the chat template rejected these messages: {e}") from e
            try:  # a template without a system role (Gemma 2's, older Mistral ones) may take it in the user's turn
                text = render(folded)
            except Exception as again:  # what it refuses once the system text is in the user's turn
                raise ValueError(f"the chat template rejected these messages: {again}") from again
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def reserved_template_names(self) -> frozenset[str]:
        """Template variables a request's `chat_template_kwargs` may not set: `messages` and the parameters of
        `apply_chat_template` (tools, add_generation_prompt, ...), which the request's own fields set."""
        names = inspect.signature(self.tokenizer.apply_chat_template).parameters if self.tokenizer else {}
        return frozenset(names) - {"kwargs"} | {"messages"}

    def _message(self, m: ChatMessage) -> dict[str, Any]:
        """One message as the chat template takes it."""
        text = m.text()
        if m.role == "tool" and not self.native_tools:
            return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": text}
        fmt = self.tool_format
        if m.tool_call_id:
            message["tool_call_id"] = fmt.template_id(m.tool_call_id)
        if m.reasoning_content or m.reasoning:  # an earlier turn's thinking, for templates that render it
            message["reasoning_content"] = m.reasoning_content or m.reasoning
        calls = [(c.function.name, _arguments(c.function.arguments)) for c in m.tool_calls or []]
        if calls and self.native_tools:
            message["tool_calls"] = [
                {"id": fmt.template_id(c.id), "type": "function", "function": {"name": name, "arguments": arguments}}
                for c, (name, arguments) in zip(m.tool_calls or [], calls, strict=True)
            ]
        elif calls:
            rendered = fmt.render(calls)
            message["content"] = f"{text}\n{rendered}" if text else rendered
        return message

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def chat_logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
        content = []
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            top = [
                {"token": (t := self.token_text(tid)), "logprob": value, "bytes": list(t.encode())}
                for tid, value in lp.top
            ]
            content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()), "top_logprobs": top})
        return {"content": content}

    def prompt_logprobs(self, logprobs: list[TokenLogprob | None]) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: for each prompt position (the first has none), {token id: {logprob, rank,
        decoded_token}} of the prompt's own token, then of the most likely alternatives."""
        entries: list[dict[str, Any] | None] = []
        for lp in logprobs:
            if lp is None:
                entries.append(None)
                continue
            ranked = [(lp.token_id, lp.logprob, lp.rank), *((t, v, r) for r, (t, v) in enumerate(lp.top, start=1))]
            entry: dict[str, Any] = {}
            for token_id, value, rank in ranked:
                entry.setdefault(
                    str(token_id), {"logprob": value, "rank": rank, "decoded_token": self.token_text(token_id)}
                )
            entries.append(entry)
        return entries

    def completion_logprobs(self, entries: list[tuple[int, TokenLogprob | None]], text_offset: int) -> dict[str, Any]:
        """Legacy completions format of (token id, its logprob) pairs: parallel lists of tokens, logprobs, top
        dicts and offsets into the text; a token without a logprob (an echoed prompt's first) has nulls."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = text_offset
        for token_id, lp in entries:
            text = self.token_text(token_id)
            tokens.append(text)
            token_logprobs.append(None if lp is None else lp.logprob)
            top_logprobs.append(None if lp is None else {self.token_text(tid): value for tid, value in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }


def _arguments(text: str) -> Any:
    """A tool call's arguments (JSON text) as the object templates render."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"a tool call's arguments are not valid JSON: {text!r}") from e
