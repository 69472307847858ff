"""Chapter 10's data and training: exact answers, the three input variants, a training step that learns,
and the shipped models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen_edu.corpus.vl_resolution import (
    CURRICULUM_SIDES,
    DIRECTIONS,
    SIDES,
    VIDEO_SIDE,
    VLVocab,
    make_example,
    make_examples,
)
from qwen_edu.training.qwen2_vl import (
    FIXED_SIDE,
    VARIANTS,
    VLTrainConfig,
    _training_examples,
    collate,
    curriculum_side,
    encode_example,
    position_ids,
    small_model_config,
    train_variant,
)

VOCAB = VLVocab()


def test_examples_are_deterministic_and_varied():
    first, again = make_examples("read", 20, seed=3), make_examples("read", 20, seed=3)
    assert all(np.array_equal(np.asarray(a.frames[0]), np.asarray(b.frames[0])) for a, b in zip(first, again))
    assert [e.answer for e in first] == [e.answer for e in again]
    sizes = {e.size for e in make_examples("read", 200)}
    assert len(sizes) > 20 and max(max(h / w, w / h) for h, w in sizes) > 3  # many sizes and aspect ratios


def test_the_digit_is_drawn_where_the_example_says():
    for example in make_examples("read", 30, seed=1):
        x1, y1, x2, y2 = example.info["box"]
        ink = np.asarray(example.frames[0]).max(-1) < 60  # the digit is the only near-black thing
        ys, xs = np.nonzero(ink)
        assert len(xs) > 10
        assert x1 - 1 <= xs.min() and xs.max() <= x2 and y1 - 1 <= ys.min() and ys.max() <= y2  # glyph ~ box
        assert xs.min() // 28 == xs.max() // 28 and ys.min() // 28 == ys.max() // 28  # in one merged token


def test_the_shape_moves_the_way_the_answer_says():
    offsets = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    for example in make_examples("move", 40, seed=2):
        frames = [np.asarray(f).astype(int) for f in example.frames]
        assert len(frames) == 2 * example.info["groups"]
        centres = []
        for g in range(0, len(frames), 2):
            assert np.array_equal(frames[g], frames[g + 1])  # still within a temporal patch
            background = frames[g][0, 0]
            ys, xs = np.nonzero(np.abs(frames[g] - background).sum(-1) > 30)
            centres.append((ys.mean(), xs.mean()))
        dy, dx = np.sign(np.subtract(centres[1], centres[0])).astype(int)
        assert offsets[example.answer] == (dy, dx)
    assert {e.answer for e in make_examples("move", 40)} == set(DIRECTIONS)


def test_max_side_caps_the_picture_and_a_one_token_picture_holds_the_digit_alone():
    for seed in range(40):
        small = make_example("read", seed, max_side=28)
        assert small.size == (28, 28) and small.info["distractors"] == 0  # one merged token: the digit
        mid = make_example("read", seed, max_side=112)
        assert max(mid.size) <= 112 and set(mid.size) <= set(CURRICULUM_SIDES)
        assert make_example("move", seed, max_side=28).size == (VIDEO_SIDE, VIDEO_SIDE)  # videos: one size
    held_out = {e.size for e in make_examples("read", 300)}
    assert {s for size in held_out for s in size} == set(SIDES)  # no max_side: the full sizes, never 28
    with pytest.raises(ValueError, match="max_side=14 is below the smallest picture side"):
        make_example("read", 0, max_side=14)


def test_stage_one_reads_growing_pictures_then_both_tasks_train_at_full_size():
    config = VLTrainConfig(steps=90, read_steps=45)
    sides = [curriculum_side(step, config) for step in range(90)]
    assert sides[:5] == [28] * 5 and sides[5] == 56 and sides[44] == 252 and set(sides[45:]) == {None}
    assert [sides.count(s) for s in CURRICULUM_SIDES] == [5] * len(CURRICULUM_SIDES)
    first, later = _training_examples(0, config), [e for s in (45, 46) for e in _training_examples(s, config)]
    assert {e.task for e in first} == {"read"} and max(max(e.size) for e in first) == 28
    assert {e.task for e in later} == {"read", "move"}
    assert curriculum_side(0, VLTrainConfig(read_steps=0)) is None  # no first stage


def test_encoding_puts_the_loss_on_the_answer_only():
    example = make_example("read", 5)
    enc = encode_example(example, VOCAB)
    n_pads = int(enc.grid.prod()) // 4
    assert enc.input_ids[:n_pads + 2] == [VOCAB.vision_start_id] + [VOCAB.image_id] * n_pads + [VOCAB.vision_end_id]
    answer = [i for i, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert VOCAB.decode(answer) == f"{example.answer} <|endoftext|>"
    h, w = example.size
    assert enc.grid.tolist() == [[1, h // 14, w // 14]]  # dynamic: the picture's own size (multiples of 28)


def test_the_fixed_variant_squashes_every_picture_to_one_square():
    side = FIXED_SIDE // 14
    for task in ("read", "move"):
        enc = encode_example(make_example(task, 9), VOCAB, "fixed")
        assert enc.grid[0, 1:].tolist() == [side, side]
        assert enc.pixels.shape == (int(enc.grid.prod()), 1176)


def test_collate_packs_images_and_videos_and_positions_follow_the_variant():
    items = [encode_example(make_example(task, i), VOCAB) for i, task in enumerate(["read", "move", "read"])]
    batch = collate(items, VOCAB.eos_id)
    assert batch["image_grid_thw"].shape == (2, 3) and batch["video_grid_thw"].shape == (1, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    assert batch["attention_mask"].sum(-1).tolist() == [len(e.input_ids) for e in items]
    from qwen_edu.models.qwen2_vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration(small_model_config(VOCAB))
    one_d = position_ids(model, batch, "1d")
    mrope = position_ids(model, batch, "mrope")
    n = len(items[0].input_ids)
    assert one_d[:, 0, :n].tolist() == [list(range(n))] * 3
    assert int(mrope[:, 0, :n].max()) < n - 1  # M-RoPE ids stay smaller than the token count


def test_a_few_training_steps_lower_the_loss():
    config = VLTrainConfig(steps=12, batch_size=6, warmup_steps=2, lr=1e-3)
    _, log = train_variant(config, VOCAB)
    assert len(log) == 12
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="resolution must be 'dynamic' or 'fixed'"):
        VLTrainConfig(resolution="native")
    with pytest.raises(ValueError, match="unknown task 'count'"):
        make_example("count", 0)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        VOCAB.encode("which colour ?")


def test_the_shipped_models_and_their_card_agree():
    from qwen_edu.training.qwen2_vl import asset_path, eval_examples, evaluate, load_variant

    metrics = json.loads((asset_path("dynamic") / "metrics.json").read_text())
    assert set(metrics["variants"]) == set(VARIANTS)
    card = (asset_path("dynamic") / "README.md").read_text()
    for name, record in metrics["variants"].items():
        assert f"| `{name}` |" in card and f"{record['metrics']['read']:.3f}" in card
    assert metrics["tokens"]["fixed"] >= metrics["tokens"]["dynamic"]  # fixed gets at least the budget
    for name, record in metrics["variants"].items():  # `python -m qwen_edu.training.qwen2_vl` rebuilds them
        assert {k: record["config"][k] for k in VARIANTS[name]} == VARIANTS[name]
        assert record["config"]["steps"] == VLTrainConfig().steps and record["config"]["seed"] == 0
        assert record["eval_count_per_task"] == 300 and record["metrics"]["n"] == 600
    model, settings = load_variant("dynamic")
    held_out = eval_examples(300)[::15] + eval_examples(300)[300::15]  # 20 + 20 of the recorded set
    result = evaluate(model, held_out, VOCAB, **settings)
    recorded = metrics["variants"]["dynamic"]["metrics"]
    for task in ("read", "move"):  # a 20-example subset of the 300 recorded: within a few standard errors
        assert abs(result[task] - recorded[task]) <= 0.3


def test_the_shipped_numbers_say_what_chapter_10_says():
    """The chapter's reading of the ablation: both dynamic-resolution models read the digit and the fixed
    square does not (on small and large pictures alike); all three learned *move* at the trained size; on
    grids never seen, M-RoPE keeps more of it than 1D ids, which fall to chance or below."""
    from qwen_edu.training.qwen2_vl import asset_path

    metrics = json.loads((asset_path("dynamic") / "metrics.json").read_text())
    accuracy = {name: record["metrics"] for name, record in metrics["variants"].items()}
    for name in ("dynamic", "rope_1d"):
        assert accuracy[name]["read_small"] > 0.9 and accuracy[name]["read_large"] > 0.9
    assert accuracy["fixed"]["read_small"] < 0.25 and accuracy["fixed"]["read_large"] < 0.25  # chance 0.10
    assert all(a["move"] > 0.9 for a in accuracy.values())
    transfer = {name: {int(side): a for side, a in acc.items()}
                for name, acc in metrics["move_transfer"]["accuracy"].items()}
    assert metrics["move_transfer"]["count_per_side"] == 200
    for side in (84, 140, 168):  # grids the models never saw (they trained on 112 px = 4 x 4 tokens)
        assert transfer["dynamic"][side] > transfer["rope_1d"][side] + 0.15  # 3+ standard errors at 200
        assert transfer["fixed"][side] > 0.6  # squashed to one grid, every video looks like the trained size
    assert transfer["rope_1d"][140] < 0.25 and transfer["rope_1d"][168] < 0.25  # chance or below
    assert transfer["dynamic"][56] < 0.05  # 2 x 2 grids: it answers with a digit (the notebook shows it)


def test_move_transfer_evaluates_each_side_on_its_own_videos():
    from qwen_edu.corpus.vl_resolution import make_move_example
    from qwen_edu.training.qwen2_vl import asset_path, load_variant, move_transfer

    video = make_move_example(5, side=84)
    assert video.size == (84, 84) and make_move_example(5).size == (VIDEO_SIDE, VIDEO_SIDE)
    with pytest.raises(ValueError, match="multiple of 28 and at least 56 px, got 70"):
        make_move_example(0, side=70)
    model, settings = load_variant("rope_1d")
    recorded = json.loads((asset_path("dynamic") / "metrics.json").read_text())["move_transfer"]["accuracy"]
    live = move_transfer(model, VOCAB, **settings, sides=(112, 168), count=40)  # the first 40 of the 200
    assert set(live) == {112, 168}
    for side, value in live.items():
        assert abs(value - recorded["rope_1d"][str(side)]) <= 0.25  # 40 of 200: a few standard errors
