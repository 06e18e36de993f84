"""Agent memory in one SQLite file, kept across runs: what the agent must always see, and what it can look up.

- Core blocks (persona, human, ...): short labelled texts shown in the system prompt on every turn; the agent
  edits them with memory_append / memory_replace, each block bounded by its character limit.
- History: every message of every run, by session; the agent searches it with conversation_search, and a run
  under the same session name continues the conversation (`conversation(session)`).
- Archive: passages the agent chose to keep (archival_insert), searched with archival_search.
History searches are SQLite FTS5 full-text queries ranked by BM25 (the words of the query, any of them). The
archive is also a vector store when an Embedder is given: each passage's embedding is kept beside it, and a
search fuses the ranking by meaning (cosine similarity) with the ranking by words (reciprocal rank fusion), so
"my pet's name" finds "the dog is called Rex" while an exact name or number still ranks first.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ember.agents.embeddings import TextEmbedder
from ember.agents.tools import Tool, function_tool

DEFAULT_BLOCKS = {"persona": "", "human": ""}
DEFAULT_CHAR_LIMIT = 2000

SCHEMA = """
create table if not exists blocks (label text primary key, value text not null, char_limit integer not null);
create virtual table if not exists messages using fts5(content, session unindexed, role unindexed, created unindexed);
create virtual table if not exists passages using fts5(text, created unindexed);
create table if not exists passage_vectors (passage integer primary key, model text not null, vector blob not null);
create table if not exists conversations (session text not null, position integer not null, message text not null,
                                          primary key (session, position));
"""
RRF_K = 60  # reciprocal rank fusion's constant: a rank r counts 1 / (RRF_K + r)
CANDIDATES = 50  # how deep each ranking goes before fusion
MIN_SIMILARITY = 0.2  # all-MiniLM-L6-v2's cosine for unrelated sentences is ~0-0.15, for related ones 0.3-0.7


def complete_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` cut before the first assistant message whose tool calls do not all have a result."""
    for i, message in enumerate(messages):
        wanted = {call["id"] for call in message.get("tool_calls") or []}
        answered = set()
        for reply in messages[i + 1 :]:
            if reply["role"] != "tool":
                break
            answered.add(reply.get("tool_call_id"))
        if not wanted <= answered:
            return messages[:i]
    return messages


def fts_query(query: str) -> str:
    """The query's words, each quoted, joined by OR: no user text is read as FTS5 syntax."""
    words = re.findall(r"\w+", query)
    if not words:
        raise ValueError("the query has no words to search for")
    return " OR ".join(f'"{w}"' for w in words)


