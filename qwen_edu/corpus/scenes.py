"""Generated pictures with exact labels: coloured shapes and digits drawn with Pillow, for the VL chapters.

A vision-language model needs pictures *and* text that is exactly right about them. Here every
picture is drawn from a seed, so its caption, its question-answer pairs and the bounding box of every
object are known exactly (the boxes are the tight boxes of the drawn pixels), and the same seed gives
the same picture everywhere:

    >>> scene = make_scene(7)
    >>> scene.caption                              # objects from left to right
    'a yellow 8 and a red 9.'
    >>> scene.objects[0].box                       # pixels: x1, y1, x2, y2 (x2, y2 exclusive)
    (55, 8, 73, 31)

The drawing primitives are public so that other chapters can draw their own scenes: :data:`COLOURS`,
:data:`SHAPES`, :func:`draw_object` (one shape or digit into a box), :func:`place_boxes` (non-overlapping
boxes), :func:`digit_font` (the bundled DejaVu Sans Bold font of matplotlib) and :func:`sample_photo`
(real photographs that ship inside installed packages, for qualitative demos; nothing is downloaded).
Everything is drawn without anti-aliasing, so each object's pixels have exactly its colour, and
:attr:`Scene.labels` says which object every pixel belongs to.
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLOURS",
    "SHAPES",
    "KINDS",
    "BACKGROUNDS",
    "NUMBER_WORDS",
    "SceneObject",
    "QA",
    "Scene",
    "digit_font",
    "draw_object",
    "place_boxes",
    "make_scene",
    "make_scenes",
    "caption_of",
    "questions_of",
    "sample_photo",
    "SAMPLE_PHOTOS",
]

#: Named colours (RGB), far apart so that a small model can tell them apart after resizing.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 55, 175),
    "orange": (240, 125, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
#: What an object can be: a shape, or a digit "0".."9" (drawn as a glyph).
KINDS = SHAPES + tuple(str(d) for d in range(10))
#: Light background tints (RGB): a little variety without hiding the objects.
BACKGROUNDS = ((250, 250, 250), (236, 236, 236), (245, 238, 222), (226, 236, 245))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its ``kind`` (a shape name or a digit), ``colour`` name and tight pixel ``box``."""

    kind: str
    colour: str
    box: Box

    @property
    def is_digit(self) -> bool:
        return self.kind.isdigit()

    @property
    def name(self) -> str:
        """``"red circle"``, ``"blue 7"``."""
        return f"{self.colour} {self.kind}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class QA:
    """A question about a scene, its exact answer and its type (``count``, ``colour``, ``kind``, ...)."""

    question: str
    answer: str
    type: str


@dataclass
class Scene:
    """A picture and everything true about it."""

    image: Image.Image
    objects: tuple[SceneObject, ...]
    seed: int
    caption: str = ""
    questions: tuple[QA, ...] = field(default_factory=tuple)
    #: ``[H, W]`` uint8: 0 on the background, ``i + 1`` on the pixels of ``objects[i]``.
    labels: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def normalized_box(self, obj: SceneObject) -> Box:
        """The object's box as Qwen-VL writes it: integer corners in [0, 1000)."""
        from qwen_edu.tokenizer.qwen_vl import normalize_box

        return normalize_box(obj.box, *self.image.size)


@functools.cache
def digit_font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Bold at ``size`` px, from matplotlib's bundled fonts (the same glyphs on every install)."""
    import matplotlib
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    return ImageFont.truetype(str(path), size)


def _star(box: Box, points: int = 5) -> list[tuple[float, float]]:
    import math

    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    out = []
    for i in range(2 * points):
        radius = r if i % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + i * math.pi / points
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def draw_object(draw: ImageDraw.ImageDraw, kind: str, box: Box, colour: tuple[int, int, int]) -> None:
    """Draw one filled shape (``circle``, ``square``, ``triangle``, ``star``) or digit ``"0"``-``"9"`` in ``box``.

    ``box = (x1, y1, x2, y2)`` is a square region in pixels; the drawn pixels stay inside it (a digit's
    glyph is centred and is narrower than the box). Set ``draw.fontmode = "1"`` for glyphs without
    anti-aliasing (as :func:`make_scene` does).
    """
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif kind == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif kind == "triangle":
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)
    elif kind == "star":
        draw.polygon(_star((x1, y1, x2 - 1, y2 - 1)), fill=colour)
    elif kind.isdigit() and len(kind) == 1:
        font = digit_font(int((y2 - y1) * 1.25))
        left, top, right, bottom = draw.textbbox((0, 0), kind, font=font)
        at = ((x1 + x2) / 2 - (left + right) / 2, (y1 + y2) / 2 - (top + bottom) / 2)
        draw.text(at, kind, fill=colour, font=font)
    else:
        raise ValueError(f"unknown object kind {kind!r}; expected one of {KINDS}")


