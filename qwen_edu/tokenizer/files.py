"""Reading and writing vocabulary files: tiktoken's ``.tiktoken`` and Hugging Face's formats.

- ``qwen.tiktoken`` (Qwen-1): one ``base64(token bytes) rank`` per line; the rank is the id.
- ``vocab.json`` + ``merges.txt`` (Hugging Face, GPT-2 style): token strings written in the
  byte-level alphabet (``byte_level.py``) -> id, and the ordered merges, one ``left right`` per
  line after a ``#version`` header. Added tokens live in ``tokenizer_config.json``.
- ``tokenizer.json`` (Hugging Face ``tokenizers``): all of the above in one file, plus the
  normaliser and pre-tokeniser settings.

Every reader raises :class:`VocabularyFileError` naming the file (and the line where it can) on
malformed or truncated input.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwen_edu.tokenizer.byte_level import token_bytes_to_str, token_str_to_bytes
from qwen_edu.tokenizer.pretokenize import QWEN_PATTERN

__all__ = [
    "VocabularyFileError",
    "AddedToken",
    "HFTokenizerFiles",
    "read_tiktoken_ranks",
    "write_tiktoken_ranks",
    "read_tokenizer_json",
    "read_vocab_and_merges",
    "read_tokenizer_config",
    "write_tokenizer_json",
    "write_vocab_and_merges",
    "write_tokenizer_config",
]


class VocabularyFileError(ValueError):
    """A vocabulary file is malformed or truncated; the message names the file and line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim before the regex (``special=False``: kept by skip_special_tokens)."""

    content: str
    id: int
    special: bool = True


@dataclass
class HFTokenizerFiles:
    """What a Hugging Face tokenizer folder describes, in bytes and ids."""

    vocab: dict[bytes, int]
    merges: list[tuple[bytes, bytes]]
    added_tokens: list[AddedToken] = field(default_factory=list)
    nfc: bool = True
    pattern: str = QWEN_PATTERN
    ignore_merges: bool = False
    eos_token: str | None = None


# --- tiktoken ----------------------------------------------------------------------------------


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file: ``{token bytes: rank}``, ranks checked to be exactly 0..N-1."""
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise VocabularyFileError(path, f"cannot open: {error.strerror}") from None
    with handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = raw_line.strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise VocabularyFileError(
                    path, f"expected 'base64-token rank', got {line[:60]!r} (truncated file?)", line_number
                )
            try:
                token = base64.b64decode(fields[0], validate=True)
            except binascii.Error:
                raise VocabularyFileError(
                    path, f"invalid base64 token {fields[0][:60]!r}", line_number
                ) from None
            if not fields[1].isdigit():
                raise VocabularyFileError(
                    path, f"rank must be a non-negative integer, got {fields[1][:20]!r}", line_number
                )
            rank = int(fields[1])
            if token in ranks:
                raise VocabularyFileError(path, f"token {token!r} is listed twice", line_number)
            if rank in line_of_rank:
                raise VocabularyFileError(
                    path, f"rank {rank} is used twice (first on line {line_of_rank[rank]})", line_number
                )
            ranks[token] = rank
            line_of_rank[rank] = line_number
    if not ranks:
        raise VocabularyFileError(path, "no tokens in the file (empty or truncated)")
    if max(line_of_rank) != len(ranks) - 1:
        missing = next(rank for rank in range(len(ranks)) if rank not in line_of_rank)
        raise VocabularyFileError(
            path, f"ranks must be 0..{len(ranks) - 1} without gaps; rank {missing} is missing"
        )
    return ranks


