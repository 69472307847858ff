"""Qwen's byte-level BPE tokenizer, built from scratch.

The pieces, in the order the book builds them:

- ``byte_level``: the 256-byte printable alphabet (``bytes_to_unicode``).
- ``pretokenize``: NFC and Qwen's regex split (``QWEN_PATTERN``, ``pretokenize``).
- ``bpe``: training (``get_pair_counts``, ``merge``, ``train_bpe_naive``, ``train_bpe``) and encoding
  one pre-token (``encode_piece``, ``bpe_merge``; ``merges_from_ranks``).
- ``core``: the ``Tokenizer`` object (special tokens, cache, decode); ``train_tokenizer``.
- ``qwen``: the real vocabulary, the special-token flavours and ``load_tokenizer``.
- ``chat``: ChatML with an assistant-only loss mask.
- ``files``: ``.tiktoken``, ``vocab.json``/``merges.txt`` and ``tokenizer.json`` readers/writers.

Entry point: ``load_tokenizer()`` returns the real Qwen tokenizer::

    >>> from qwen_edu.tokenizer import load_tokenizer
    >>> tok = load_tokenizer()
    >>> tok.encode("Hello world"), tok.decode([9707, 1879])
    ([9707, 1879], 'Hello world')
"""

from qwen_edu.tokenizer.bpe import (
    MergeBPE,
    RankBPE,
    bpe_merge,
    count_words,
    encode_piece,
    get_pair_counts,
    merge,
    merges_from_ranks,
    train_bpe,
    train_bpe_naive,
    vocab_from_merges,
)
from qwen_edu.tokenizer.byte_level import (
    bytes_to_unicode,
    token_bytes_to_str,
    token_str_to_bytes,
    unicode_to_bytes,
)
from qwen_edu.tokenizer.chat import (
    CHAT_ROLES,
    DEFAULT_SYSTEM_PROMPT,
    ChatEncoding,
    encode_chatml,
    render_chatml,
)
from qwen_edu.tokenizer.core import Tokenizer, train_tokenizer
from qwen_edu.tokenizer.files import VocabularyFileError
from qwen_edu.tokenizer.pretokenize import QWEN_PATTERN, QWEN_REGEX, normalize, pretokenize
from qwen_edu.tokenizer.qwen import (
    DEFAULT_FLAVOUR,
    FLAVOURS,
    QWEN_NUM_REGULAR_TOKENS,
    load_qwen_ranks,
    load_tokenizer,
    save_pretrained,
    special_tokens_for,
)
from qwen_edu.tokenizer.samples import SAMPLE_NAMES, load_sample_text, training_corpus

__all__ = [
    "CHAT_ROLES",
    "DEFAULT_FLAVOUR",
    "DEFAULT_SYSTEM_PROMPT",
    "FLAVOURS",
    "QWEN_NUM_REGULAR_TOKENS",
    "QWEN_PATTERN",
    "QWEN_REGEX",
    "SAMPLE_NAMES",
    "ChatEncoding",
    "MergeBPE",
    "RankBPE",
    "Tokenizer",
    "VocabularyFileError",
    "bpe_merge",
    "bytes_to_unicode",
    "count_words",
    "encode_chatml",
    "encode_piece",
    "get_pair_counts",
    "load_qwen_ranks",
    "load_sample_text",
    "load_tokenizer",
    "merge",
    "merges_from_ranks",
    "normalize",
    "pretokenize",
    "render_chatml",
    "save_pretrained",
    "special_tokens_for",
    "token_bytes_to_str",
    "token_str_to_bytes",
    "train_bpe",
    "train_bpe_naive",
    "train_tokenizer",
    "training_corpus",
    "unicode_to_bytes",
    "vocab_from_merges",
]
