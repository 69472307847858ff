"""Byte-pair encoding: training a vocabulary, and encoding one pre-token with it.

Everything here works on bytes (or on integer ids standing for byte strings), never on
characters, and on one pre-token ("word") at a time: the regex split in ``pretokenize.py`` has
already cut the text, and BPE never merges across those cuts.

Two ways to describe a trained vocabulary coexist in the Qwen world, and both are here:

- **ranks** (tiktoken, Qwen-1's ``qwen.tiktoken``): ``bytes -> rank``, the rank being the id.
  Encoding repeatedly joins the adjacent pair whose *concatenation* has the lowest rank.
- **merges** (Hugging Face ``merges.txt``): an ordered list of pairs. Encoding repeatedly applies
  the adjacent *pair* that comes first in the list.

They agree when the merges are derived from the ranks (:func:`merges_from_ranks`), which is how
Qwen's ``tokenizer.json`` relates to ``qwen.tiktoken``.
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import regex

from qwen_edu.tokenizer.pretokenize import QWEN_PATTERN

__all__ = [
    "Pair",
    "get_pair_counts",
    "merge",
    "count_words",
    "train_bpe",
    "train_bpe_naive",
    "vocab_from_merges",
    "bpe_merge",
    "encode_piece",
    "merges_from_ranks",
    "RankBPE",
    "MergeBPE",
]

Pair = tuple[int, int]
Symbol = TypeVar("Symbol")


# --- the two building blocks of training -----------------------------------------------------


def get_pair_counts(
    ids: Sequence[int], counts: dict[Pair, int] | None = None, weight: int = 1
) -> dict[Pair, int]:
    """Count adjacent pairs in ``ids`` (overlaps included: ``[a, a, a]`` has two ``(a, a)``).

    ``weight`` lets one call count a word that occurs ``weight`` times in the corpus; pass an
    existing ``counts`` dict to accumulate over many words.
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, scanning left to right.

    Left to right matters for overlaps: ``[a, a, a]`` with ``(a, a)`` becomes ``[aa, a]``.
    """
    first, second = pair
    merged: list[int] = []
    i = 0
    while i < len(ids):
        if ids[i] == first and i + 1 < len(ids) and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def count_words(texts: str | Iterable[str], pattern: str = QWEN_PATTERN) -> Counter[bytes]:
    """Pre-tokenise a corpus and count each distinct chunk's UTF-8 bytes.

    Training only ever looks at distinct words with their counts: a corpus of millions of
    chunks usually has a few hundred thousand distinct ones.
    """
    compiled = regex.compile(pattern)
    if isinstance(texts, str):
        texts = [texts]
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(chunk.encode("utf-8") for chunk in compiled.findall(text))
    return counts


class _Vocab:
    """The growing vocabulary during training: ids 0..255 are the bytes, then one id per new token.

    A merge whose result already exists (``ab + c`` and later ``a + bc``) reuses that token's id,
    like the Hugging Face trainer, so ``vocab_from_merges`` can rebuild the ids from the merges.
    """

    def __init__(self) -> None:
        self.id_to_bytes: list[bytes] = [bytes([b]) for b in range(256)]
        self.bytes_to_id: dict[bytes, int] = {token: i for i, token in enumerate(self.id_to_bytes)}

    def add(self, pair: Pair) -> int:
        token = self.id_to_bytes[pair[0]] + self.id_to_bytes[pair[1]]
        new_id = self.bytes_to_id.get(token)
        if new_id is None:
            new_id = len(self.id_to_bytes)
            self.id_to_bytes.append(token)
            self.bytes_to_id[token] = new_id
        return new_id


def _check_training_args(vocab_size: int, min_frequency: int) -> None:
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")


# --- training ------------------------------------------------------------------------------------


def train_bpe_naive(
    texts: str | Iterable[str],
    vocab_size: int,
    *,
    pattern: str = QWEN_PATTERN,
    min_frequency: int = 2,
) -> list[tuple[bytes, bytes]]:
    """The textbook algorithm: recount every pair over the whole corpus before each merge.

    Simple and obviously right, but each merge costs a pass over the corpus. It is the
    reference that :func:`train_bpe` must match merge for merge.

    Which pair wins: the most frequent; on a tie, the smallest ``(left id, right id)``, where
    ids 0..255 are the byte values and later tokens get the next ids in creation order. Training
    stops at ``vocab_size`` tokens (256 bytes + merges), or earlier when the best pair occurs
    fewer than ``min_frequency`` times.
    """
    _check_training_args(vocab_size, min_frequency)
    word_counts = count_words(texts, pattern)
    words = [list(word) for word in word_counts]
    weights = list(word_counts.values())
    vocab = _Vocab()
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab.id_to_bytes) < vocab_size:
        counts: dict[Pair, int] = {}
        for word, weight in zip(words, weights):
            get_pair_counts(word, counts, weight)
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        if counts[best] < min_frequency:
            break
        merges.append((vocab.id_to_bytes[best[0]], vocab.id_to_bytes[best[1]]))
        new_id = vocab.add(best)
        words = [merge(word, best, new_id) for word in words]
    return merges


def train_bpe(
    texts: str | Iterable[str],
    vocab_size: int,
    *,
    pattern: str = QWEN_PATTERN,
    min_frequency: int = 2,
) -> list[tuple[bytes, bytes]]:
    """Learn BPE merges from a corpus; returns them in order as ``(left bytes, right bytes)``.

    Same result as :func:`train_bpe_naive` (same merges, same tie-breaking), without recounting:

    - ``pair_counts`` holds the current count of every adjacent pair, over distinct words
      weighted by their frequency;
    - ``words_with`` indexes pair -> the words that contain it, so a merge only revisits the
      words where it applies, and updates the counts of the pairs it destroys and creates;
    - a heap of ``(-count, left, right)`` finds the best pair. Entries are not updated in place:
      a popped entry whose count is out of date is pushed back with its current count, and an
      increased count gets a fresh entry, so the first entry that is up to date is the best.
    """
    _check_training_args(vocab_size, min_frequency)
    word_counts = count_words(texts, pattern)
    words = [list(word) for word in word_counts]
    weights = list(word_counts.values())

    pair_counts: dict[Pair, int] = {}
    words_with: dict[Pair, set[int]] = {}
    for index, (word, weight) in enumerate(zip(words, weights)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + weight
            words_with.setdefault(pair, set()).add(index)
    heap = [(-count, first, second) for (first, second), count in pair_counts.items()]
    heapq.heapify(heap)

    vocab = _Vocab()
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab.id_to_bytes) < vocab_size and heap:
        negative_count, first, second = heapq.heappop(heap)
        best = (first, second)
        count = pair_counts.get(best, 0)
        if count != -negative_count:  # stale entry: requeue with the true count (if any left)
            if count > 0:
                heapq.heappush(heap, (-count, first, second))
            continue
        if count < min_frequency:
            break
        merges.append((vocab.id_to_bytes[first], vocab.id_to_bytes[second]))
        new_id = vocab.add(best)

        changes: dict[Pair, int] = {}
        for index in words_with.pop(best, ()):
            word = words[index]
            merged = merge(word, best, new_id)
            if len(merged) == len(word):  # the index may hold words that lost the pair earlier
                continue
            weight = weights[index]
            for pair in zip(word, word[1:]):
                changes[pair] = changes.get(pair, 0) - weight
            for pair in zip(merged, merged[1:]):
                changes[pair] = changes.get(pair, 0) + weight
                words_with.setdefault(pair, set()).add(index)
            words[index] = merged
        for pair, delta in changes.items():
            if delta == 0:
                continue
            new_count = pair_counts.get(pair, 0) + delta
            if new_count > 0:
                pair_counts[pair] = new_count
            else:
                pair_counts.pop(pair, None)
            if delta > 0:
                heapq.heappush(heap, (-new_count, pair[0], pair[1]))
    return merges


def vocab_from_merges(merges: Iterable[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """Token ids for a trained vocabulary: bytes 0..255 keep their value, merges follow in order.

    These are the ids the trainers use internally (a merge that recreates an existing token
    adds no id).
    """
    vocab = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab


# --- encoding one pre-token ----------------------------------------------------------------------


def bpe_merge(
    symbols: list[Symbol], lookup: Callable[[Symbol, Symbol], tuple[int, Symbol] | None]
) -> list[Symbol]:
    """Apply BPE to one pre-token: repeatedly merge the adjacent pair with the lowest rank.

    ``lookup(left, right)`` returns ``(rank, merged symbol)`` for a mergeable pair, else ``None``.
    Ties (the same pair at two places) go to the leftmost. Short inputs use a plain scan;
    long ones (say a 10 kB run of letters) a heap over a linked list, to stay O(n log n).
    """
    if len(symbols) > _LONG_PIECE:
        return _bpe_merge_heap(symbols, lookup)
    symbols = list(symbols)
    ranks = [lookup(a, b) for a, b in zip(symbols, symbols[1:])]
    while True:
        best_index = -1
        best_rank = 0
        for index, found in enumerate(ranks):
            if found is not None and (best_index < 0 or found[0] < best_rank):
                best_index, best_rank = index, found[0]
        if best_index < 0:
            return symbols
        merged = ranks[best_index][1]  # type: ignore[index]
        symbols[best_index : best_index + 2] = [merged]
        del ranks[best_index]
        if best_index > 0:
            ranks[best_index - 1] = lookup(symbols[best_index - 1], merged)
        if best_index < len(ranks):
            ranks[best_index] = lookup(merged, symbols[best_index + 1])


def _bpe_merge_heap(
    symbols: list[Symbol], lookup: Callable[[Symbol, Symbol], tuple[int, Symbol] | None]
) -> list[Symbol]:
    """Same result as the scan in :func:`bpe_merge`, with a heap of ``(rank, position)``."""
    count = len(symbols)
    current: list[Symbol | None] = list(symbols)
    next_of = list(range(1, count + 1))  # count means "no next symbol"
    prev_of = list(range(-1, count - 1))
    heap: list[tuple[int, int]] = []
    for index in range(count - 1):
        found = lookup(symbols[index], symbols[index + 1])
        if found is not None:
            heap.append((found[0], index))
    heapq.heapify(heap)
    while heap:
        rank, index = heapq.heappop(heap)
        right = next_of[index]
        if current[index] is None or right >= count:
            continue
        found = lookup(current[index], current[right])  # type: ignore[arg-type]
        if found is None or found[0] != rank:  # the pair at this position has changed since
            continue
        current[index] = found[1]
        current[right] = None
        after = next_of[right]
        next_of[index] = after
        if after < count:
            prev_of[after] = index
            pushed = lookup(found[1], current[after])  # type: ignore[arg-type]
            if pushed is not None:
                heapq.heappush(heap, (pushed[0], index))
        before = prev_of[index]
        if before >= 0:
            pushed = lookup(current[before], found[1])  # type: ignore[arg-type]
            if pushed is not None:
                heapq.heappush(heap, (pushed[0], before))
    return [symbol for symbol in current if symbol is not None]


def encode_piece(piece: bytes, ranks: Mapping[bytes, int]) -> list[int]:
    """Encode one pre-token with a rank table (tiktoken's rule; ``rank == id``).

    Start from single bytes and keep joining the adjacent pair whose concatenation has the
    lowest rank (the leftmost on a tie), until no joined pair is in the table. A piece that is
    itself a token is returned as that one token straight away, as tiktoken does.
    """
    token = ranks.get(piece)
    if token is not None:
        return [token]
    if len(piece) > _LONG_PIECE:  # long pieces: the O(n log n) heap version

        def lookup(left: bytes, right: bytes) -> tuple[int, bytes] | None:
            rank = ranks.get(left + right)
            return None if rank is None else (rank, left + right)

        return [
            ranks[part] for part in _bpe_merge_heap([piece[i : i + 1] for i in range(len(piece))], lookup)
        ]

    # pair_ranks[i] is the rank of parts[i] + parts[i + 1]; _NOT_A_TOKEN when it is no token.
    parts = list(map(_SINGLE_BYTES.__getitem__, piece))
    rank_of = ranks.get
    pair_ranks = [rank_of(left + right, _NOT_A_TOKEN) for left, right in zip(parts, parts[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NOT_A_TOKEN:
            break
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = rank_of(parts[i - 1] + parts[i], _NOT_A_TOKEN)
        if i < len(pair_ranks):
            pair_ranks[i] = rank_of(parts[i] + parts[i + 1], _NOT_A_TOKEN)
    return [ranks[part] for part in parts]


_NOT_A_TOKEN = sys.maxsize
_SINGLE_BYTES = [bytes([b]) for b in range(256)]
# Above this many symbols the quadratic scan loses to the heap (a 10 kB run of letters is one piece).
_LONG_PIECE = 128


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the ordered merge list hidden in a rank table (for writing ``merges.txt``).

    A multi-byte token was created by the last merge its own BPE would perform: encode the
    token using only the tokens ranked below it, and the two parts left are its merge.
    Single-byte tokens need no merge. Raises ``ValueError`` if a token cannot be built that way
    (the table is then not a BPE vocabulary).
    """
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue

        def lookup(left: bytes, right: bytes, limit: int = rank) -> tuple[int, bytes] | None:
            joined = left + right
            found = ranks.get(joined)
            return None if found is None or found >= limit else (found, joined)

        parts = bpe_merge([token[i : i + 1] for i in range(len(token))], lookup)
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {rank}) cannot be built from two lower-ranked tokens: "
                "this is not a byte-level BPE vocabulary"
            )
        merges.append((rank, parts[0], parts[1]))
    merges.sort()
    return [(left, right) for _, left, right in merges]


