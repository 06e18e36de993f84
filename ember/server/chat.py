"""Chat templates and logprob formatting: turning OpenAI messages into token ids and tokens into JSON."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ember.engine.request import TokenLogprob
from ember.server.protocol import ChatMessage


class ChatFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """Apply the model's chat template and tokenize, with the assistant's turn opened."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        conversation: list[dict[str, Any]] = []
        for m in messages:
            role = "system" if m.role == "developer" else m.role
            message: dict[str, Any] = {"role": role, "content": m.text()}
            if m.tool_call_id:
                message["tool_call_id"] = m.tool_call_id
            conversation.append(message)
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises for conversations the template rejects
            raise ValueError(f"the chat template rejected these messages: {e}") from e
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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

    def completion_logprobs(self, logprobs: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
        """Legacy completions format: parallel lists of tokens, logprobs, top dicts and offsets."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = text_offset
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            tokens.append(text)
            token_logprobs.append(lp.logprob)
            top_logprobs.append({self.token_text(tid): value for tid, value in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
