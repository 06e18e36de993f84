"""Agent memory in one SQLite file, kept across runs: what the agent must always see, and what it can look up.

- Core blocks (persona, human, ...): short labelled texts shown in the system prompt on every turn; the agent
  edits them with memory_append / memory_replace, each block bounded by its character limit.
- History: every message of every run, by session; the agent searches it with conversation_search.
- Archive: passages the agent chose to keep (archival_insert), searched with archival_search.
Both searches are SQLite FTS5 full-text queries ranked by BM25: the words of the query, any of them.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.agents.tools import Tool, function_tool

DEFAULT_BLOCKS = {"persona": "", "human": ""}
DEFAULT_CHAR_LIMIT = 2000

SCHEMA = """
create table if not exists blocks (label text primary key, value text not null, char_limit integer not null);
create virtual table if not exists messages using fts5(content, session unindexed, role unindexed, created unindexed);
create virtual table if not exists passages using fts5(text, created unindexed);
"""


def fts_query(query: str) -> str:
    """The query's words, each quoted, joined by OR: no user text is read as FTS5 syntax."""
    words = re.findall(r"\w+", query)
    if not words:
        raise ValueError("the query has no words to search for")
    return " OR ".join(f'"{w}"' for w in words)


class Memory:
    """One agent's memory. Safe to share between threads (one connection behind a lock)."""

    def __init__(
        self, path: str | Path = ":memory:", blocks: dict[str, str] | None = None, char_limit: int = DEFAULT_CHAR_LIMIT
    ) -> None:
        """`blocks` are created with their text when missing; blocks the file already has are kept as they are."""
        self.lock = threading.Lock()
        try:
            self.db = sqlite3.connect(str(path), check_same_thread=False)
            self.db.executescript(SCHEMA)
        except sqlite3.Error as e:  # a folder that does not exist, a file that is no SQLite database
            raise ValueError(f"memory file {str(path)!r} cannot be used: {e}") from e
        with self.lock, self.db:
            for label, value in (DEFAULT_BLOCKS if blocks is None else blocks).items():
                self.check_fits(label, value, char_limit)
                self.db.execute("insert or ignore into blocks values (?, ?, ?)", (label, value, char_limit))

    def close(self) -> None:
        self.db.close()

    # Core blocks

    def blocks(self) -> dict[str, tuple[str, int]]:
        with self.lock:
            rows = self.db.execute("select label, value, char_limit from blocks order by rowid").fetchall()
        return {label: (value, limit) for label, value, limit in rows}

    def set_block(self, label: str, value: str) -> None:
        limit = self.block(label)[1]
        self.check_fits(label, value, limit)
        with self.lock, self.db:
            self.db.execute("update blocks set value = ? where label = ?", (value, label))

    def block(self, label: str) -> tuple[str, int]:
        blocks = self.blocks()
        if label not in blocks:
            raise ValueError(f"no memory block {label!r}; the blocks are: {', '.join(blocks)}")
        return blocks[label]

    @staticmethod
    def check_fits(label: str, value: str, limit: int) -> None:
        if len(value) > limit:
            raise ValueError(f"block {label!r} would hold {len(value)} characters, over its limit of {limit}")

    def render(self) -> str:
        """The blocks as the system prompt shows them."""
        parts = [
            f'<{label} characters="{len(value)}/{limit}">\n{value}\n</{label}>'
            for label, (value, limit) in self.blocks().items()
        ]
        return (
            "Your memory blocks, kept across conversations (edit them with memory_append and memory_replace; "
            "search earlier conversations with conversation_search and your archive with archival_search):\n"
            + "\n".join(parts)
        )

    # History and archive

    def record(self, session: str, role: str, content: str) -> None:
        with self.lock, self.db:
            self.db.execute("insert into messages values (?, ?, ?, ?)", (content, session, role, time.time()))

    def search_messages(self, query: str, limit: int = 5) -> list[tuple[str, str, str]]:
        """(session, role, content) of the best matches."""
        with self.lock:
            return self.db.execute(
                "select session, role, content from messages where messages match ? order by rank limit ?",
                (fts_query(query), limit),
            ).fetchall()

    def insert_passage(self, text: str) -> int:
        if not text.strip():
            raise ValueError("an archival passage needs some text")
        with self.lock, self.db:
            return int(self.db.execute("insert into passages values (?, ?)", (text, time.time())).lastrowid or 0)

    def search_passages(self, query: str, limit: int = 5) -> list[str]:
        with self.lock:
            rows = self.db.execute(
                "select text from passages where passages match ? order by rank limit ?", (fts_query(query), limit)
            ).fetchall()
        return [text for (text,) in rows]

    # What an Agent takes

    def instructions(self, base: str | None = None) -> Callable[[], str]:
        """The system prompt, rendered anew before every turn: `base`, then the blocks as they are now."""
        return lambda: f"{base}\n\n{self.render()}" if base else self.render()

    def recorder(self, session: str) -> Callable[[dict[str, Any]], None]:
        """Records every message of a run (but the system prompt) into the history."""

        def record(message: dict[str, Any]) -> None:
            content = message.get("content") or ""
            for call in message.get("tool_calls") or []:
                content += f"\n[called {call['function']['name']}({call['function']['arguments']})]"
            if message["role"] != "system" and content.strip():
                self.record(session, message["role"], content.strip())

        return record

    def tools(self) -> list[Tool]:
        async def memory_append(label: str, text: str) -> str:
            """Append text to one of your memory blocks (on a new line)."""
            value = self.block(label)[0]
            self.set_block(label, f"{value}\n{text}" if value else text)
            return f"appended to {label}"

        async def memory_replace(label: str, old: str, new: str) -> str:
            """Replace text in one of your memory blocks (an empty `new` deletes `old`)."""
            value = self.block(label)[0]
            if old not in value:
                raise ValueError(f"{old!r} is not in block {label!r}")
            self.set_block(label, value.replace(old, new, 1))
            return f"replaced in {label}"

        async def conversation_search(query: str, limit: int = 5) -> str:
            """Search all earlier messages (every conversation) for words; the best matches first."""
            rows = self.search_messages(query, limit)
            return "\n".join(f"[{session}] {role}: {content}" for session, role, content in rows) or "no match"

        async def archival_insert(text: str) -> str:
            """Keep a passage in your archive, to find it later with archival_search."""
            return f"kept as passage {self.insert_passage(text)}"

        async def archival_search(query: str, limit: int = 5) -> str:
            """Search your archive for words; the best matches first."""
            return "\n".join(f"- {text}" for text in self.search_passages(query, limit)) or "no match"

        functions = [memory_append, memory_replace, conversation_search, archival_insert, archival_search]
        return [function_tool(fn) for fn in functions]