def write_tiktoken_ranks(path: str | Path, ranks: Mapping[bytes, int]) -> None:
    """Write ``{token bytes: rank}`` as a ``.tiktoken`` file, in rank order."""
    lines = (
        f"{base64.b64encode(token).decode()} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    Path(path).write_text("".join(lines), encoding="ascii")


# --- Hugging Face: reading ---------------------------------------------------------------------


def _load_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise VocabularyFileError(path, f"cannot open: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise VocabularyFileError(path, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise VocabularyFileError(
            path, f"invalid JSON: {error.msg} (column {error.colno}; truncated file?)", error.lineno
        ) from None


def _vocab_from_strings(path: Path, vocab: object) -> dict[bytes, int]:
    if not isinstance(vocab, dict):
        raise VocabularyFileError(path, "the vocabulary must be a JSON object {token: id}")
    converted: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if not isinstance(token_id, int) or token_id < 0:
            raise VocabularyFileError(
                path, f"token {token!r} has id {token_id!r}; ids must be non-negative integers"
            )
        try:
            converted[token_str_to_bytes(token)] = token_id
        except ValueError as error:
            raise VocabularyFileError(path, str(error)) from None
    return converted


def _parse_merge(path: Path, merge: object, where: str, line: int | None = None) -> tuple[bytes, bytes]:
    if isinstance(merge, str):
        parts = merge.split(" ")
    elif isinstance(merge, list):
        parts = merge
    else:
        parts = []
    if len(parts) != 2 or not all(isinstance(part, str) and part for part in parts):
        raise VocabularyFileError(path, f"{where}: expected two tokens 'left right', got {merge!r}", line)
    try:
        return token_str_to_bytes(parts[0]), token_str_to_bytes(parts[1])
    except ValueError as error:
        raise VocabularyFileError(path, f"{where}: {error}", line) from None


def _check_merges_in_vocab(
    path: Path, merges: Sequence[tuple[bytes, bytes]], vocab: Mapping[bytes, int], lines: Sequence[int | None]
) -> None:
    for (left, right), line in zip(merges, lines):
        for token in (left, right, left + right):
            if token not in vocab:
                where = f"merge {token_bytes_to_str(left)!r} {token_bytes_to_str(right)!r}"
                raise VocabularyFileError(
                    path, f"{where} uses {token_bytes_to_str(token)!r}, which is not in the vocabulary", line
                )


def _added_tokens(path: Path, entries: Iterable[object]) -> list[AddedToken]:
    tokens = []
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("content"), str)
            or not isinstance(entry.get("id"), int)
        ):
            raise VocabularyFileError(
                path, f"added token must have a string 'content' and an integer 'id', got {entry!r}"
            )
        tokens.append(AddedToken(entry["content"], entry["id"], bool(entry.get("special", True))))
    return tokens


def _find_split_pattern(pre_tokenizer: object) -> str | None:
    """The regex of the first ``Split`` pre-tokeniser (Qwen: the pattern of ``pretokenize.py``)."""
    if not isinstance(pre_tokenizer, dict):
        return None
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return pattern.get("Regex") if isinstance(pattern, dict) else None
    for child in pre_tokenizer.get("pretokenizers", []) or []:
        found = _find_split_pattern(child)
        if found is not None:
            return found
    return None


def _uses_nfc(path: Path, normalizer: object) -> bool:
    if normalizer is None:
        return False
    if not isinstance(normalizer, dict):
        raise VocabularyFileError(path, f"unexpected normalizer {normalizer!r}")
    kind = normalizer.get("type")
    if kind == "NFC":
        return True
    if kind == "Sequence":
        return any(_uses_nfc(path, child) for child in normalizer.get("normalizers", []))
    raise VocabularyFileError(path, f"normalizer {kind!r} is not supported (only NFC, as Qwen uses)")


