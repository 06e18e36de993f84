"""Agent memory on real SQLite files: blocks, history, archive, their tools, and a run of the loop that uses them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI

from ember.agents import Agent, AgentResult, Toolbox
from ember.agents.embeddings import INSTALL_HINT, Embedder, OpenAIEmbedder, embedding_model_path
from ember.agents.memory import Memory, PassageVectors
from ember.server.launch import ServerProcess

MODEL = "SmolLM2-135M-Instruct"


def call(box: Toolbox, name: str, **arguments: object) -> tuple[str, bool]:
    result = asyncio.run(box.call(name, json.dumps(arguments)))
    return result.content, result.is_error


def test_blocks_are_edited_within_their_limits_and_kept_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "memory.db"
    memory = Memory(path, blocks={"human": "Name: Ada", "notes": ""}, char_limit=40)
    box = Toolbox(memory.tools())
    # an edit's result shows the block as it now reads (the run's system prompt still shows it as it was)
    assert call(box, "memory_append", label="human", text="Likes tea") == (
        "human now reads:\nName: Ada\nLikes tea",
        False,
    )
    replaced = call(box, "memory_replace", label="human", old="tea", new="green tea")
    assert replaced == ("human now reads:\nName: Ada\nLikes green tea", False)
    assert call(box, "memory_append", label="notes", text="first") == ("notes now reads:\nfirst", False)
    content, error = call(box, "memory_append", label="human", text="x" * 40)
    assert error and "over its limit of 40" in content
    content, error = call(box, "memory_replace", label="human", old="coffee", new="x")
    assert error and "'coffee' is not in block 'human'" in content
    content, error = call(box, "memory_append", label="pets", text="cat")
    assert error and "label: Input should be 'human' or 'notes'" in content
    label = next(t for t in memory.tools() if t.name == "memory_append").parameters["properties"]["label"]
    assert label == {"enum": ["human", "notes"], "type": "string"}  # constrained decoding writes one of them
    assert [t.name for t in Memory(blocks={}).tools()] == ["conversation_search", "archival_insert", "archival_search"]
    memory.close()

    reopened = Memory(path, blocks={"human": "ignored: the file has this block", "extra": "new"})
    assert reopened.blocks() == {
        "human": ("Name: Ada\nLikes green tea", 40),
        "notes": ("first", 40),
        "extra": ("new", 2000),
    }
    rendered = reopened.render()
    assert '<human characters="25/40">\nName: Ada\nLikes green tea\n</human>' in rendered
    assert rendered.index("<human") < rendered.index("<notes") < rendered.index("<extra")


def test_searches_rank_by_the_query_words_and_read_no_query_syntax(tmp_path: Path) -> None:
    memory = Memory(tmp_path / "memory.db")
    for text in ("The boiler code is 4471.", "Ada's boiler was serviced in May.", "Tea is in the left cupboard."):
        memory.insert_passage(text)
    box = Toolbox(memory.tools())
    content, error = call(box, "archival_search", query='boiler AND ("code', limit=2)
    assert not error and content == "- The boiler code is 4471.\n- Ada's boiler was serviced in May."
    assert call(box, "archival_search", query="piano") == ("no match", False)
    content, error = call(box, "archival_search", query="?!")
    assert error and "no words to search for" in content
    content, error = call(box, "archival_insert", text="  ")
    assert error and "needs some text" in content

    record = memory.recorder("s1")
    record({"role": "system", "content": "not kept"})
    record({"role": "user", "content": "My cat is called Miso."})
    record({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]})
    memory.recorder("s2")({"role": "user", "content": "What is the cat's name?"})
    assert memory.search_messages("Miso") == [("s1", "user", "My cat is called Miso.")]
    assert {row[2] for row in memory.search_messages("called")} == {"My cat is called Miso.", "[called f({})]"}
    assert {row[0] for row in memory.search_messages("cat")} == {"s1", "s2"}
    assert memory.search_messages("f") == [("s1", "assistant", "[called f({})]")]
    assert memory.search_messages("system") == []


def test_a_conversation_is_kept_whole_turns_only_and_continues_where_it_stopped(tmp_path: Path) -> None:
    memory = Memory(tmp_path / "memory.db")
    record = memory.recorder("s1")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "result"},
        {"role": "assistant", "content": "done"},
    ]
    for message in [{"role": "system", "content": "not kept"}, *turns]:
        record(message)
    assert memory.conversation("s1") == turns and memory.conversation("other") == []
    record({"role": "user", "content": "again"})
    record({"role": "assistant", "content": None, "tool_calls": [{**call, "id": "c2"}]})  # its run stopped here
    assert Memory(tmp_path / "memory.db").conversation("s1") == [*turns, {"role": "user", "content": "again"}]


needs_embedder = pytest.mark.skipif(
    embedding_model_path() is None, reason=f"the embedding model is not installed: {INSTALL_HINT}"
)


@needs_embedder
def test_embeddings_are_unit_vectors_that_padding_does_not_change() -> None:
    embedder = Embedder()
    alone = embedder.embed(["short text"])
    padded = embedder.embed(["short text", "a much longer text, with many more tokens than the first one has"])
    assert alone.shape == (1, 384) and alone.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)  # the mask keeps padding out of the mean


@needs_embedder
def test_archival_search_finds_passages_by_meaning_and_still_by_exact_words(tmp_path: Path) -> None:
    path = tmp_path / "memory.db"
    passages = [
        "The boiler code is 4471.",
        "Tea is in the left cupboard.",
        "The user's dog is called Rex.",
        "The meeting moved to Tuesday at 3 pm.",
    ]
    by_words = Memory(path)
    for text in passages[:2]:
        by_words.insert_passage(text)  # kept before embeddings were used: embedded on the next search
    by_words.close()
    memory = Memory(path, embedder=Embedder())
    for text in passages[2:]:
        memory.insert_passage(text)
    box = Toolbox(memory.tools())
    assert "by meaning" in box.tools["archival_search"].description
    assert call(box, "archival_search", query="pet name", limit=1) == (
        "- The user's dog is called Rex.",
        False,
    )
    assert call(box, "archival_search", query="where do I keep drinks", limit=1) == (
        "- Tea is in the left cupboard.",
        False,
    )
    assert call(box, "archival_search", query="4471", limit=1) == ("- The boiler code is 4471.", False)
    assert call(box, "archival_search", query="piano") == ("no match", False)  # nothing related: nothing returned
    assert Memory(path).search_passages("pet name") == []  # by words alone it finds nothing
    with sqlite3.connect(path) as db:
        assert db.execute("select count(*) from passage_vectors").fetchone() == (4,)


def test_passage_vectors_find_the_nearest_as_a_full_scan_does() -> None:
    """The in-memory index over 300 passages (its capacity grown several times), one vector replaced, against
    the cosine ranking of every vector."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = PassageVectors("test")
    assert index.nearest(vectors[0], 10, 0.1) == []  # an empty archive
    for start in range(0, 300, 7):
        index.add(list(range(start + 1, min(start + 8, 301))), vectors[start : start + 7])
    vectors[41] = -vectors[41]
    index.add([42], vectors[41:42])  # passage 42 re-embedded
    for query in vectors[:20]:
        scores = vectors @ query
        expected = [int(i) + 1 for i in np.argsort(-scores)[:10] if scores[i] >= 0.1]
        assert index.nearest(query, 10, 0.1) == expected
    assert index.nearest(vectors[41], 1, 0.9) == [42]


