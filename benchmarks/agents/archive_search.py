"""What the archive's search costs as it grows: inserting (embedding) passages, and archival_search by words
alone and by meaning + words (a cosine over every stored vector, held in memory, fused with BM25).

Usage: .venv/bin/python benchmarks/agents/archive_search.py [--sizes 1000,10000] [--queries 20] [--random-vectors]
(--random-vectors stores random unit vectors instead of embedding the passages: for sizes that would take
minutes to embed; the queries are still embedded)
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ember.agents.embeddings import Embedder
from ember.agents.memory import Memory

WORDS = [
    "boiler",
    "code",
    "tea",
    "cupboard",
    "meeting",
    "tuesday",
    "dog",
    "rex",
    "garden",
    "key",
    "car",
    "park",
    "level",
    "invoice",
    "paid",
    "train",
]


def passage(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + f" {rng.randint(0, 10**6)}."


def median_ms(call, queries: list[str]) -> float:
    times = []
    for query in queries:
        start = time.perf_counter()
        call(query)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def store_random_vectors(memory: Memory, dim: int) -> None:
    passages = [passage for (passage,) in memory.db.execute("select rowid from passages").fetchall()]
    vectors = np.random.default_rng(0).standard_normal((len(passages), dim)).astype(np.float32)
    memory.store_vectors(passages, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def main(sizes: list[int], n_queries: int, random_vectors: bool) -> None:
    rng = random.Random(0)
    embedder = Embedder()
    start = time.perf_counter()
    embedder.embed(["warm-up"])
    print(f"embedding model load: {time.perf_counter() - start:.2f} s")
    queries = [" ".join(rng.sample(WORDS, 3)) for _ in range(n_queries)]
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            path = Path(folder) / f"archive-{size}.db"
            words_only = Memory(path)
            for _ in range(size):
                words_only.insert_passage(passage(rng))
            with_vectors = Memory(path, embedder=embedder)
            start = time.perf_counter()
            if random_vectors:
                store_random_vectors(with_vectors, embedder.embed(["dimension"]).shape[1])
            with_vectors.embed_missing()
            embed_s = time.perf_counter() - start
            by_words = median_ms(words_only.search_passages, queries)
            by_meaning = median_ms(with_vectors.search_passages, queries)
            stored = "storing random vectors" if random_vectors else "embedding them"
            print(
                f"{size:>7} passages: {stored} {embed_s:.1f} s ({embed_s / size * 1000:.1f} ms each); "
                f"search median by words {by_words:.1f} ms, by meaning + words {by_meaning:.1f} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="archive sizes to measure, comma-separated")
    parser.add_argument("--queries", type=int, default=20, help="queries timed at each size")
    parser.add_argument("--random-vectors", action="store_true", help="store random vectors, embed no passage")
    args = parser.parse_args()
    main([int(s) for s in args.sizes.split(",")], args.queries, args.random_vectors)