def read_tokenizer_json(path: str | Path) -> HFTokenizerFiles:
    """Read a byte-level BPE ``tokenizer.json`` (the format of every Qwen2/2.5/3 checkpoint).

    The regex comes from its ``Split`` pre-tokeniser (Qwen's pattern if there is none), NFC from
    its normaliser; ``ignore_merges`` is honoured.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise VocabularyFileError(path, "no 'model' section: not a tokenizers tokenizer.json")
    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        raise VocabularyFileError(path, f"model type {model.get('type')!r} is not supported (only BPE)")
    vocab = _vocab_from_strings(path, model.get("vocab"))
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise VocabularyFileError(path, "'model.merges' must be a list")
    merges = [_parse_merge(path, merge, f"merge #{index + 1}") for index, merge in enumerate(raw_merges)]
    _check_merges_in_vocab(path, merges, vocab, [None] * len(merges))
    return HFTokenizerFiles(
        vocab=vocab,
        merges=merges,
        added_tokens=_added_tokens(path, data.get("added_tokens") or []),
        nfc=_uses_nfc(path, data.get("normalizer")),
        pattern=_find_split_pattern(data.get("pre_tokenizer")) or QWEN_PATTERN,
        ignore_merges=bool(model.get("ignore_merges", False)),
    )


def read_vocab_and_merges(
    vocab_path: str | Path, merges_path: str | Path
) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Read ``vocab.json`` and ``merges.txt`` (a ``#version`` first line is skipped)."""
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    vocab = _vocab_from_strings(vocab_path, _load_json(vocab_path))
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except OSError as error:
        raise VocabularyFileError(merges_path, f"cannot open: {error.strerror}") from None
    merges, line_numbers = [], []
    for line_number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line or (line_number == 1 and line.startswith("#version")):
            continue
        merges.append(_parse_merge(merges_path, line, "merge", line_number))
        line_numbers.append(line_number)
    _check_merges_in_vocab(merges_path, merges, vocab, line_numbers)
    return vocab, merges


def read_tokenizer_config(path: str | Path) -> tuple[list[AddedToken], str | None]:
    """Added tokens (``added_tokens_decoder``) and the ``eos_token`` of a ``tokenizer_config.json``."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise VocabularyFileError(path, "expected a JSON object")
    decoder = data.get("added_tokens_decoder") or {}
    entries = []
    for key, entry in decoder.items():
        if not key.isdigit() or not isinstance(entry, dict):
            raise VocabularyFileError(path, f"added_tokens_decoder entry {key!r} is malformed")
        entries.append({**entry, "id": int(key)})
    eos = data.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return _added_tokens(path, entries), eos if isinstance(eos, str) else None


# --- Hugging Face: writing ---------------------------------------------------------------------


def _byte_level_settings() -> dict[str, object]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def write_tokenizer_json(
    path: str | Path,
    vocab: Mapping[bytes, int],
    merges: Sequence[tuple[bytes, bytes]],
    added_tokens: Sequence[AddedToken] = (),
    *,
    pattern: str = QWEN_PATTERN,
    nfc: bool = True,
) -> None:
    """Write a ``tokenizer.json`` laid out like Qwen2's, loadable by ``tokenizers.Tokenizer.from_file``."""
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token.id,
                "content": token.content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": token.special,
            }
            for token in added_tokens
        ],
        "normalizer": {"type": "NFC"} if nfc else None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                _byte_level_settings(),
            ],
        },
        "post_processor": _byte_level_settings(),
        "decoder": _byte_level_settings(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {
                token_bytes_to_str(token): token_id
                for token, token_id in sorted(vocab.items(), key=lambda kv: kv[1])
            },
            "merges": [[token_bytes_to_str(left), token_bytes_to_str(right)] for left, right in merges],
        },
    }
    Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_vocab_and_merges(
    folder: str | Path, vocab: Mapping[bytes, int], merges: Sequence[tuple[bytes, bytes]]
) -> None:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``."""
    folder = Path(folder)
    strings = {
        token_bytes_to_str(token): token_id for token, token_id in sorted(vocab.items(), key=lambda kv: kv[1])
    }
    (folder / "vocab.json").write_text(json.dumps(strings, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{token_bytes_to_str(a)} {token_bytes_to_str(b)}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_tokenizer_config(
    folder: str | Path, added_tokens: Sequence[AddedToken], eos_token: str | None
) -> None:
    """Write the parts of ``tokenizer_config.json`` that the readers here use."""
    data = {
        "added_tokens_decoder": {
            str(token.id): {
                "content": token.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token.special,
            }
            for token in added_tokens
        },
        "bos_token": None,
        "eos_token": eos_token,
        "errors": "replace",
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (Path(folder) / "tokenizer_config.json").write_text(
        json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8"
    )
