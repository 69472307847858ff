"""The Hugging Face file formats: merges derived from the ranks, written, read back, and
compared with the ``tokenizers`` library on the same files."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_edu.tokenizer import (
    VocabularyFileError,
    load_qwen_ranks,
    load_sample_text,
    load_tokenizer,
    save_pretrained,
    token_bytes_to_str,
)

TEXTS = [
    "Hello world! It's 2024-05-01; they'LL see.",
    "你好，世界！通义千问。日本語のテキスト。",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "∫₀¹ x² dx = ⅓ ≈ 0.333…  😀👍🏽",
    "   leading and trailing spaces   \n\n\t\r\n",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "Cafe\u0301 na\u0131\u0308ve",
    "a" * 500 + " " * 100,
]


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A checkpoint-style folder written from the bundled ranks (merges derived once per session)."""
    folder = tmp_path_factory.mktemp("qwen_hf")
    qwen = load_tokenizer()
    save_pretrained(qwen, folder)  # derives the 151,387 merges from the ranks
    return folder


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer()


@pytest.fixture(scope="module")
def from_tokenizer_json(hf_folder):
    return load_tokenizer(hf_folder)


@pytest.fixture(scope="module")
def from_vocab_and_merges(hf_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_vocab_merges")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, folder / name)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf_reference(hf_folder):
    return tokenizers.Tokenizer.from_file(str(hf_folder / "tokenizer.json"))


def test_derived_merges(from_tokenizer_json):
    ranks = load_qwen_ranks()
    merges = from_tokenizer_json.model.merges  # merges_from_ranks(ranks), written and read back
    assert len(merges) == len(ranks) - 256
    for left, right in merges[:2000]:
        assert ranks[left] < ranks[left + right] and ranks[right] < ranks[left + right]
    ordered = [ranks[left + right] for left, right in merges]
    assert ordered == sorted(ordered)


def test_files_look_like_a_qwen_checkpoint(hf_folder):
    vocab = json.loads((hf_folder / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["Hello"] == 9707 and vocab["Ġworld"] == 1879 and vocab["Ċ"] == 198
    assert len(vocab) == 151_643
    merges = (hf_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and merges[1] == "Ġ Ġ"
    config = json.loads((hf_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["added_tokens_decoder"]["151645"]["content"] == "<|im_end|>"
    assert config["eos_token"] == "<|endoftext|>"


def test_loaded_folders_have_the_same_tokens(qwen, from_tokenizer_json, from_vocab_and_merges):
    for tok in (from_tokenizer_json, from_vocab_and_merges):
        assert tok.vocab_size == qwen.vocab_size
        assert tok.special_tokens == qwen.special_tokens
        assert tok.eos_id == 151643 and tok.nfc


@pytest.mark.parametrize("text", TEXTS)
def test_parity_hf_paths(qwen, from_tokenizer_json, from_vocab_and_merges, hf_reference, text):
    expected = qwen.encode(text)
    assert from_tokenizer_json.encode(text) == expected
    assert from_vocab_and_merges.encode(text) == expected
    assert hf_reference.encode(text).ids == expected
    assert from_tokenizer_json.decode(expected) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("name", ["english", "chinese", "code", "math"])
def test_parity_hf_samples(qwen, from_tokenizer_json, hf_reference, name):
    text = load_sample_text(name)
    expected = qwen.encode(text)
    assert from_tokenizer_json.encode(text) == expected
    assert hf_reference.encode(text).ids == expected


@settings(max_examples=120, deadline=None)
# Unassigned code points (Cn) are left out: regex engines disagree on them with their Unicode versions
# (U+18D80 is a letter to the `regex` package here, not to HF tokenizers' Oniguruma tables), as in
# tests/test_tokenizer_qwen.py.
@given(st.text(alphabet=st.characters(exclude_categories=("Cs", "Cn")), max_size=50))
def test_parity_hf_hypothesis(qwen, from_tokenizer_json, hf_reference, text):
    expected = qwen.encode_ordinary(text)
    assert from_tokenizer_json.encode_ordinary(text) == expected
    assert hf_reference.encode(text, add_special_tokens=False).ids == qwen.encode(text)


def test_hf_decoder_agrees(from_tokenizer_json, hf_reference):
    ids = from_tokenizer_json.encode(TEXTS[1] + TEXTS[3])
    assert hf_reference.decode(ids, skip_special_tokens=False) == from_tokenizer_json.decode(ids)


def test_tokenizer_json_file_path(hf_folder, qwen):
    tok = load_tokenizer(hf_folder / "tokenizer.json")
    assert tok.encode(TEXTS[0]) == qwen.encode(TEXTS[0])


def test_folder_brings_its_own_special_tokens(hf_folder):
    with pytest.raises(ValueError, match="defines its own added tokens"):
        load_tokenizer(hf_folder, special_tokens="qwen3")


# --- bad files ------------------------------------------------------------------------------------

SMALL_VOCAB = {token_bytes_to_str(bytes([b])): b for b in range(256)}
SMALL_VOCAB.update({"Ġt": 256, "he": 257, "Ġthe": 258})
SMALL_MERGES = ["Ġ t", "h e", "Ġt he"]


def _small_folder(tmp_path, merges=SMALL_MERGES, vocab=SMALL_VOCAB):
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return tmp_path


def test_small_folder_without_specials(tmp_path):
    tok = load_tokenizer(_small_folder(tmp_path))
    assert tok.encode(" the") == [258]
    assert tok.special_tokens == {} and tok.eos_id is None
    tok = load_tokenizer(tmp_path, special_tokens="qwen2")  # no added tokens in the folder: allowed
    assert tok.encode("<|im_end|>") == [151645]


def test_malformed_merges_line(tmp_path):
    _small_folder(tmp_path, merges=["Ġ t", "h e x", "Ġt he"])
    with pytest.raises(VocabularyFileError, match=r"merges\.txt, line 3: merge: expected two tokens"):
        load_tokenizer(tmp_path)


def test_merge_of_unknown_token(tmp_path):
    _small_folder(tmp_path, merges=["Ġ t", "h e", "Ġt hx"])
    with pytest.raises(
        VocabularyFileError, match=r"merges\.txt, line 4: .*'hx', which is not in the vocabulary"
    ):
        load_tokenizer(tmp_path)


def test_truncated_vocab_json(tmp_path):
    _small_folder(tmp_path)
    text = json.dumps(SMALL_VOCAB, indent=1)
    (tmp_path / "vocab.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(VocabularyFileError, match=r"vocab\.json, line \d+: invalid JSON"):
        load_tokenizer(tmp_path)


def test_vocab_not_byte_level(tmp_path):
    _small_folder(tmp_path, vocab={**SMALL_VOCAB, "▁the": 259})
    with pytest.raises(VocabularyFileError, match="not written in the byte-level alphabet"):
        load_tokenizer(tmp_path)


def test_truncated_tokenizer_json(tmp_path, hf_folder):
    text = (hf_folder / "tokenizer.json").read_text(encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text(text[:5000], encoding="utf-8")
    with pytest.raises(VocabularyFileError, match=r"tokenizer\.json, line 1: invalid JSON"):
        load_tokenizer(tmp_path)