class PassageVectors:
    """The archive's vectors of one embedder, held in memory, so that a search by meaning is one matrix product
    rather than a read of every vector from SQLite (0.7 s at 100K passages). Loaded whole at first use and again
    whenever another connection has written to the file (SQLite's `data_version` tells); what this connection
    embeds is added as it goes."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.version: int | None = None  # the file's data_version when last loaded
        self.ids: list[int] = []
        self.rows: dict[int, int] = {}  # passage -> its row in `matrix`
        self.matrix = np.empty((0, 0), np.float32)  # rows beyond len(ids) are spare capacity

    def is_current(self, db: sqlite3.Connection) -> bool:
        return self.version == db.execute("pragma data_version").fetchone()[0]

    def load(self, db: sqlite3.Connection) -> None:
        self.version = db.execute("pragma data_version").fetchone()[0]
        rows = db.execute("select passage, vector from passage_vectors where model = ?", (self.model,)).fetchall()
        self.ids, self.rows, self.matrix = [], {}, np.empty((0, 0), np.float32)
        if rows:
            vectors = np.frombuffer(b"".join(vector for _, vector in rows), np.float32).reshape(len(rows), -1)
            self.add([passage for passage, _ in rows], vectors)

    def add(self, passages: list[int], vectors: np.ndarray) -> None:
        if self.matrix.shape[1] != vectors.shape[1]:
            self.matrix = np.empty((0, vectors.shape[1]), np.float32)
        for passage, vector in zip(passages, vectors, strict=True):
            row = self.rows.get(passage)
            if row is None:  # a new passage: a new row, the capacity doubled when full
                row = self.rows[passage] = len(self.ids)
                self.ids.append(passage)
                if row == len(self.matrix):
                    grown = np.empty((max(2 * row, 64), vectors.shape[1]), np.float32)
                    grown[:row] = self.matrix[:row]
                    self.matrix = grown
            self.matrix[row] = vector

    def nearest(self, query: np.ndarray, count: int, min_similarity: float) -> list[int]:
        """Up to `count` passages closest to the unit vector `query` (cosine at least `min_similarity`)."""
        if not self.ids:
            return []
        scores = self.matrix[: len(self.ids)] @ query
        best = np.argpartition(-scores, count)[:count] if len(scores) > count else np.arange(len(scores))
        best = best[np.argsort(-scores[best])]
        return [self.ids[i] for i in best if scores[i] >= min_similarity]


class Memory:
    """One agent's memory. Safe to share between threads (one connection behind a lock)."""

    def __init__(
        self,
        path: str | Path = ":memory:",
        blocks: dict[str, str] | None = None,
        char_limit: int = DEFAULT_CHAR_LIMIT,
        embedder: TextEmbedder | None = None,
    ) -> None:
        """`blocks` are created with their text when missing; blocks the file already has are kept as they are.
        With an `embedder`, archival search ranks by meaning too (see the module's docstring)."""
        self.lock = threading.Lock()
        self.embedder = embedder
        self.vectors = PassageVectors(embedder.name) if embedder is not None else None
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

    def edit_block(self, label: str, value: str) -> str:
        """Set a block from an edit tool; the reply shows the block as it now reads, since the system prompt
        keeps showing it as it was when the run began (see `Agent.initial_messages`)."""
        self.set_block(label, value)
        return f"{label} now reads:\n{value}"

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
            passage = int(self.db.execute("insert into passages values (?, ?)", (text, time.time())).lastrowid or 0)
        if self.embedder is not None:
            self.store_vectors([passage], self.embedder.embed([text]))
        return passage

    def search_passages(self, query: str, limit: int = 5) -> list[str]:
        with self.lock:
            by_words = self.db.execute(
                "select rowid from passages where passages match ? order by rank limit ?",
                (fts_query(query), CANDIDATES),
            ).fetchall()
        rankings = [[passage for (passage,) in by_words]]
        if self.embedder is not None:
            rankings.append(self.rank_by_meaning(query))
        fused: dict[int, float] = {}
        for ranking in rankings:
            for rank, passage in enumerate(ranking):
                fused[passage] = fused.get(passage, 0.0) + 1 / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda passage: -fused[passage])[:limit]
        with self.lock:
            texts = dict(
                self.db.execute(
                    f"select rowid, text from passages where rowid in ({','.join('?' * len(best))})", best
                ).fetchall()
            )
        return [texts[passage] for passage in best]

    def embed_missing(self) -> None:
        """Embed the passages that have no vector from this embedder (new ones, or kept before it was used)."""
        if self.embedder is None:
            return
        with self.lock:
            missing = self.db.execute(
                "select rowid, text from passages where rowid not in "
                "(select passage from passage_vectors where model = ?)",
                (self.embedder.name,),
            ).fetchall()
        if not missing:
            return
        # embedded outside the lock: it takes a while
        self.store_vectors([passage for passage, _ in missing], self.embedder.embed([text for _, text in missing]))

    def store_vectors(self, passages: list[int], vectors: np.ndarray) -> None:
        assert self.embedder is not None and self.vectors is not None
        with self.lock, self.db:
            rows = zip(passages, [self.embedder.name] * len(passages), [v.tobytes() for v in vectors], strict=True)
            self.db.executemany("insert or replace into passage_vectors values (?, ?, ?)", list(rows))
            self.vectors.add(passages, vectors)

    def rank_by_meaning(self, query: str) -> list[int]:
        """Passages related to the query by meaning (cosine similarity over unit vectors), best first."""
        assert self.embedder is not None and self.vectors is not None
        with self.lock:
            current = self.vectors.is_current(self.db)
        if not current:  # first use, or another connection wrote: passages may lack vectors
            self.embed_missing()
            with self.lock:
                self.vectors.load(self.db)
        query_vector = self.embedder.embed([query])[0]
        with self.lock:
            return self.vectors.nearest(query_vector, CANDIDATES, MIN_SIMILARITY)

    # What an Agent takes

    def instructions(self, base: str | None = None) -> Callable[[], str]:
        """The system prompt, rendered at the start of each run: `base`, then the blocks as they are then."""
        return lambda: f"{base}\n\n{self.render()}" if base else self.render()

    def recorder(self, session: str) -> Callable[[dict[str, Any]], None]:
        """Records every message of a run (but the system prompt) into the history."""

        def record(message: dict[str, Any]) -> None:
            if message["role"] == "system":
                return
            self.append_to_conversation(session, message)
            content = message.get("content") or ""
            for call in message.get("tool_calls") or []:
                content += f"\n[called {call['function']['name']}({call['function']['arguments']})]"
            if content.strip():
                self.record(session, message["role"], content.strip())

        return record

    # Conversations, to continue a session where it stopped

    def append_to_conversation(self, session: str, message: dict[str, Any]) -> None:
        with self.lock, self.db:
            self.db.execute(
                "insert into conversations values (?, "
                "(select coalesce(max(position), -1) + 1 from conversations where session = ?), ?)",
                (session, session, json.dumps(message, ensure_ascii=False)),
            )

    def conversation(self, session: str) -> list[dict[str, Any]]:
        """The session's messages so far (no system prompt), up to its last complete turn: a run that stopped
        between a tool call and its result leaves the call out, as a server would refuse an unanswered call."""
        with self.lock:
            rows = self.db.execute(
                "select message from conversations where session = ? order by position", (session,)
            ).fetchall()
        return complete_turns([json.loads(message) for (message,) in rows])

    def tools(self) -> list[Tool]:
        """The memory's tools; plain functions, so each call runs in a worker thread (SQLite, the embedder)."""

        def memory_append(label: str, text: str) -> str:
            """Append text to one of your memory blocks (on a new line)."""
            value = self.block(label)[0]
            return self.edit_block(label, f"{value}\n{text}" if value else text)

        def memory_replace(label: str, old: str, new: str) -> str:
            """Replace text in one of your memory blocks (an empty `new` deletes `old`)."""
            value = self.block(label)[0]
            if old not in value:
                raise ValueError(f"{old!r} is not in block {label!r}")
            return self.edit_block(label, value.replace(old, new, 1))

        def conversation_search(query: str, limit: int = 5) -> str:
            """Search all earlier messages (every conversation) for words; the best matches first."""
            rows = self.search_messages(query, limit)
            return "\n".join(f"[{session}] {role}: {content}" for session, role, content in rows) or "no match"

        def archival_insert(text: str) -> str:
            """Keep a passage in your archive, to find it later with archival_search."""
            return f"kept as passage {self.insert_passage(text)}"

        def archival_search(query: str, limit: int = 5) -> str:
            """Search your archive for words; the best matches first."""
            return "\n".join(f"- {text}" for text in self.search_passages(query, limit)) or "no match"

        # the label's schema names the blocks: a server with constrained decoding (Ember's) then only lets the
        # model write one of them, and any other server's model reads them; with no block, nothing to edit
        labels = tuple(self.blocks())
        edits = [memory_append, memory_replace] if labels else []
        for edit in edits:
            edit.__annotations__["label"] = Literal[labels]  # type: ignore[valid-type]
        functions = [*edits, conversation_search, archival_insert]
        by_meaning = "Search your archive by meaning and by words; the best matches first."
        search = function_tool(archival_search, description=by_meaning if self.embedder else None)
        return [*(function_tool(fn) for fn in functions), search]