def place_boxes(rng: random.Random, count: int, size: int, min_side: int, max_side: int, gap: int = 3,
                tries: int = 200) -> list[Box]:
    """``count`` square boxes inside a ``size`` x ``size`` canvas, at least ``gap`` pixels apart."""
    boxes: list[Box] = []
    for _ in range(tries):
        if len(boxes) == count:
            break
        side = rng.randint(min_side, max_side)
        x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
        box = (x, y, x + side, y + side)
        if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
               for b in boxes):
            boxes.append(box)
    if len(boxes) < count:
        raise ValueError(f"could not place {count} boxes of side {min_side}-{max_side} in {size} px")
    return boxes


def _with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption_of(objects: tuple[SceneObject, ...]) -> str:
    """``"a red circle, a blue 7 and an orange star."``: every object, from left to right."""
    names = [_with_article(o.name) for o in objects]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text + "."


def questions_of(objects: tuple[SceneObject, ...], size: int, rng: random.Random) -> tuple[QA, ...]:
    """Questions with exact one-word answers: count, colour, kind, presence, left/right."""
    qas = [QA("How many objects are there?", NUMBER_WORDS[len(objects)], "count")]
    kinds = [o.kind for o in objects]
    colours = [o.colour for o in objects]
    for o in objects:
        noun = "shape" if not o.is_digit else "digit"
        if kinds.count(o.kind) == 1:
            qas.append(QA(f"What colour is the {o.kind}?", o.colour, "colour"))
        if colours.count(o.colour) == 1:
            qas.append(QA(f"Which {noun} is {o.colour}?", o.kind, "kind"))
        side = "left" if o.centre[0] < size / 2 else "right"
        qas.append(QA(f"Is the {o.name} on the left or on the right?", side, "side"))
    present = rng.choice(objects)
    qas.append(QA(f"Is there a {present.name}?", "yes", "exists"))
    while True:  # an object that is not in the picture, told apart by colour or kind
        absent = f"{rng.choice(list(COLOURS))} {rng.choice(KINDS)}"
        if absent not in {o.name for o in objects}:
            break
    qas.append(QA(f"Is there a {absent}?", "no", "exists"))
    return tuple(qas)


def make_scene(seed: int, size: int = 96, max_objects: int = 3, digit_rate: float = 0.3) -> Scene:
    """Draw the scene of ``seed``: 1 to ``max_objects`` objects with distinct names on a light background.

    About ``digit_rate`` of the objects are digits, the rest shapes. Object sides are 22-40% of the
    image. Objects are listed (and captioned) from left to right.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    count = rng.randint(1, max_objects)
    boxes = place_boxes(rng, count, size, int(0.22 * size), int(0.40 * size))
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    names: set[str] = set()
    objects, layers = [], []
    for box in boxes:
        while True:
            kind = str(rng.randint(0, 9)) if rng.random() < digit_rate else rng.choice(SHAPES)
            colour = rng.choice(list(COLOURS))
            if f"{colour} {kind}" not in names:
                names.add(f"{colour} {kind}")
                break
        layer = Image.new("1", (size, size), 0)  # this object's pixels, to measure its tight box
        mask_draw = ImageDraw.Draw(layer)
        mask_draw.fontmode = "1"
        draw_object(mask_draw, kind, box, 1)
        tight = layer.getbbox()
        assert tight is not None
        image.paste(COLOURS[colour], mask=layer)
        objects.append(SceneObject(kind, colour, tight))
        layers.append(np.asarray(layer, dtype=bool))
    order = sorted(range(count), key=lambda i: (objects[i].centre[0], objects[i].centre[1]))
    ordered = tuple(objects[i] for i in order)
    labels = np.zeros((size, size), dtype=np.uint8)
    for rank, i in enumerate(order):
        labels[layers[i]] = rank + 1
    return Scene(image, ordered, seed, caption_of(ordered), questions_of(ordered, size, rng), labels)


def make_scenes(count: int, seed: int = 0, **kwargs: int | float) -> list[Scene]:
    """``count`` scenes from seeds ``seed * 1_000_003 + i`` (disjoint streams for different ``seed``s)."""
    return [make_scene(seed * 1_000_003 + i, **kwargs) for i in range(count)]  # type: ignore[arg-type]


#: Real photographs shipped inside matplotlib (a core dependency): name -> path inside ``mpl-data``.
SAMPLE_PHOTOS = {"grace_hopper": "sample_data/grace_hopper.jpg", "present": "sample_data/Minduka_Present_Blue_Pack.png"}


def sample_photo(name: str = "grace_hopper") -> Image.Image:
    """A real photograph from an installed package (RGB), for out-of-distribution demos."""
    import matplotlib
    from PIL import Image

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"unknown sample photo {name!r}; choose one of {sorted(SAMPLE_PHOTOS)}")
    path = os.path.join(matplotlib.get_data_path(), SAMPLE_PHOTOS[name])
    with Image.open(path) as image:
        return image.convert("RGB")
