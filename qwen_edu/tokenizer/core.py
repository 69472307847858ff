"""The tokenizer object: NFC, special tokens, regex split, cached BPE, decoding, ChatML.

One class serves the real Qwen vocabulary (tiktoken ranks or Hugging Face files) and the toy
vocabularies trained in the book. Encoding a text goes:

1. split out the special tokens that are allowed (``<|im_end|>`` -> 151645);
2. NFC-normalise each remaining stretch of text (see ``pretokenize.normalize``);
3. split it with the pre-tokenisation regex;
4. BPE-encode each chunk, through a bounded LRU cache keyed by the chunk: natural text repeats
   the same chunks (" the", ",", "\\n") so most of them skip BPE entirely.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Literal, Protocol

import regex

from qwen_edu.tokenizer.bpe import MergeBPE, train_bpe, vocab_from_merges
from qwen_edu.tokenizer.chat import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    ChatEncoding,
    encode_chatml,
    render_chatml,
)
from qwen_edu.tokenizer.pretokenize import QWEN_PATTERN, check_no_lone_surrogates, normalize

__all__ = ["Tokenizer", "BPEModel", "AllowedSpecial", "DisallowedSpecial", "train_tokenizer"]

AllowedSpecial = Literal["all"] | Collection[str]
DisallowedSpecial = Literal["all"] | Collection[str]


class BPEModel(Protocol):
    """What the tokenizer needs from a vocabulary (``bpe.RankBPE`` and ``bpe.MergeBPE`` fit)."""

    id_to_bytes: Mapping[int, bytes]
    bytes_to_id: Mapping[bytes, int]

    def encode_piece(self, piece: bytes) -> list[int]: ...


class Tokenizer:
    """A byte-level BPE tokenizer with special tokens.

    Args:
        model: the vocabulary and its BPE rule (``RankBPE`` or ``MergeBPE``).
        special_tokens: text -> id of the added tokens (``<|endoftext|>`` etc.), matched in the
            raw text before the regex and never normalised.
        pattern: the pre-tokenisation regex.
        nfc: apply NFC normalisation to text before splitting (Qwen does).
        control_tokens: the specials that ``decode(..., skip_special_tokens=True)`` drops
            (default: all of them). Qwen2.5 marks e.g. ``<tool_call>`` as not special.
        eos_token: the token that ends a document (``eos_id``); ``<|endoftext|>`` by default.
        cache_size: how many distinct chunks the encoding cache remembers.
        name: shown by ``repr``.
    """

    def __init__(
        self,
        model: BPEModel,
        special_tokens: Mapping[str, int] | None = None,
        *,
        pattern: str = QWEN_PATTERN,
        nfc: bool = True,
        control_tokens: Collection[str] | None = None,
        eos_token: str | None = None,
        cache_size: int = 100_000,
        name: str = "bpe",
    ) -> None:
        self.model = model
        self.pattern = pattern
        self.nfc = nfc
        self.name = name
        self._regex = regex.compile(pattern)
        self._special_tokens = dict(special_tokens or {})
        for token, token_id in self._special_tokens.items():
            regular = model.id_to_bytes.get(token_id)
            if regular is not None and regular != token.encode("utf-8"):
                raise ValueError(f"special token {token!r} reuses id {token_id} of regular token {regular!r}")
        if len(set(self._special_tokens.values())) != len(self._special_tokens):
            raise ValueError("two special tokens share an id")
        controls = self._special_tokens if control_tokens is None else control_tokens
        self._control_tokens = frozenset(controls)
        self._control_ids = frozenset(self._special_tokens[t] for t in controls)

        # id -> bytes as a list, for fast decoding; None marks ids that do not exist.
        size = max([*model.id_to_bytes, *self._special_tokens.values()]) + 1
        table: list[bytes | None] = [None] * size
        for token_id, token in model.id_to_bytes.items():
            table[token_id] = token
        for token, token_id in self._special_tokens.items():
            table[token_id] = token.encode("utf-8")
        self._id_table = table

        self.eos_token = (
            eos_token
            if eos_token is not None
            else _first_present(self._special_tokens, ("<|endoftext|>", IM_END))
        )
        self._cache_size = cache_size
        self._make_caches()

    def _make_caches(self) -> None:
        self._encode_chunk = functools.lru_cache(maxsize=self._cache_size)(self._encode_chunk_uncached)
        self._special_regex = functools.lru_cache(maxsize=64)(self._build_special_regex)

    def __getstate__(self) -> dict[str, object]:
        # The caches wrap bound methods and cannot be pickled (DataLoader workers pickle datasets
        # that hold a tokenizer): drop them and rebuild them empty on the other side.
        state = self.__dict__.copy()
        del state["_encode_chunk"], state["_special_regex"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._make_caches()

    # --- sizes and lookups ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce: highest id + 1 (regular + special tokens).

        The model's embedding table is usually larger (151,936 rows for Qwen2), padded for speed;
        the extra rows are never produced by the tokenizer.
        """
        return len(self._id_table)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def num_regular_tokens(self) -> int:
        """Number of BPE tokens (151,643 for Qwen), without the special tokens."""
        return len(self.model.id_to_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id (a copy)."""
        return dict(self._special_tokens)

    @property
    def control_tokens(self) -> frozenset[str]:
        """The special tokens that ``skip_special_tokens`` drops."""
        return self._control_tokens

    @property
    def eos_id(self) -> int | None:
        """Id of ``eos_token`` (``<|endoftext|>`` = 151643 for Qwen), or None if there is none."""
        return None if self.eos_token is None else self._special_tokens[self.eos_token]

    @property
    def im_start_id(self) -> int:
        return self.token_to_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.token_to_id(IM_END)

    def token_to_id(self, token: str | bytes) -> int:
        """Id of a special token (``"<|im_end|>"``) or of a regular token, given as its text
        (``" the"``) or its raw bytes. Raises ``KeyError`` if there is no such token."""
        if isinstance(token, str):
            if token in self._special_tokens:
                return self._special_tokens[token]
            token_bytes = token.encode("utf-8", errors="surrogatepass")
        elif isinstance(token, bytes):
            token_bytes = token
        else:
            raise TypeError(f"token must be str or bytes, got {type(token).__name__}")
        token_id = self.model.bytes_to_id.get(token_bytes)
        if token_id is None:
            hint = " (not a special token of this tokenizer)" if token_bytes.startswith(b"<") else ""
            raise KeyError(f"unknown token {token!r}{hint}")
        return token_id

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (special tokens: their UTF-8 text)."""
        return self._lookup_ids([token_id])[0]

    # --- encoding --------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Text -> token ids. No BOS/EOS is added.

        Special tokens: the defaults are those of the reference Qwen tokenizers (Qwen-1 and the
        Hugging Face ones): the text of every special token is parsed as that token, so
        ``encode("<|im_end|>") == [151645]``. For untrusted text pass ``allowed_special=()``
        (then special-token text is plain text), or ``disallowed_special="all"`` to raise instead,
        as in tiktoken. Chat messages are always safe: see ``apply_chat_template``.
        """
        self._check_text(text)
        allowed = self._resolve_special(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = frozenset(self._special_tokens) - allowed
        else:
            disallowed = self._resolve_special(disallowed_special, "disallowed_special") - allowed
        if disallowed:
            found = self._special_regex(disallowed).search(text)
            if found:
                raise ValueError(
                    f"text contains the special token {found.group()!r} at position {found.start()}; "
                    "pass it in allowed_special to encode it as that token, or leave it out of "
                    "disallowed_special to encode it as plain text"
                )
        ids: list[int] = []
        if not allowed:
            self._encode_text(text, ids)
            return ids
        start = 0
        for found in self._special_regex(allowed).finditer(text):
            self._encode_text(text[start : found.start()], ids)
            ids.append(self._special_tokens[found.group()])
            start = found.end()
        self._encode_text(text[start:], ids)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with special-token text treated as plain text (tiktoken's ``encode_ordinary``)."""
        return self.encode(text, allowed_special=())

    def encode_batch(
        self,
        texts: Iterable[str],
        *,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: DisallowedSpecial = (),
    ) -> list[list[int]]:
        """``encode`` each text (no padding; lists of different lengths)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of strings; use encode for one string")
        return [
            self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
            for text in texts
        ]

    def encode_piece(self, piece: str) -> list[int]:
        """BPE-encode one pre-token (no regex split, no special tokens, no normalisation)."""
        return list(self._encode_chunk(piece))

    def _encode_text(self, text: str, ids: list[int]) -> None:
        if not text:
            return
        if self.nfc:
            text = normalize(text)
        encode_chunk = self._encode_chunk
        for chunk in self._regex.findall(text):
            ids.extend(encode_chunk(chunk))

    def _encode_chunk_uncached(self, chunk: str) -> tuple[int, ...]:
        return tuple(self.model.encode_piece(chunk.encode("utf-8")))

    def _check_text(self, text: object) -> None:
        if not isinstance(text, str):
            hint = " (decode bytes to str first)" if isinstance(text, (bytes, bytearray)) else ""
            raise TypeError(f"encode expects a str, got {type(text).__name__}{hint}")
        if not text.isascii():
            check_no_lone_surrogates(text)

    def _resolve_special(self, requested: AllowedSpecial, argument: str) -> frozenset[str]:
        if requested == "all":
            return frozenset(self._special_tokens)
        if isinstance(requested, str):
            raise TypeError(f'{argument} must be "all" or a collection of token strings, not {requested!r}')
        requested = frozenset(requested)
        unknown = requested - self._special_tokens.keys()
        if unknown:
            raise ValueError(
                f"unknown special token(s) in {argument}: {sorted(unknown)}; this tokenizer's "
                f"special tokens are {_preview(self._special_tokens)}"
            )
        return requested

    @staticmethod
    def _build_special_regex(tokens: frozenset[str]) -> regex.Pattern[str]:
        # Longest first, so that a token that is a prefix of another never wins the match.
        alternatives = sorted(tokens, key=lambda token: (-len(token), token))
        return regex.compile("|".join(regex.escape(token) for token in alternatives))

    # --- decoding --------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids -> the raw bytes they stand for (special tokens as their text)."""
        return b"".join(self._lookup_ids(ids))

    def decode(
        self, ids: Iterable[int] | int, *, errors: str = "replace", skip_special_tokens: bool = False
    ) -> str:
        """Token ids -> text. Bytes that are not valid UTF-8 (a token sequence cut in the middle
        of a character) become U+FFFD, as in both reference tokenizers; ``errors="strict"``
        raises instead."""
        if isinstance(ids, int):
            ids = [ids]
        ids = _as_int_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._control_ids]
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_batch(self, batch: Iterable[Iterable[int]], **kwargs: object) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in batch]  # type: ignore[arg-type]

    def _lookup_ids(self, ids: Iterable[int]) -> list[bytes]:
        table = self._id_table
        ids = _as_int_list(ids)
        try:
            parts = [table[i] if i >= 0 else None for i in ids]
        except (IndexError, TypeError):
            parts = [None]
        if None in parts:
            for i in ids:
                if not isinstance(i, int) or not 0 <= i < len(table) or table[i] is None:
                    raise ValueError(
                        f"token id {i!r} is not in the vocabulary (valid ids: 0..{len(table) - 1}"
                        + (", with gaps" if None in table else "")
                        + ")"
                    )
        return parts  # type: ignore[return-value]

    # --- chat ------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Iterable[Mapping[str, str]],
        *,
        add_generation_prompt: bool = False,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        allowed_special: AllowedSpecial = (),
    ) -> ChatEncoding:
        """ChatML ids, assistant-only ``loss_mask`` and rendered ``text`` (see ``chat.py``).

        Message contents are plain text unless ``allowed_special`` says otherwise.
        """
        return encode_chatml(
            self,
            messages,
            add_generation_prompt=add_generation_prompt,
            system_prompt=system_prompt,
            allowed_special=allowed_special,
        )

    def render_chat_template(
        self,
        messages: Iterable[Mapping[str, str]],
        *,
        add_generation_prompt: bool = False,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> str:
        """The ChatML string (what ``tokenize=False`` gives in transformers)."""
        return render_chatml(
            messages, add_generation_prompt=add_generation_prompt, system_prompt=system_prompt
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, regular_tokens={self.num_regular_tokens}, "
            f"special_tokens={len(self._special_tokens)}, vocab_size={self.vocab_size}, nfc={self.nfc})"
        )


def _first_present(tokens: Mapping[str, int], candidates: Sequence[str]) -> str | None:
    return next((token for token in candidates if token in tokens), None)


def _preview(tokens: Mapping[str, int], limit: int = 8) -> str:
    names = list(tokens)
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Accept lists, tuples, numpy arrays and torch tensors of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
        if isinstance(ids, int):
            return [ids]
    return ids if isinstance(ids, list) else list(ids)


def train_tokenizer(
    texts: str | Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<|endoftext|>", IM_START, IM_END),
    pattern: str = QWEN_PATTERN,
    min_frequency: int = 2,
    nfc: bool = True,
) -> Tokenizer:
    """Train a toy Qwen-style tokenizer: ``train_bpe`` merges, then special tokens after them.

    ``vocab_size`` counts the 256 bytes and the merges (the special tokens come on top), as in
    Qwen where 151,643 BPE tokens are followed by the specials. With ``nfc`` the corpus is
    normalised first, as the tokenizer will normalise what it encodes.
    """
    if isinstance(texts, str):
        texts = [texts]
    if nfc:
        texts = [normalize(text) for text in texts]
    merges = train_bpe(texts, vocab_size, pattern=pattern, min_frequency=min_frequency)
    vocab = vocab_from_merges(merges)
    specials = {token: len(vocab) + offset for offset, token in enumerate(special_tokens)}
    return Tokenizer(MergeBPE(vocab, merges), specials, pattern=pattern, nfc=nfc, name="trained")
