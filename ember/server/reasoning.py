"""Reasoning models: their thinking, between `<think>` and `</think>`, apart from the answer.

Qwen3, DeepSeek-R1 and SmolLM3 think before they answer. The server returns the thinking in the message's
`reasoning` (vLLM's name) and `reasoning_content` (DeepSeek's and llama.cpp's), and the answer alone in
`content`, as vLLM does with a reasoning parser. A model thinks when its chat template writes think blocks;
the block opens either in the reply (Qwen3 writes `<think>` itself) or at the end of the prompt (DeepSeek-R1's
template ends with `<think>\\n`; Qwen3's, with `enable_thinking` false, writes an empty block closed there).
"""

from __future__ import annotations

import json

from ember.engine.structured_output import StructuredOutputs, structural_format

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
BLANKS_AFTER_THINKING = r"[ \n]{0,4}"  # Qwen3 and DeepSeek-R1 write "</think>\n\n" before the answer


def template_thinks(chat_template: str | None) -> bool:
    """Whether a chat template writes think blocks (so its model's replies may hold one)."""
    return bool(chat_template and THINK_OPEN in chat_template and THINK_CLOSE in chat_template)


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt ends inside a think block: the reply then starts with the thinking."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def prompt_closes_thinking(prompt: str) -> bool:
    """Whether the rendered prompt ends with a closed think block (Qwen3's `enable_thinking` false): the reply
    is the answer alone."""
    return prompt.rstrip().endswith(THINK_CLOSE)


def after_thinking(spec: StructuredOutputs, opened: bool) -> StructuredOutputs:
    """`spec` for the answer only: the reply thinks first, freely, in a think block (the prompt's, when
    `opened`; else one the model may open), then matches `spec`. As vLLM constrains a reasoning model's answer
    and not its thinking: JSON forced from the first token would leave the model no room to think."""
    think = {
        "type": "tag",
        "begin": "" if opened else THINK_OPEN,
        "content": {"type": "any_text", "excludes": [THINK_OPEN, THINK_CLOSE]},
        "end": THINK_CLOSE,
    }
    thinking = {"type": "sequence", "elements": [think, {"type": "regex", "pattern": BLANKS_AFTER_THINKING}]}
    reply = [thinking if opened else {"type": "optional", "content": thinking}, structural_format(spec)]
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": reply}}
    return StructuredOutputs(structural_tag=json.dumps(tag))


def held_tag_prefix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (it may be the tag arriving in pieces)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class ReasoningParser:
    """Splits one reply into (thinking, answer) as its text streams in. Text that may still turn out to be
    part of a tag, and blanks at the thinking's end, are held back until the next piece says which; blanks
    at the start of the thinking and of the answer after it are dropped."""

    def __init__(self, opened: bool) -> None:
        self.state = "thinking" if opened else "start"  # then "answer"
        self.thought = opened  # whether the reply has a think block (an empty one included)
        self.held = ""
        self.at_part_start = opened  # blanks here are dropped

    def feed(self, text: str) -> tuple[str, str]:
        """The thinking and the answer in `text` (and in what was held back before it)."""
        self.held += text
        if self.state == "start":
            begun = self.held.lstrip()
            if begun.startswith(THINK_OPEN):
                self.state, self.thought, self.at_part_start = "thinking", True, True
                self.held = begun[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(begun):
                return "", ""  # blanks, or the tag in pieces
            else:
                self.state = "answer"
        thinking = ""
        if self.state == "thinking":
            self._drop_blanks_at_part_start()
            end = self.held.find(THINK_CLOSE)
            if end < 0:
                ready = self.held[: len(self.held) - held_tag_prefix(self.held, THINK_CLOSE)]
                thinking = ready.rstrip()
                self.held = self.held[len(thinking) :]
                return thinking, ""
            thinking = self.held[:end].rstrip()
            self.state, self.held, self.at_part_start = "answer", self.held[end + len(THINK_CLOSE) :], True
        self._drop_blanks_at_part_start()
        answer, self.held = self.held, ""
        return thinking, answer

    def _drop_blanks_at_part_start(self) -> None:
        if self.at_part_start:
            self.held = self.held.lstrip()
            self.at_part_start = not self.held

    def finish(self) -> tuple[str, str]:
        """What was held back, at the reply's end: unclosed thinking stays thinking."""
        held, self.held = self.held, ""
        if self.state == "thinking":
            return held.rstrip(), ""
        return "", held


def split_reasoning(text: str, opened: bool) -> tuple[str | None, str]:
    """A whole reply as (its thinking, or None when it has no think block; its answer)."""
    parser = ReasoningParser(opened)
    thinking, answer = parser.feed(text)
    more_thinking, more_answer = parser.finish()
    return (thinking + more_thinking if parser.thought else None), answer + more_answer
