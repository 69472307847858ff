"""Qwen-VL's tokenizer additions: image spans, ``from_list_format`` and grounding boxes (reference §11.4).

Qwen-VL keeps Qwen-1's vocabulary and specials (ids 151643-151850) and appends nine tokens::

    <ref> 151851  </ref> 151852  <box> 151853  </box> 151854  <quad> 151855  </quad> 151856
    <img> 151857  </img> 151858  <imgpad> 151859

**Image spans.** A picture is named in the text by its path or URL: ``<img>demo.jpg</img>``. The
tokenizer turns the path into **one token per UTF-8 byte, whose id is the byte value (0-255)**, pads
with ``<imgpad>`` to exactly 256 slots and closes with ``</img>``: 258 tokens per image, whatever the
path. The model later reads the path back from those ids, loads the picture and overwrites the 256
slots with the 256 visual features (:mod:`qwen_edu.models.qwen_vl`). A path longer than the span is
an error. (Ids 0-255 of Qwen's BPE are single bytes, just not byte ``b`` at id ``b``: the ids here are
an address, not text.)

**Grounding.** ``<ref>the dog</ref><box>(x1,y1),(x2,y2)</box>`` names a region by its top-left and
bottom-right corners, integers normalised to [0, 1000) of the image width and height, so boxes do not
depend on the resolution. :func:`parse_boxes` reads them back out of generated text.

:class:`QwenVLTokenizer` wraps any :class:`~qwen_edu.tokenizer.core.Tokenizer` that has the nine
tokens: the real vocabulary (:func:`load_qwen_vl_tokenizer`) or the book's small one, which gets them
appended by :func:`add_qwen_vl_tokens` (the small model uses a shorter span, one slot per visual token).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_edu.tokenizer.bpe import RankBPE
from qwen_edu.tokenizer.chat import ChatEncoding, encode_chatml
from qwen_edu.tokenizer.core import Tokenizer
from qwen_edu.tokenizer.pretokenize import QWEN_PATTERN
from qwen_edu.tokenizer.qwen import load_qwen_ranks, load_tokenizer, special_tokens_for

__all__ = [
    "QWEN_VL_TOKENS",
    "QWEN_VL_FIRST_ID",
    "IMAGE_SPAN",
    "BOX_RANGE",
    "BoxFormatError",
    "GroundedBox",
    "QwenVLTokenizer",
    "add_qwen_vl_tokens",
    "load_qwen_vl_tokenizer",
    "format_box",
    "parse_boxes",
    "to_list_format",
    "normalize_box",
    "denormalize_box",
    "box_iou",
]

QWEN_VL_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
QWEN_VL_FIRST_ID = 151_851
IMAGE_SPAN = 256
#: Box coordinates are integers in ``range(BOX_RANGE)``: 0 .. 999.
BOX_RANGE = 1000

_TAG_RE = re.compile(r"<(img|ref|box|quad)>(.*?)</\1>", flags=re.DOTALL)
_OPEN_RE = re.compile(r"<(img|ref|box|quad)>")
_BOX_BODY_RE = re.compile(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*")

Box = tuple[int, int, int, int]


class BoxFormatError(ValueError):
    """A ``<box>`` that does not read as ``(x1,y1),(x2,y2)`` with integer corners in [0, 1000)."""


@dataclass(frozen=True)
class GroundedBox:
    """One box read from text: corners in [0, 1000) and the ``<ref>`` phrase it belongs to (if any)."""

    box: Box
    ref: str | None = None


def _check_box(box: Sequence[int], where: str) -> Box:
    if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
        raise BoxFormatError(f"{where}: a box is four integers (x1, y1, x2, y2), got {box!r}")
    bad = [v for v in box if not 0 <= v < BOX_RANGE]
    if bad:
        raise BoxFormatError(f"{where}: coordinate {bad[0]} of box {tuple(box)} is outside [0, {BOX_RANGE}) "
                             "(Qwen-VL boxes are normalised to the image size; see normalize_box)")
    x1, y1, x2, y2 = box
    if x1 > x2 or y1 > y2:
        raise BoxFormatError(f"{where}: box {tuple(box)} has its top-left corner right of or below its "
                             "bottom-right corner")
    return (x1, y1, x2, y2)


def format_box(box: Sequence[int]) -> str:
    """``(x1,y1),(x2,y2)`` wrapped in ``<box>`` tags, after checking the corners (reference format)."""
    x1, y1, x2, y2 = _check_box(tuple(box), "format_box")
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def _parse_box_body(body: str) -> Box:
    match = _BOX_BODY_RE.fullmatch(body)
    if match is None:
        raise BoxFormatError(f"malformed box {body!r}: expected '(x1,y1),(x2,y2)' with non-negative integers")
    return _check_box(tuple(int(v) for v in match.groups()), f"box {body!r}")


def to_list_format(text: str) -> list[dict[str, str]]:
    """Split text into ``{"image"|"ref"|"box"|"quad"|"text": ...}`` items (the reference's ``to_list_format``).

    An opening tag without its closing tag is an error naming the tag and where it starts.
    """
    items: list[dict[str, str]] = []
    position = 0
    for match in _TAG_RE.finditer(text):
        _append_text(items, text[position:match.start()])
        kind = "image" if match.group(1) == "img" else match.group(1)
        items.append({kind: match.group(2)})
        position = match.end()
    _append_text(items, text[position:])
    return items


def _append_text(items: list[dict[str, str]], text: str) -> None:
    unclosed = _OPEN_RE.search(text)
    if unclosed is not None:
        tag = unclosed.group(1)
        cls = BoxFormatError if tag == "box" else ValueError
        raise cls(f"<{tag}> in {text[unclosed.start():unclosed.start() + 40]!r} has no closing </{tag}>")
    if text:
        items.append({"text": text})


def parse_boxes(text: str) -> list[GroundedBox]:
    """Every ``<box>`` of ``text`` with the ``<ref>`` phrase right before it (carried over to following boxes).

    Raises :class:`BoxFormatError` for a box that is not ``(x1,y1),(x2,y2)``, has a coordinate outside
    [0, 1000), has its corners swapped, or is never closed.
    """
    out: list[GroundedBox] = []
    ref: str | None = None
    for item in to_list_format(text):
        if "ref" in item:
            ref = item["ref"].strip()
        elif "box" in item:
            out.append(GroundedBox(_parse_box_body(item["box"]), ref))
        elif "text" in item and item["text"].strip():
            ref = None  # text between a ref and a box ends the ref
    return out


def normalize_box(box: Sequence[float], width: int, height: int) -> Box:
    """Pixel corners -> integers in [0, 1000): ``floor(x * 1000 / width)``, clamped to 999 (book's rounding)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box
    scaled = (x1 * BOX_RANGE / width, y1 * BOX_RANGE / height, x2 * BOX_RANGE / width, y2 * BOX_RANGE / height)
    return _check_box(tuple(min(BOX_RANGE - 1, max(0, int(v))) for v in scaled), "normalize_box")


def denormalize_box(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """[0, 1000) corners -> pixels, as the reference draws them: ``int(x / 1000 * width)``."""
    x1, y1, x2, y2 = _check_box(tuple(box), "denormalize_box")
    return (int(x1 / BOX_RANGE * width), int(y1 / BOX_RANGE * height),
            int(x2 / BOX_RANGE * width), int(y2 / BOX_RANGE * height))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 when they do not overlap)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def add_qwen_vl_tokens(tokenizer: Tokenizer, first_id: int | None = None) -> Tokenizer:
    """A copy of ``tokenizer`` with the nine Qwen-VL tokens at ``first_id ..`` (default: right after its ids)."""
    present = [t for t in QWEN_VL_TOKENS if t in tokenizer.special_tokens]
    if present:
        raise ValueError(f"tokenizer already has {present}")
    start = tokenizer.vocab_size if first_id is None else first_id
    specials = {**tokenizer.special_tokens, **{t: start + i for i, t in enumerate(QWEN_VL_TOKENS)}}
    return Tokenizer(tokenizer.model, specials, pattern=tokenizer.pattern, nfc=tokenizer.nfc,
                     control_tokens=[*tokenizer.control_tokens, *QWEN_VL_TOKENS], eos_token=tokenizer.eos_token,
                     name=f"{tokenizer.name}+qwen-vl")


class QwenVLTokenizer:
    """A tokenizer with Qwen-VL's image spans and grounding tags (see the module docstring).

    ``image_span`` is the number of slots between ``<img>`` and ``</img>``: 256 for Qwen-VL, the
    model's ``n_queries`` in general. Every other attribute (``eos_id``, ``vocab_size``, ...) is the
    wrapped tokenizer's.
    """

    def __init__(self, tokenizer: Tokenizer, image_span: int = IMAGE_SPAN) -> None:
        missing = [t for t in QWEN_VL_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"{tokenizer!r} lacks the Qwen-VL tokens {missing}; see add_qwen_vl_tokens")
        if image_span < 1:
            raise ValueError(f"image_span must be positive, got {image_span}")
        self.tokenizer = tokenizer
        self.image_span = image_span
        ids = tokenizer.special_tokens
        self.ref_start_id, self.ref_end_id = ids["<ref>"], ids["</ref>"]
        self.box_start_id, self.box_end_id = ids["<box>"], ids["</box>"]
        self.quad_start_id, self.quad_end_id = ids["<quad>"], ids["</quad>"]
        self.img_start_id, self.img_end_id, self.img_pad_id = ids["<img>"], ids["</img>"], ids["<imgpad>"]
        if (self.img_end_id, self.img_pad_id) != (self.img_start_id + 1, self.img_start_id + 2):
            raise ValueError("the model finds </img> and <imgpad> at <img> + 1 and + 2; this tokenizer's ids "
                             f"are {self.img_start_id}, {self.img_end_id}, {self.img_pad_id}")

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __repr__(self) -> str:
        return f"QwenVLTokenizer({self.tokenizer!r}, image_span={self.image_span})"

    # --- encoding --------------------------------------------------------------------------------
    def image_span_ids(self, path: str) -> list[int]:
        """``<img>``, one id per byte of ``path`` (NFC, UTF-8), ``<imgpad>`` up to the span, ``</img>``."""
        data = unicodedata.normalize("NFC", path).encode("utf-8")
        if len(data) > self.image_span:
            raise ValueError(f"image path {path[:60]!r}... is {len(data)} bytes long; the span between <img> and "
                             f"</img> holds at most {self.image_span} bytes")
        return [self.img_start_id, *data, *[self.img_pad_id] * (self.image_span - len(data)), self.img_end_id]

    def encode(self, text: str, *, allowed_special: Any = "all", disallowed_special: Any = ()) -> list[int]:
        """Text -> ids, with every ``<img>path</img>`` expanded to a fixed-length image span."""
        ids: list[int] = []
        position = 0
        while True:
            start = text.find("<img>", position)
            stray = text.find("</img>", position, None if start < 0 else start)
            if stray >= 0:
                raise ValueError(f"</img> at character {stray} closes no <img>")
            if start < 0:
                break
            end = text.find("</img>", start)
            if end < 0:
                raise ValueError(f"<img> at character {start} has no closing </img>: {text[start:start + 60]!r}")
            ids += self.tokenizer.encode(text[position:start], allowed_special=allowed_special,
                                         disallowed_special=disallowed_special)
            ids += self.image_span_ids(text[start + len("<img>"):end])
            position = end + len("</img>")
        ids += self.tokenizer.encode(text[position:], allowed_special=allowed_special,
                                     disallowed_special=disallowed_special)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids -> text; each complete image span becomes ``<img>path</img>`` again."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]  # type: ignore[union-attr]
        pieces: list[str] = []
        plain: list[int] = []
        i = 0
        while i < len(ids):
            end = self._span_end(ids, i)
            if end is None:
                plain.append(ids[i])
                i += 1
                continue
            pieces.append(self.tokenizer.decode(plain, skip_special_tokens=skip_special_tokens, errors=errors))
            plain = []
            path = self.path_from_span(ids[i + 1:end])
            pieces.append(path if skip_special_tokens else f"<img>{path}</img>")
            i = end + 1
        pieces.append(self.tokenizer.decode(plain, skip_special_tokens=skip_special_tokens, errors=errors))
        return "".join(pieces)

    def _span_end(self, ids: list[int], i: int) -> int | None:
        end = i + self.image_span + 1
        if ids[i] == self.img_start_id and end < len(ids) and ids[end] == self.img_end_id:
            return end
        return None

    def path_from_span(self, inner: Sequence[int]) -> str:
        """The path stored in the slots between ``<img>`` and ``</img>`` (bytes up to the first ``<imgpad>``)."""
        inner = list(inner)
        data = inner[:inner.index(self.img_pad_id)] if self.img_pad_id in inner else inner
        bad = [t for t in data if not 0 <= t < 256]
        if bad:
            raise ValueError(f"image span holds token id {bad[0]}, which is not a byte (0-255)")
        return bytes(data).decode("utf-8", errors="replace")

    # --- conversation formats ------------------------------------------------------------------------
    def from_list_format(self, items: Sequence[Mapping[str, Any]]) -> str:
        """``[{"image": path}, {"text": ...}, {"ref": ..., "box": [(x1, y1, x2, y2), ...]}]`` -> prompt text.

        Images become ``Picture n: <img>path</img>\\n``; boxes ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``.
        """
        text, images = "", 0
        for index, item in enumerate(items):
            if "image" in item:
                images += 1
                text += f"Picture {images}: <img>{item['image']}</img>\n"
            elif "text" in item:
                text += item["text"]
            elif "box" in item:
                if "ref" in item:
                    text += f"<ref>{item['ref']}</ref>"
                for box in item["box"]:
                    try:
                        text += format_box(tuple(box))
                    except BoxFormatError as error:
                        raise BoxFormatError(f"item {index}: {error}") from None
            else:
                raise ValueError(f"item {index} {dict(item)!r} has none of 'image', 'text', 'box'")
        return text

    def apply_chat_template(self, messages: Iterable[Mapping[str, str]], *, add_generation_prompt: bool = False,
                            system_prompt: str | None = "You are a helpful assistant.") -> ChatEncoding:
        """ChatML ids (image spans expanded, tags parsed in contents) and the assistant-only loss mask."""
        return encode_chatml(self, messages, add_generation_prompt=add_generation_prompt,
                             system_prompt=system_prompt, allowed_special="all")


def load_qwen_vl_tokenizer(source: str | Path | None = None, *, image_span: int | None = None) -> QwenVLTokenizer:
    """The Qwen-VL tokenizer: ``None`` = the real vocabulary with ids 151851-151859; or a checkpoint folder.

    For a folder the span defaults to its ``config.json``'s ``visual.n_queries`` (256 if absent).
    """
    if source is None:
        specials = {t.content: t.id for t in special_tokens_for("qwen1")}
        specials.update({t: QWEN_VL_FIRST_ID + i for i, t in enumerate(QWEN_VL_TOKENS)})
        tokenizer = Tokenizer(RankBPE(load_qwen_ranks()), specials, pattern=QWEN_PATTERN,
                              eos_token="<|endoftext|>", name="qwen-vl")
        return QwenVLTokenizer(tokenizer, image_span or IMAGE_SPAN)
    folder = Path(source)
    if image_span is None:
        config = folder / "config.json"
        visual = json.loads(config.read_text()).get("visual", {}) if config.is_file() else {}
        image_span = int(visual.get("n_queries", IMAGE_SPAN))
    return QwenVLTokenizer(load_tokenizer(folder), image_span)