@needs_embedder
def test_archival_search_sees_what_another_connection_kept(tmp_path: Path) -> None:
    """Two agents on one memory file: what one keeps, the other finds by meaning at its next search, whether the
    writer embedded it or not."""
    embedder = Embedder()
    reader, writer = (
        Memory(tmp_path / "memory.db", embedder=embedder),
        Memory(tmp_path / "memory.db", embedder=embedder),
    )
    assert reader.search_passages("anything") == []  # nothing kept yet
    reader.insert_passage("The meeting moved to Tuesday at 3 pm.")
    assert reader.search_passages("pet name") == []
    writer.insert_passage("The user's dog is called Rex.")
    assert reader.search_passages("pet name", limit=1) == ["The user's dog is called Rex."]
    Memory(tmp_path / "memory.db").insert_passage("Tea is in the left cupboard.")  # no embedder: no vector
    assert reader.search_passages("where do I keep drinks", limit=1) == ["Tea is in the left cupboard."]
    assert writer.search_passages("when is the meeting", limit=1) == ["The meeting moved to Tuesday at 3 pm."]


def test_a_file_that_is_no_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("plain text, not SQLite" * 100)
    with pytest.raises(ValueError, match="cannot be used: file is not a database"):
        Memory(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="cannot be used: unable to open database file"):
        Memory(tmp_path / "no" / "such" / "folder.db")


