"""The building blocks: the byte alphabet, the regex split, BPE training and piece encoding."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_edu.tokenizer import (
    MergeBPE,
    RankBPE,
    bytes_to_unicode,
    count_words,
    encode_piece,
    get_pair_counts,
    merge,
    merges_from_ranks,
    pretokenize,
    token_bytes_to_str,
    token_str_to_bytes,
    train_bpe,
    train_bpe_naive,
    train_tokenizer,
    training_corpus,
    unicode_to_bytes,
    vocab_from_merges,
)
from qwen_edu.tokenizer.bpe import _bpe_merge_heap, bpe_merge
from qwen_edu.tokenizer.samples import SAMPLE_NAMES, load_sample_text

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return training_corpus()


@pytest.fixture(scope="module")
def trained_merges(corpus) -> list[tuple[bytes, bytes]]:
    return train_bpe(corpus, 700)


# --- bytes and regex --------------------------------------------------------------------------------


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert table[0] == "Ā" and table[255] == "ÿ"
    assert unicode_to_bytes()["Ġ"] == 32


@given(st.binary(max_size=40))
def test_byte_level_round_trip(data):
    assert token_str_to_bytes(token_bytes_to_str(data)) == data


def test_token_str_outside_alphabet():
    with pytest.raises(ValueError, match="not written in the byte-level alphabet"):
        token_str_to_bytes("▁the")


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("Hello world", ["Hello", " world"]),
        (
            "In 2024, I'LL pay $12.50!",
            ["In", " ", "2", "0", "2", "4", ",", " I", "'LL", " pay", " $", "1", "2", ".", "5", "0", "!"],
        ),
        ("x\n\n  y", ["x", "\n\n", " ", " y"]),
        ("a   b", ["a", "  ", " b"]),
        ("end.\n\nNext", ["end", ".\n\n", "Next"]),
        ("你好，世界", ["你好", "，世界"]),
        ("trailing   ", ["trailing", "   "]),
    ],
)
def test_pretokenize_examples(text, chunks):
    assert pretokenize(text) == chunks


@given(TEXT)
def test_pretokenize_covers_the_text(text):
    assert "".join(pretokenize(text)) == text


# --- pair counts and merge ----------------------------------------------------------------------------


def test_get_pair_counts_and_merge():
    ids = [1, 2, 3, 1, 2]
    assert get_pair_counts(ids) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_pair_counts([5, 5, 5]) == {(5, 5): 2}  # overlaps count
    counts = get_pair_counts([1, 2], weight=3)
    get_pair_counts([1, 2, 1], counts)
    assert counts == {(1, 2): 4, (2, 1): 1}
    assert merge(ids, (1, 2), 9) == [9, 3, 9]
    assert merge([5, 5, 5], (5, 5), 7) == [7, 5]  # left to right
    assert merge([5, 5, 5, 5], (5, 5), 7) == [7, 7]
    assert merge([], (1, 2), 3) == []


def test_count_words():
    counts = count_words(["the cat the", " the"])
    assert counts[b" the"] == 2 and counts[b"the"] == 1 and counts[b" cat"] == 1


# --- training -----------------------------------------------------------------------------------------


def test_training_matches_the_naive_reference(corpus, trained_merges):
    assert train_bpe_naive(corpus, 700) == trained_merges


def test_training_is_deterministic(corpus, trained_merges):
    assert train_bpe(corpus, 700) == trained_merges
    assert train_bpe(list(reversed(corpus)), 700) == trained_merges  # only counts matter
    assert len(trained_merges) > 300
    assert trained_merges[0] == (b" ", b" ")  # the most frequent pair of this corpus


def test_tie_breaking_is_by_smallest_ids():
    # every pair occurs once: (b" ", b"c") = (32, 99) has the smallest ids
    assert train_bpe("ab cd", 257, min_frequency=1) == [(b" ", b"c")]
    assert train_bpe_naive("ab cd", 257, min_frequency=1) == [(b" ", b"c")]
    # new tokens get ids after the bytes, so among equal counts byte pairs win
    assert train_bpe("abab xyxy", 260, min_frequency=1)[:2] == [(b"a", b"b"), (b"x", b"y")]


def test_min_frequency_and_vocab_size(corpus):
    assert train_bpe(corpus, 256) == []
    assert len(train_bpe(corpus, 300)) == 44
    assert train_bpe("abcdef", 1000) == []  # no pair occurs twice
    assert len(train_bpe("abcdef", 1000, min_frequency=1)) == 5
    with pytest.raises(ValueError, match="vocab_size must be at least 256"):
        train_bpe("x", 100)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe("x", 300, min_frequency=0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.text(alphabet="aab bc\nd的的字", max_size=30), min_size=1, max_size=6),
    st.integers(256, 300),
    st.integers(1, 3),
)
def test_training_matches_naive_hypothesis(texts, vocab_size, min_frequency):
    fast = train_bpe(texts, vocab_size, min_frequency=min_frequency)
    assert fast == train_bpe_naive(texts, vocab_size, min_frequency=min_frequency)


def test_duplicate_token_reuses_its_id():
    # "ab"+"c" and "a"+"bc" both make "abc": one id, two merges
    merges = [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"a", b"bc")]
    vocab = vocab_from_merges(merges)
    assert len(vocab) == 256 + 3 and vocab[b"abc"] == 257


def test_merges_round_trip_through_ranks(trained_merges):
    vocab = vocab_from_merges(trained_merges)
    if len(vocab) == 256 + len(trained_merges):  # no duplicates: ranks determine the merges
        assert merges_from_ranks(vocab) == trained_merges


# --- encoding one piece ------------------------------------------------------------------------------


def test_encode_piece_by_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"bc": 258})
    assert encode_piece(b"abc", ranks) == [257]  # whole piece is a token
    assert encode_piece(b"abcabc", ranks) == [257, 257]
    assert encode_piece(b"bcab", ranks) == [258, 256]
    assert encode_piece(b"", ranks) == []


def test_heap_and_scan_agree(trained_merges):
    ranks = vocab_from_merges(trained_merges)

    def lookup(left: bytes, right: bytes):
        rank = ranks.get(left + right)
        return None if rank is None else (rank, left + right)

    rng = random.Random(0)
    text = "".join(load_sample_text(name) for name in SAMPLE_NAMES).encode()
    for _ in range(300):
        start = rng.randrange(len(text) - 200)
        piece = text[start : start + rng.randrange(2, 160)]
        symbols = [piece[i : i + 1] for i in range(len(piece))]
        scan = bpe_merge(symbols, lookup) if len(symbols) <= 128 else None
        heap = _bpe_merge_heap(symbols, lookup)
        assert b"".join(heap) == piece
        if scan is not None:
            assert heap == scan


def test_rank_and_merge_models(trained_merges):
    vocab = vocab_from_merges(trained_merges)
    by_merges, by_ranks = MergeBPE(vocab, trained_merges), RankBPE(vocab)
    text = load_sample_text("english")
    for chunk in pretokenize(text):
        piece = chunk.encode()
        assert by_merges.encode_piece(piece) == by_ranks.encode_piece(piece)


def test_rank_bpe_needs_all_bytes():
    with pytest.raises(ValueError, match="all 256 single bytes"):
        RankBPE({b"a": 0})


# --- a trained toy tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(corpus):
    return train_tokenizer(corpus, 600)


def test_toy_tokenizer(toy):
    assert toy.num_regular_tokens <= 600
    assert toy.special_tokens["<|endoftext|>"] == toy.num_regular_tokens
    text = load_sample_text("english")
    ids = toy.encode(text)
    assert toy.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # it learned something about its own corpus
    assert toy.encode("<|im_start|>x")[0] == toy.im_start_id


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_toy_round_trip(toy, text):
    import unicodedata

    assert toy.decode(toy.encode_ordinary(text)) == unicodedata.normalize("NFC", text)
