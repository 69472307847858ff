"""The byte-level view: every byte gets a printable stand-in character.

Byte-level BPE works on raw UTF-8 bytes, so it never meets an unknown character. The Hugging Face
vocabulary files (``vocab.json``, ``merges.txt``, ``tokenizer.json``) still need to write tokens as
text, and many bytes are invisible or unprintable (spaces, newlines, control bytes, half of a
UTF-8 sequence). GPT-2 solved this with a fixed table that maps each of the 256 bytes to one
printable Unicode character: printable Latin-1 bytes map to themselves, the other 68 are shifted
to code points from U+0100 upwards. A space becomes ``Ġ`` (U+0120) and a newline ``Ċ`` (U+010A),
which is why those characters fill Qwen's ``vocab.json``.
"""

from __future__ import annotations

from functools import cache

__all__ = [
    "bytes_to_unicode",
    "unicode_to_bytes",
    "token_bytes_to_str",
    "token_str_to_bytes",
]


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Return the GPT-2 table: byte value (0..255) -> one printable character.

    The bytes that are already printable (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) keep their
    Latin-1 character; the remaining bytes, in increasing order, take U+0100, U+0101, ...
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return dict(sorted(table.items()))


@cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse table: printable stand-in character -> byte value."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes_to_str(token: bytes) -> str:
    """Write a token's bytes the way ``vocab.json``/``merges.txt`` do (``b" the"`` -> ``"Ġthe"``)."""
    table = bytes_to_unicode()
    return "".join(table[byte] for byte in token)


def token_str_to_bytes(token: str) -> bytes:
    """Read a token written with the byte-level alphabet back into bytes (``"Ġthe"`` -> ``b" the"``).

    Raises ``ValueError`` for a character outside the 256-character alphabet, which means the
    string is not a byte-level token (for example it comes from a vocabulary of a tokenizer that
    is not byte-level, such as SentencePiece's ``▁the``).
    """
    table = unicode_to_bytes()
    try:
        return bytes(table[char] for char in token)
    except KeyError as error:
        raise ValueError(
            f"{token!r} is not written in the byte-level alphabet: character {error.args[0]!r} has no byte"
        ) from None
