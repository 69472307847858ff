"""Pre-tokenisation: NFC normalisation and Qwen's regex split.

BPE never merges across the chunks this regex produces, so a chunk is the unit of work (and of
caching) for the encoder. The pattern is the same in Qwen-1 (``PAT_STR`` with tiktoken) and in the
Hugging Face Qwen2/2.5/3 tokenizers (``PRETOKENIZE_REGEX``). It needs the third-party ``regex``
module: the standard ``re`` module knows neither ``\\p{L}`` nor ``\\p{N}``.
"""

from __future__ import annotations

import unicodedata

import regex

__all__ = ["QWEN_PATTERN", "QWEN_REGEX", "pretokenize", "normalize", "check_no_lone_surrogates"]

# Alternatives, tried left to right at each position:
#   (?i:'s|'t|...)               English contractions, case-insensitive ("'S" too)
#   [^\r\n\p{L}\p{N}]?\p{L}+     a run of letters with at most one leading non-letter (" the", "(x")
#   \p{N}                        one digit: numbers are always split digit by digit
#    ?[^\s\p{L}\p{N}]+[\r\n]*    punctuation/symbols with an optional leading space, plus newlines
#   \s*[\r\n]+                   whitespace that ends in newlines
#   \s+(?!\S)                    whitespace, leaving the last space to start the next word
#   \s+                          whatever whitespace is left (at the end of the text)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_REGEX = regex.compile(QWEN_PATTERN)


def pretokenize(text: str, pattern: regex.Pattern[str] = QWEN_REGEX) -> list[str]:
    """Split text into the chunks that BPE encodes independently.

    The chunks concatenate back to ``text`` exactly (the last alternative ``\\s+`` and the
    punctuation rule leave no character unmatched).
    """
    return pattern.findall(text)


def normalize(text: str) -> str:
    """Unicode NFC, as both reference Qwen tokenizers apply before splitting.

    NFC composes ``"e" + U+0301`` into ``"é"``: two visually identical strings then give the
    same tokens. It is why ``decode(encode(x)) == normalize(x)``, not always ``x``.
    """
    return unicodedata.normalize("NFC", text)


def check_no_lone_surrogates(text: str) -> None:
    """Raise a ``ValueError`` naming the first lone surrogate (U+D800..U+DFFF) in ``text``.

    A lone surrogate is a valid Python ``str`` character but has no UTF-8 encoding, so it can
    never become bytes for a byte-level tokenizer. We refuse it with its position rather than
    silently replacing it with U+FFFD as tiktoken does: a silent replacement would break
    ``decode(encode(x)) == x`` without anyone noticing.
    """
    match = _SURROGATE.search(text)
    if match is not None:
        raise ValueError(
            f"text contains a lone surrogate U+{ord(match.group()):04X} at position {match.start()}; "
            "it has no UTF-8 encoding (fix the text, e.g. with "
            "text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace'))"
        )


_SURROGATE = regex.compile(r"[\ud800-\udfff]")