def test_a_run_sees_its_blocks_searches_its_history_and_is_recorded(server: ServerProcess, tmp_path: Path) -> None:
    memory = Memory(tmp_path / "memory.db", blocks={"human": "The user's name is Ada."})
    task = "What did I say about the boiler code?"

    async def run() -> AgentResult:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as api:
            agent = Agent(
                api,
                MODEL,
                memory.tools(),
                memory.instructions("You are a helpful assistant."),
                tool_choice="conversation_search",
                temperature=0,
                max_tokens=64,
                max_turns=2,
                on_message=memory.recorder("first"),
            )
            return await agent.run(task)

    result = asyncio.run(run())
    system = result.messages[0]
    assert system["role"] == "system" and system["content"].startswith("You are a helpful assistant.\n\n")
    assert "<human" in system["content"] and "The user's name is Ada." in system["content"]
    call_, outcome = result.tool_calls[0]
    assert call_.name == "conversation_search" and not outcome.is_error
    # The search ran over the history as it was then: the task and the message with the call itself.
    then = Memory()
    for message in result.messages[1:3]:
        then.recorder("first")(message)
    assert outcome.content == asyncio.run(Toolbox(then.tools()).call(call_.name, call_.arguments)).content
    kept = memory.search_messages("boiler code", limit=10)
    assert ("first", "user", task) in kept
    recorded = memory.search_messages("called conversation_search", limit=10)
    assert any(role == "assistant" and "[called conversation_search(" in content for _, role, content in recorded)


def test_cli_memory_persists_between_runs(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    base = [sys.executable, "-m", "ember.cli", "agent", "--url", f"{server.url}/v1", "--memory", str(path)]
    for session in ("monday", "tuesday"):
        done = subprocess.run(
            [*base, "--session", session, "I park on level 3.", "--max-turns", "1", "--max-tokens", "16", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        system = json.loads(done.stdout)["messages"][0]["content"]
        assert '<persona characters="' in system and '<human characters="' in system
    sessions = [row[0] for row in Memory(path).search_messages("park level", limit=10) if row[1] == "user"]
    assert sorted(sessions) == ["monday", "tuesday"]
    again = subprocess.run(
        [*base, "--session", "monday", "Where do I park?", "--max-turns", "1", "--max-tokens", "16", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0 and "continuing session monday (2 earlier messages)" in again.stderr
    messages = json.loads(again.stdout)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [messages[1]["content"], messages[3]["content"]] == ["I park on level 3.", "Where do I park?"]
    assert Memory(path).conversation("monday") == messages[1:]
    bad = subprocess.run([*base[:-1], str(tmp_path), "hi"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("ember: error: memory file")


def test_an_archive_embedded_by_a_servers_embeddings_api(server: ServerProcess, tmp_path: Path) -> None:
    """The archive's vectors come from `/v1/embeddings` (here Ember's own server): stored tagged with the model,
    unit length, and a passage's own text finds it first by meaning."""
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    embedder = OpenAIEmbedder(f"{server.url}/v1", model)
    memory = Memory(tmp_path / "agent.db", embedder=embedder)
    passages = ["The car is parked on level 3.", "Invoices are due on the first Monday.", "The cat sleeps all day."]
    ids = [memory.insert_passage(text) for text in passages]
    assert memory.rank_by_meaning(passages[1])[0] == ids[1]
    rows = memory.db.execute("select model, length(vector) from passage_vectors").fetchall()
    assert rows == [(f"openai-api:{model}", 4 * 576)] * 3
    assert np.allclose(np.linalg.norm(embedder.embed(passages), axis=1), 1, atol=1e-5)
    memory.close()


def test_embeddings_url_needs_the_memory_it_embeds() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "agent", "--embeddings-url", "http://127.0.0.1:9/v1", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--embeddings-url embeds the archive of --memory" in done.stderr
