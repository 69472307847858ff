"""Named recipes: the corpus, tokenizer, model shape and training settings of a run.

* ``"tiny"`` -- a 2-layer model on a small corpus that trains in well under a minute on a laptop CPU;
  the notebook uses it to show a live loss curve.
* ``"base"`` -- the book's base model (``qwen_edu/assets/base_model``): a ~2M-parameter Qwen2 with a
  ~1.5K-token byte-level BPE vocabulary trained on the generated corpus, about 15 minutes on 2 CPU cores.

:func:`prepare_data` turns a recipe into a trained tokenizer and packed train/validation sets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from qwen_edu.corpus import build_corpus
from qwen_edu.models.config import QwenConfig
from qwen_edu.training.data import PackedDataset, pack_sequences, split_documents, tokenize_documents
from qwen_edu.training.trainer import TrainConfig

__all__ = ["Recipe", "RECIPES", "recipe", "model_config", "prepare_data", "PreparedData", "base_model_path"]


def base_model_path() -> Path:
    """The folder of the shipped base model (``qwen_edu/assets/base_model``)."""
    path = Path(str(files("qwen_edu") / "assets" / "base_model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model; build it with "
                                "`python -m qwen_edu.training.train_base --out qwen_edu/assets/base_model`")
    return path


@dataclass(frozen=True)
class Recipe:
    name: str
    n_docs: int  # generated documents (stories + code + arithmetic)
    val_fraction: float
    bpe_vocab_size: int  # 256 bytes + merges (the trainer stops early when no pair repeats)
    model: dict[str, Any]  # QwenConfig fields besides vocab_size
    train: TrainConfig
    vocab_multiple: int = 64  # pad the embedding rows to a multiple of this (Qwen pads too)


# max_position_embeddings is the trained context (the row length): the long-context chapter extends from it.
_COMMON_MODEL = dict(model_type="qwen2", rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)

RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(
        "tiny", n_docs=3000, val_fraction=0.05, bpe_vocab_size=1024,
        model=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **_COMMON_MODEL),
        train=TrainConfig(max_steps=150, batch_size=16, micro_batch_size=16, seq_len=128, lr=5e-3, min_lr=5e-4,
                          warmup_steps=15, eval_every=50, precision="fp32", seed=0),
    ),
    "base": Recipe(
        "base", n_docs=60000, val_fraction=0.01, bpe_vocab_size=2048,
        model=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, max_position_embeddings=256, **_COMMON_MODEL),
        train=TrainConfig(max_steps=1400, batch_size=16, micro_batch_size=16, seq_len=256, lr=3e-3, min_lr=3e-4,
                          warmup_steps=60, weight_decay=0.1, eval_every=200, save_every=200, precision="bf16",
                          seed=0),
    ),
}


def recipe(name: str, **train_overrides: Any) -> Recipe:
    """A recipe by name, optionally with some :class:`TrainConfig` fields replaced."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    r = RECIPES[name]
    if train_overrides:
        r = dataclasses.replace(r, train=dataclasses.replace(r.train, **train_overrides))
    return r


def model_config(r: Recipe, tokenizer) -> QwenConfig:
    """The model config for a recipe and a trained tokenizer (vocab rows padded; bos = eos = pad = end-of-text)."""
    vocab = math.ceil(tokenizer.vocab_size / r.vocab_multiple) * r.vocab_multiple
    eos = tokenizer.eos_id
    return QwenConfig(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **r.model)


@dataclass
class PreparedData:
    tokenizer: Any
    train: PackedDataset
    val: PackedDataset
    train_docs: list[str]
    val_docs: list[str]


def prepare_data(r: Recipe, seed: int | None = None, tokenizer=None) -> PreparedData:
    """Generate the corpus, split it, train the BPE vocabulary on the training part, tokenize and pack.

    ``seed`` defaults to the recipe's training seed. Pass ``tokenizer`` to reuse an existing one
    (e.g. the base model's) instead of training a new vocabulary.
    """
    from qwen_edu.tokenizer import train_tokenizer

    seed = r.train.seed if seed is None else seed
    docs = build_corpus(r.n_docs, seed=seed)
    train_docs, val_docs = split_documents(docs, r.val_fraction)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs, r.bpe_vocab_size)
    eos = tokenizer.eos_id
    seq_len = r.train.seq_len
    train = pack_sequences(tokenize_documents(tokenizer, train_docs), seq_len, eos)
    val = pack_sequences(tokenize_documents(tokenizer, val_docs), seq_len, eos)
    return PreparedData(tokenizer, PackedDataset(train), PackedDataset(val), train_docs, val_docs)
