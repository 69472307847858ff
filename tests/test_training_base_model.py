"""The shipped base model (qwen_edu/assets/base_model): loads everywhere, is small, and has learnt the stories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qwen_edu.training import causal_lm_loss, pack_sequences, split_documents, tokenize_documents
from qwen_edu.training.presets import RECIPES
from qwen_edu.training.train_base import VAL_LOSS_THRESHOLD  # stated in the model card

BASE = Path(__file__).resolve().parents[1] / "qwen_edu" / "assets" / "base_model"

pytestmark = pytest.mark.skipif(not (BASE / "model.safetensors").is_file(), reason="base model not built")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small model: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from qwen_edu import load_tokenizer

    return load_tokenizer(BASE)


@pytest.fixture(scope="module")
def model():
    from qwen_edu import load_model

    return load_model(BASE, dtype=torch.float32)


def test_folder_is_small_and_complete():
    names = {p.name for p in BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "training_log.json"} <= names
    size = sum(p.stat().st_size for p in BASE.iterdir())
    assert size < 8 * 2**20, f"the base model folder is {size / 2**20:.1f} MiB"
    config = json.loads((BASE / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]


def test_model_card_states_the_run():
    card = (BASE / "README.md").read_text(encoding="utf-8")
    log = json.loads((BASE / "training_log.json").read_text(encoding="utf-8"))
    assert "python -m qwen_edu.training.train_base --out qwen_edu/assets/base_model" in card
    assert f"{log['final_val_loss_shipped_weights']:.4f}" in card and f"< {VAL_LOSS_THRESHOLD}" in card
    assert log["seed"] == RECIPES["base"].train.seed and log["steps"] == RECIPES["base"].train.max_steps
    assert [r["step"] for r in log["history"]] == list(range(1, log["steps"] + 1))


def test_transformers_and_qwen_edu_agree(model, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Once upon a time, there was a kind little girl named Lily.")])
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_tokenizers_library_reads_the_vocabulary(tokenizer):
    tokenizers = pytest.importorskip("tokenizers")
    hf_tok = tokenizers.Tokenizer.from_file(str(BASE / "tokenizer.json"))
    for text in ["Once upon a time, there was a brave fox named Rusty.", "def add(a, b):\n    return a + b\n",
                 "12 + 35 = 47", "The end.<|endoftext|>"]:
        assert hf_tok.encode(text).ids == tokenizer.encode(text)


def test_validation_loss_below_threshold(model, tokenizer):
    r = RECIPES["base"]
    from qwen_edu.corpus import build_corpus

    # the validation split of the training run (held out before the tokenizer was trained)
    _, val_docs = split_documents(build_corpus(r.n_docs, seed=r.train.seed), r.val_fraction)
    packed = pack_sequences(tokenize_documents(tokenizer, val_docs[:200]), r.train.seq_len, tokenizer.eos_id)
    with torch.no_grad():
        loss = causal_lm_loss(model(packed.input_ids).logits, packed.labels).item()
    assert loss < VAL_LOSS_THRESHOLD


def test_writes_a_coherent_story(model, tokenizer):
    from qwen_edu import generate

    ids = torch.tensor([tokenizer.encode("Once upon a time, there was")])
    out = generate(model, ids, max_new_tokens=200, eos_token_id=tokenizer.eos_id)
    story = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    assert story.rstrip().endswith("The end."), story
    hero = re.search(r"named (\w+)\.", story)
    assert hero is not None and story.count(hero.group(1)) >= 3, story  # it keeps talking about its hero
