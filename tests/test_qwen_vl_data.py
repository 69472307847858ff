"""The generated scenes of chapter 7: deterministic pictures whose captions, answers and boxes are exact."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwen_edu.corpus.scenes import (
    COLOURS,
    KINDS,
    NUMBER_WORDS,
    SAMPLE_PHOTOS,
    caption_of,
    draw_object,
    make_scene,
    make_scenes,
    place_boxes,
    sample_photo,
)

SCENES = make_scenes(60, seed=3)


def test_the_same_seed_draws_the_same_scene():
    a, b = make_scene(123), make_scene(123)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects and a.caption == b.caption and a.questions == b.questions
    assert make_scene(124).image.tobytes() != a.image.tobytes()
    assert [s.seed for s in make_scenes(3, seed=1)] == [1_000_003, 1_000_004, 1_000_005]


@pytest.mark.parametrize("scene", SCENES[:30], ids=lambda s: str(s.seed))
def test_boxes_are_the_tight_boxes_of_the_drawn_pixels(scene):
    pixels = np.asarray(scene.image)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        inside = (pixels[y1:y2, x1:x2] == COLOURS[obj.colour]).all(-1)
        # every edge row/column of the box holds a pixel of the object's colour: the box is tight
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    for colour in {o.colour for o in scene.objects}:
        painted = (pixels == COLOURS[colour]).all(-1)
        covered = np.zeros_like(painted)
        for o in scene.objects:
            if o.colour == colour:
                covered[o.box[1]:o.box[3], o.box[0]:o.box[2]] = True
        assert not (painted & ~covered).any(), "no pixel of that colour lies outside the objects' boxes"


def test_the_label_map_marks_each_objects_pixels():
    for scene in SCENES[:20]:
        pixels = np.asarray(scene.image)
        assert scene.labels.shape == pixels.shape[:2] and scene.labels.max() == len(scene.objects)
        for i, obj in enumerate(scene.objects, start=1):
            mine = scene.labels == i
            assert (pixels[mine] == COLOURS[obj.colour]).all()
            ys, xs = np.nonzero(mine)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box


def test_objects_do_not_overlap_and_are_listed_left_to_right():
    for scene in SCENES:
        xs = [o.centre[0] for o in scene.objects]
        assert xs == sorted(xs)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
                assert a.name != b.name, "names are unique, so a <ref> phrase picks one object"


def test_captions_name_every_object_in_order():
    scene = next(s for s in SCENES if len(s.objects) == 3)
    a, b, c = scene.objects
    assert scene.caption.startswith(("a ", "an ")) and scene.caption.endswith(f" {c.name}.")
    assert scene.caption.index(a.name) < scene.caption.index(b.name) < scene.caption.index(c.name)
    orange = type(a)("star", "orange", (0, 0, 1, 1))
    red = type(a)("7", "red", (2, 0, 3, 1))
    assert caption_of((orange,)) == "an orange star."
    assert caption_of((red, orange)) == "a red 7 and an orange star."


def test_answers_are_true_of_the_scene():
    seen_types = set()
    for scene in SCENES:
        names = {o.name for o in scene.objects}
        for qa in scene.questions:
            seen_types.add(qa.type)
            if qa.type == "count":
                assert qa.answer == NUMBER_WORDS[len(scene.objects)]
            elif qa.type == "colour":
                kind = qa.question.removeprefix("What colour is the ").removesuffix("?")
                assert [o.colour for o in scene.objects if o.kind == kind] == [qa.answer]
            elif qa.type == "kind":
                colour = qa.question.split()[-1].rstrip("?")
                assert [o.kind for o in scene.objects if o.colour == colour] == [qa.answer]
            elif qa.type == "exists":
                name = qa.question.removeprefix("Is there a ").removesuffix("?")
                assert qa.answer == ("yes" if name in names else "no")
            elif qa.type == "side":
                obj = next(o for o in scene.objects if f"the {o.name} " in qa.question)
                assert qa.answer == ("left" if obj.centre[0] < scene.size[0] / 2 else "right")
    assert seen_types == {"count", "colour", "kind", "exists", "side"}


def test_boxes_normalise_into_the_qwen_vl_range():
    for scene in SCENES:
        for obj in scene.objects:
            box = scene.normalized_box(obj)
            assert all(0 <= v < 1000 for v in box) and box[0] < box[2] and box[1] < box[3]
            assert abs(box[0] - obj.box[0] * 1000 / scene.size[0]) < 1


def test_scenes_cover_every_colour_and_kind():
    objects = [o for s in make_scenes(300, seed=5) for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.kind for o in objects} == set(KINDS)
    assert 0.15 < sum(o.is_digit for o in objects) / len(objects) < 0.45


def test_drawing_primitives_report_bad_input():
    draw = ImageDraw.Draw(Image.new("RGB", (20, 20)))
    with pytest.raises(ValueError, match="unknown object kind 'hexagon'"):
        draw_object(draw, "hexagon", (0, 0, 10, 10), (255, 0, 0))
    with pytest.raises(ValueError, match="could not place 5 boxes"):
        place_boxes(random.Random(0), 5, 20, 15, 18)


def test_real_photos_ship_with_matplotlib():
    for name in SAMPLE_PHOTOS:
        photo = sample_photo(name)
        assert photo.mode == "RGB" and min(photo.size) >= 100
    with pytest.raises(ValueError, match="unknown sample photo"):
        sample_photo("nope")