# --- vocabulary objects that a tokenizer can use -------------------------------------------------


class RankBPE:
    """A tiktoken-style vocabulary: ``ranks[token bytes] = id``; merges implied by the ranks."""

    def __init__(self, ranks: Mapping[bytes, int]) -> None:
        self.ranks = dict(ranks)
        self.id_to_bytes = {rank: token for token, rank in self.ranks.items()}
        if len(self.id_to_bytes) != len(self.ranks):
            raise ValueError("two tokens share a rank: ranks must be unique ids")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"a byte-level vocabulary needs all 256 single bytes; missing {missing[:8]}")

    @property
    def bytes_to_id(self) -> dict[bytes, int]:
        return self.ranks

    def encode_piece(self, piece: bytes) -> list[int]:
        return encode_piece(piece, self.ranks)


class MergeBPE:
    """A Hugging Face-style vocabulary: token ids plus an ordered merge list.

    ``ignore_merges=True`` (a ``tokenizer.json`` option) first looks the whole piece up in the
    vocabulary, like tiktoken; otherwise the merges alone decide.
    """

    def __init__(
        self,
        vocab: Mapping[bytes, int],
        merges: Sequence[tuple[bytes, bytes]],
        *,
        ignore_merges: bool = False,
    ) -> None:
        self.bytes_to_id = dict(vocab)
        self.id_to_bytes = {token_id: token for token, token_id in self.bytes_to_id.items()}
        if len(self.id_to_bytes) != len(self.bytes_to_id):
            raise ValueError("two tokens share an id in the vocabulary")
        self.merges = list(merges)
        self.ignore_merges = ignore_merges
        # (left id, right id) -> (priority, merged id); the first listing of a pair wins.
        self.pair_ranks: dict[Pair, tuple[int, int]] = {}
        for priority, (left, right) in enumerate(self.merges):
            try:
                key = (self.bytes_to_id[left], self.bytes_to_id[right])
                merged = self.bytes_to_id[left + right]
            except KeyError as error:
                raise ValueError(
                    f"merge {priority + 1} ({left!r}, {right!r}) uses a token missing from the "
                    f"vocabulary: {error.args[0]!r}"
                ) from None
            self.pair_ranks.setdefault(key, (priority, merged))
        self._priority = {pair: priority for pair, (priority, _) in self.pair_ranks.items()}
        self._merged_id = {pair: merged for pair, (_, merged) in self.pair_ranks.items()}
        self._byte_ids = [self.bytes_to_id.get(bytes([b])) for b in range(256)]

    def encode_piece(self, piece: bytes) -> list[int]:
        if self.ignore_merges:
            token = self.bytes_to_id.get(piece)
            if token is not None:
                return [token]
        ids = [self._byte_ids[b] for b in piece]
        if None in ids:
            missing = next(b for b in piece if self._byte_ids[b] is None)
            raise ValueError(f"byte 0x{missing:02x} has no token in this vocabulary")
        if len(ids) > _LONG_PIECE:
            pair_ranks = self.pair_ranks
            return _bpe_merge_heap(ids, lambda left, right: pair_ranks.get((left, right)))  # type: ignore[arg-type]
        # the same loop as encode_piece, with pair priorities instead of token ranks
        priority_of, merged_id = self._priority.get, self._merged_id
        priorities = [priority_of(pair, _NOT_A_TOKEN) for pair in zip(ids, ids[1:])]
        while priorities:
            best = min(priorities)
            if best == _NOT_A_TOKEN:
                break
            i = priorities.index(best)
            ids[i : i + 2] = [merged_id[(ids[i], ids[i + 1])]]
            del priorities[i]
            if i > 0:
                priorities[i - 1] = priority_of((ids[i - 1], ids[i]), _NOT_A_TOKEN)
            if i < len(priorities):
                priorities[i] = priority_of((ids[i], ids[i + 1]), _NOT_A_TOKEN)
        return ids  # type: ignore[return-value]
