"""Chapter 10's generated data: tasks where image size and time matter, with exact answers.

Two tasks, drawn from seeds with Pillow (shapes and glyphs come from :mod:`qwen_edu.corpus.scenes`):

* **read** -- a picture of some size between 56 and 252 pixels per side (aspect ratios up to 4.5:1) holds one
  small dark digit among a few coloured shapes; the question is which digit it is. The glyph's box is
  14-16 pixels a side (``READ_GLYPH``), near the centre of one 28 px cell (the 2 x 2 patches that become one
  merged token): legible at the picture's own resolution, small and distorted once a large or elongated
  picture is squashed to a fixed square -- the case dynamic resolution is for.
* **move** -- a short video (4 or 6 frames of ``VIDEO_SIDE`` px) in which a coloured shape stands still for
  two frames, jumps by 1-2 merged tokens (28-56 px) left, right, up or down, and so on; the question is which
  way it moves. A temporal patch spans two frames with the shape at rest, and the ViT attends within a frame
  group only, so the answer exists nowhere but in comparing frame groups: the temporal axis is needed.

Prompts use a tiny word-level vocabulary (:class:`VLVocab`) with Qwen2-VL's special tokens, e.g.
``<|vision_start|> <|image_pad|> x n <|vision_end|> which digit ?`` -> ``7 <|endoftext|>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from qwen_edu.corpus.scenes import BACKGROUNDS, COLOURS, draw_object

__all__ = [
    "SIDES",
    "CURRICULUM_SIDES",
    "VIDEO_SIDE",
    "DIRECTIONS",
    "QUESTIONS",
    "VLVocab",
    "VLExample",
    "make_read_example",
    "make_move_example",
    "make_example",
    "make_examples",
]

#: Picture sides (pixels): multiples of 28, so dynamic resolution keeps every picture at its own size.
SIDES = (56, 84, 112, 140, 168, 196, 224, 252)
#: Sides a size curriculum steps through (``max_side`` of :func:`make_example`): from one merged token (28 px)
#: up to the largest held-out picture.
CURRICULUM_SIDES = (28, *SIDES)
#: Side of every video frame: 4 x 4 merged tokens per frame group, one grid for all videos (the task is
#: about time, not size).
VIDEO_SIDE = 112
DIRECTIONS = ("left", "right", "up", "down")
QUESTIONS = {"read": "which digit ?", "move": "which way does it move ?"}
_DISTRACTORS = ("circle", "square", "triangle")
#: Side of the digit's box (the glyph is about as tall), how far it strays from its cell's centre, and how
#: many distractor shapes, for the read task. (A glyph of 11-12 px inside one 14 px patch was not learned
#: from scratch in 1,500 steps even with the size curriculum; one that fills the centre of a merged token is.)
READ_GLYPH = (14, 16)
READ_JITTER = 2
READ_DISTRACTORS = (0, 2)
READ_BACKGROUNDS = BACKGROUNDS
_INK = (20, 20, 20)  # the digit's colour: darker than every shape colour in COLOURS


class VLVocab:
    """A word-level vocabulary: Qwen2-VL's vision special tokens, the task words, digits and directions."""

    specials = ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

    def __init__(self) -> None:
        words = sorted({w for q in QUESTIONS.values() for w in q.split()})
        self.tokens = [*self.specials, *words, *(str(d) for d in range(10)), *DIRECTIONS]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.eos_id, self.vision_start_id, self.vision_end_id, self.image_id, self.video_id = range(5)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as exc:
            raise ValueError(f"word {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.tokens[i] for i in ids)

    def answer_ids(self, task: str) -> list[int]:
        """The ids a correct answer to ``task`` can start with (the classes of the evaluation)."""
        return [self.ids[a] for a in (DIRECTIONS if task == "move" else [str(d) for d in range(10)])]


@dataclass
class VLExample:
    """One generated question: the picture (or frames), the question, the one-word answer and facts about it."""

    task: str
    frames: list[Any]  # PIL images: one for "read", 4 or 6 for "move"
    question: str
    answer: str
    info: dict[str, Any]

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        width, height = self.frames[0].size
        return height, width


def _free_box(rng: random.Random, height: int, width: int, side: int, taken: list[tuple[int, int, int, int]],
              gap: int = 4, margin: int = 4) -> tuple[int, int, int, int]:
    """A square box of ``side`` px, ``margin`` px inside the picture and ``gap`` px away from ``taken``."""
    for _ in range(200):
        x, y = rng.randint(margin, width - side - margin), rng.randint(margin, height - side - margin)
        box = (x, y, x + side, y + side)
        if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
               for b in taken):
            return box
    raise ValueError(f"no room for a {side} px box in {height}x{width} px")


