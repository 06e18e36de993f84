"""vLLM's Score and Rerank APIs over the served model's embeddings.

A pair's score is the cosine similarity of its two texts' embeddings (pooled and normalized as /v1/embeddings
makes them), as vLLM scores pairs with an embedding model such as Qwen3-Embedding or bge. `/score` pairs one text
with many, or two lists item by item; `/rerank` (Jina's and Cohere's shape) orders documents by their score
against a query. Cross-encoder rerankers (a classification head over the pair) are not served.
"""

from __future__ import annotations

from pydantic import Field

from ember.server.protocol import OpenAIModel


class ScoreRequest(OpenAIModel):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None  # as SamplingFields'


class RerankDocument(OpenAIModel):
    text: str


class RerankRequest(OpenAIModel):
    model: str | None = None
    query: str
    documents: list[str | RerankDocument]  # strings, or Jina's and Cohere's {"text": ...} objects
    top_n: int = Field(0, ge=0)  # 0: every document
    truncate_prompt_tokens: int | None = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


def score_pairs(num_first: int, num_second: int) -> list[tuple[int, int]]:
    """The pairs (index into text_1, index into text_2) a score request asks for: one text against each of the
    other side's, or two lists of one length item by item."""
    if num_first == 1:
        return [(0, j) for j in range(num_second)]
    if num_second == 1:
        return [(i, 0) for i in range(num_first)]
    if num_first != num_second:
        raise ValueError(f"text_1 has {num_first} texts and text_2 {num_second}: give one text, or lists of one length")
    return [(i, i) for i in range(num_first)]


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine similarity of two embeddings (normalized already: their dot product)."""
    return sum(x * y for x, y in zip(a, b, strict=True))


def ranked(scores: list[float], top_n: int) -> list[int]:
    """Indices of the `top_n` highest scores (0: all), highest first; ties keep the documents' order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n else order