def _read_sides(max_side: int | None) -> tuple[int, ...]:
    """The sides a read picture is drawn from: :data:`SIDES`, or the curriculum's up to ``max_side``."""
    if max_side is None:
        return SIDES
    allowed = tuple(s for s in CURRICULUM_SIDES if s <= max_side)
    if not allowed:
        raise ValueError(f"max_side={max_side} is below the smallest picture side ({CURRICULUM_SIDES[0]} px)")
    return allowed


def make_read_example(seed: int, max_side: int | None = None) -> VLExample:
    """A ``(h, w)`` picture with one 14-16 px digit among 0-2 coloured shapes of 6-9 px.

    ``max_side`` (for a size curriculum) draws both sides from :data:`CURRICULUM_SIDES` up to that many
    pixels instead of from :data:`SIDES`; a picture under 56 px a side holds the digit alone.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    sides = _read_sides(max_side)
    while True:
        height, width = rng.choice(sides), rng.choice(sides)
        if max(height, width) / min(height, width) <= 4.5:
            break
    image = Image.new("RGB", (width, height), rng.choice(READ_BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: the glyph's pixels are exactly the ink colour
    digit = str(rng.randint(0, 9))
    side = rng.randint(*READ_GLYPH)
    row, col = rng.randrange(height // 28), rng.randrange(width // 28)  # the digit's cell: one merged token
    x = 28 * col + (28 - side) // 2 + rng.randint(-READ_JITTER, READ_JITTER)
    y = 28 * row + (28 - side) // 2 + rng.randint(-READ_JITTER, READ_JITTER)
    taken = [(x, y, x + side, y + side)]
    draw_object(draw, digit, taken[0], _INK)
    distractors = rng.randint(*READ_DISTRACTORS) if min(height, width) >= 56 else 0
    for _ in range(distractors):
        box = _free_box(rng, height, width, rng.randint(6, 9), taken)
        taken.append(box)
        draw_object(draw, rng.choice(_DISTRACTORS), box, rng.choice(list(COLOURS.values())))
    return VLExample("read", [image], QUESTIONS["read"], digit, {"box": taken[0], "distractors": len(taken) - 1})


def make_move_example(seed: int, side: int = VIDEO_SIDE) -> VLExample:
    """4 or 6 frames; a shape rests for 2 frames (one temporal patch), then jumps by 1-2 merged tokens one way.

    The shape sits in the middle of a 28 px cell (one merged token) and jumps whole cells, so each frame
    group shows it in exactly one token; which way it went is only visible by comparing frame groups.
    Training and the held-out set use ``side=VIDEO_SIDE``; other sides (multiples of 28, at least 56) test
    whether a model's sense of direction carries over to grids it never saw.
    """
    from PIL import Image, ImageDraw

    if side < 56 or side % 28:
        raise ValueError(f"a video side must be a multiple of 28 and at least 56 px, got {side}")
    rng = random.Random(seed)
    height = width = side
    rows, cols = height // 28, width // 28
    groups = rng.choice((2, 3)) if max(rows, cols) > 2 else 2  # 3 groups need room for two jumps
    while True:
        direction, step = rng.choice(DIRECTIONS), rng.choice((1, 2))
        cells = cols if direction in ("left", "right") else rows
        if step * (groups - 1) < cells:
            break
    dc, dr = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[direction]
    span_r, span_c = abs(dr) * (groups - 1), abs(dc) * (groups - 1)
    r0 = rng.randrange(rows - span_r) + (span_r if dr < 0 else 0)
    c0 = rng.randrange(cols - span_c) + (span_c if dc < 0 else 0)
    background, colour = rng.choice(BACKGROUNDS), rng.choice(list(COLOURS.values()))
    kind, side = rng.choice(_DISTRACTORS), rng.randint(14, 20)
    frames = []
    for g in range(groups):
        x = 28 * (c0 + g * dc) + (28 - side) // 2
        y = 28 * (r0 + g * dr) + (28 - side) // 2
        frame = Image.new("RGB", (width, height), background)
        draw_object(ImageDraw.Draw(frame), kind, (x, y, x + side, y + side), colour)
        frames += [frame, frame.copy()]
    return VLExample("move", frames, QUESTIONS["move"], direction, {"step": step, "groups": groups})


def make_example(task: str, seed: int, max_side: int | None = None) -> VLExample:
    """One example of ``task`` (``"read"`` or ``"move"``); ``max_side`` caps a read picture's size (curriculum).

    Videos have one size (:data:`VIDEO_SIDE`), so ``max_side`` leaves them alone.
    """
    if task == "read":
        return make_read_example(seed, max_side)
    if task == "move":
        return make_move_example(seed)
    raise ValueError(f"unknown task {task!r}; choose 'read' or 'move'")


def make_examples(task: str, count: int, seed: int = 0) -> list[VLExample]:
    """``count`` examples of ``task`` from seeds ``seed * 1_000_003 + i`` (disjoint streams per ``seed``)."""
    return [make_example(task, seed * 1_000_003 + i) for i in range(count)]
