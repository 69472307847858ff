"""Chapter 12's experiment: can a small model say *when* something happens in videos of varying frame rate?

Qwen2.5-VL samples videos at varying frame rates in training ("dynamic FPS") and puts the frame groups on an
absolute clock in M-RoPE (:mod:`qwen_edu.vision.video_time`). This module trains two small
:class:`~qwen_edu.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration` models on the same generated task,
seed and schedule; they differ in one thing:

* ``absolute`` -- temporal ids on the clock: ``second_per_grid = 2 / fps``, 2 ids per second (Qwen2.5-VL);
* ``frame_index`` -- temporal ids count frame groups, 1 per group whatever the frame rate (Qwen2-VL's rule,
  obtained here by telling the model every video has 0.5 s per grid).

**The task** (:func:`make_when_example`, drawn with :mod:`qwen_edu.corpus.scenes`): a small picture stays empty
until a coloured shape appears in it at some moment and stays; the video is sampled at 1 or 2 frames per second
(the book's choice), 3 or 4 frame groups of two identical frames; the question ``when does it appear ?`` is
answered with the second the shape appears (1, 2, 3 at 2 fps; 2, 4, 6 at 1 fps). The frames of a 2 fps and a
1 fps video can be pixel-identical -- only the clock tells them apart -- so with frame-index ids the answer is a
coin flip between ``k`` and ``2k``, while absolute-time ids make it exact. Prompts use chapter 10's word-level
vocabulary (:class:`~qwen_edu.corpus.vl_resolution.VLVocab`) plus ``when`` and ``appear``.

``python -m qwen_edu.training.qwen2_5_vl`` rebuilds the shipped models (``qwen_edu/assets/qwen2_5_vl_clock``),
their metrics and model card; chapter 12 only evaluates them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from qwen_edu.corpus.scenes import BACKGROUNDS, COLOURS, draw_object
from qwen_edu.corpus.vl_resolution import VLExample, VLVocab
from qwen_edu.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from qwen_edu.training.loss import causal_lm_loss
from qwen_edu.training.optim import train_steps
from qwen_edu.training.qwen2_vl import Encoded, collate
from qwen_edu.training.trainer import init_weights
from qwen_edu.vision.dynamic_resolution import preprocess_video
from qwen_edu.vision.qwen2_5_vl_vit import Qwen2_5VisionConfig
from qwen_edu.vision.video_time import second_per_grid

__all__ = [
    "FRAME_RATES",
    "VARIANTS",
    "ClockVocab",
    "ClockTrainConfig",
    "make_when_example",
    "small_model_config",
    "encode_when_example",
    "train_variant",
    "predict",
    "evaluate",
    "eval_examples",
    "asset_path",
    "load_variant",
    "build_assets",
]

#: Frame rates the videos are sampled at (the book's choice: two, so that one frame-index sequence fits both).
FRAME_RATES = (1.0, 2.0)
GROUPS = (3, 4)
SIDES = (56, 84)
SHAPES = ("circle", "square", "triangle")
QUESTION = "when does it appear ?"
#: variant -> how the temporal ids are made: the video's real seconds per grid, or 0.5 s for every video
#: (0.5 s x 2 ids per second = 1 id per frame group, Qwen2-VL's rule).
VARIANTS: dict[str, str] = {"absolute": "absolute", "frame_index": "frame_index"}


class ClockVocab(VLVocab):
    """Chapter 10's vocabulary plus the words ``when`` and ``appear``."""

    def __init__(self) -> None:
        super().__init__()
        for word in ("when", "appear"):
            self.ids[word] = len(self.tokens)
            self.tokens.append(word)

    def answer_ids(self, task: str = "when") -> list[int]:
        return [self.ids[str(s)] for s in (1, 2, 3, 4, 6)]


def make_when_example(seed: int, fps: float | None = None) -> VLExample:
    """An empty picture until a shape appears at frame group ``k``; the answer is ``k * 2 / fps`` seconds.

    ``info`` holds ``fps``, ``groups``, ``jump_group`` (``k``) and ``second_per_grid``. Each frame group is two
    identical frames (one temporal patch), so the video's pictures are the same at either frame rate.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    height, width = rng.choice(SIDES), rng.choice(SIDES)
    drawn = rng.choice(FRAME_RATES)  # drawn either way: the same seed gives the same pictures at any fps
    fps = fps if fps is not None else drawn
    groups = rng.choice(GROUPS)
    jump = rng.randint(1, groups - 1)
    r, c = rng.randrange(height // 28), rng.randrange(width // 28)
    background, colour = rng.choice(BACKGROUNDS), rng.choice(list(COLOURS.values()))
    kind, side = rng.choice(SHAPES), rng.randint(14, 20)
    x, y = 28 * c + (28 - side) // 2, 28 * r + (28 - side) // 2
    frames = []
    for g in range(groups):
        frame = Image.new("RGB", (width, height), background)
        if g >= jump:
            draw_object(ImageDraw.Draw(frame), kind, (x, y, x + side, y + side), colour)
        frames += [frame, frame.copy()]
    seconds = second_per_grid(fps)
    answer = jump * seconds
    return VLExample("when", frames, QUESTION, str(int(answer)),
                     {"fps": fps, "groups": groups, "jump_group": jump, "second_per_grid": seconds})


def small_model_config(vocab: ClockVocab) -> Qwen2_5_VLConfig:
    """The book's small Qwen2.5-VL: ViT width 64 (2 blocks, the second with full attention), decoder width 96
    (3 layers, head_dim 24, M-RoPE section [4, 4, 4]), 2 temporal ids per second like the released models."""
    vision = Qwen2_5VisionConfig(depth=2, embed_dim=64, out_hidden_size=96, num_heads=4, intermediate_size=128,
                                 window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
    return Qwen2_5_VLConfig(
        vocab_size=len(vocab), hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=vocab.eos_id, pad_token_id=vocab.eos_id,
        vision_config=vision, image_token_id=vocab.image_id, video_token_id=vocab.video_id,
        vision_start_token_id=vocab.vision_start_id, vision_end_token_id=vocab.vision_end_id,
        mrope_section=[4, 4, 4],
    )


@dataclass
class ClockTrainConfig:
    """One training run (the defaults are the shipped models')."""

    time_ids: str = "absolute"  # or "frame_index"
    steps: int = 900
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    init_std: float = 0.1  # about 1/sqrt(width), as in chapter 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.time_ids not in VARIANTS:
            raise ValueError(f"time_ids must be one of {sorted(VARIANTS)}, got {self.time_ids!r}")


def encode_when_example(example: VLExample, vocab: ClockVocab, with_answer: bool = True) -> Encoded:
    """Prompt ``<|vision_start|> <|video_pad|> x n <|vision_end|> when does it appear ?`` (+ answer, eos)."""
    pixels, grid = preprocess_video(example.frames, 28 * 28, 84 * 84)
    prompt = ([vocab.vision_start_id] + [vocab.video_id] * (int(grid.prod()) // 4) + [vocab.vision_end_id]
              + vocab.encode(example.question))
    answer = vocab.encode(example.answer) + [vocab.eos_id] if with_answer else []
    return Encoded(prompt + answer, [-100] * len(prompt) + answer, pixels, grid, True)


def _batch(examples: Sequence[VLExample], vocab: ClockVocab, time_ids: str, with_answer: bool = True,
           ) -> dict[str, Any]:
    batch = collate([encode_when_example(e, vocab, with_answer) for e in examples], vocab.eos_id)
    seconds = [e.info["second_per_grid"] if time_ids == "absolute" else 0.5 for e in examples]
    batch["second_per_grid_ts"] = torch.tensor(seconds)
    return batch


def _forward(model: Qwen2_5_VLForConditionalGeneration, batch: dict[str, Any]) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _training_examples(step: int, config: ClockTrainConfig) -> list[VLExample]:
    """The batch of ``step``: fresh examples from seeds that never reach the evaluation stream."""
    base = 10_000_000 * (config.seed + 1) + step * config.batch_size
    return [make_when_example(base + i) for i in range(config.batch_size)]


def train_variant(config: ClockTrainConfig, vocab: ClockVocab | None = None, progress: bool = False,
                  on_step: Callable[[int, float], None] | None = None,
                  ) -> tuple[Qwen2_5_VLForConditionalGeneration, list[dict[str, float]]]:
    """Train one model from scratch; returns it (in eval mode) and the per-step log."""
    vocab = vocab or ClockVocab()
    torch.manual_seed(config.seed)
    model = Qwen2_5_VLForConditionalGeneration(small_model_config(vocab))
    init_weights(model.model, std=config.init_std, seed=config.seed)

    def loss_at(step: int) -> torch.Tensor:
        batch = _batch(_training_examples(step, config), vocab, config.time_ids)
        return causal_lm_loss(_forward(model, batch), batch["labels"])

    log = train_steps(model, loss_at, steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
                      progress=config.time_ids if progress else None, on_step=on_step)
    return model.eval(), log


@torch.no_grad()
def predict(model: Qwen2_5_VLForConditionalGeneration, examples: Sequence[VLExample], vocab: ClockVocab,
            time_ids: str = "absolute", batch_size: int = 64) -> list[str]:
    """The greedy answer to each example, among the possible answers (the arg-max after the question)."""
    allowed = torch.tensor(vocab.answer_ids())
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = _batch(chunk, vocab, time_ids, with_answer=False)
        logits = _forward(model, batch)
        last = logits[torch.arange(len(chunk)), batch["attention_mask"].sum(-1) - 1]
        answers += [vocab.tokens[int(allowed[i])] for i in last[:, allowed].argmax(-1).tolist()]
    return answers


def evaluate(model: Qwen2_5_VLForConditionalGeneration, examples: Sequence[VLExample], vocab: ClockVocab,
             time_ids: str = "absolute") -> dict[str, Any]:
    """Accuracy overall and per frame rate, and how often a wrong answer is the other frame rate's reading."""
    guesses = predict(model, examples, vocab, time_ids)
    right = [g == e.answer for g, e in zip(guesses, examples)]

    def accuracy(fps: float | None = None) -> float:
        hits = [r for r, e in zip(right, examples) if fps is None or e.info["fps"] == fps]
        return sum(hits) / len(hits)

    def other_rate(e: VLExample) -> str:  # the answer the same frame groups would mean at the other frame rate
        k = e.info["jump_group"]
        return str(2 * k if e.info["fps"] == 2.0 else k)

    wrong = [(g, e) for g, e, r in zip(guesses, examples, right) if not r]
    swapped = sum(g == other_rate(e) for g, e in wrong)
    return {"accuracy": accuracy(), "fps_1": accuracy(1.0), "fps_2": accuracy(2.0),
            "wrong_is_other_rate": swapped / len(wrong) if wrong else None, "n": len(examples)}


def eval_examples(count: int = 400) -> list[VLExample]:
    """The held-out set: ``count`` examples from seed stream 1 (training uses streams >= 10^7)."""
    return [make_when_example(1_000_003 + i) for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# The shipped models
# ---------------------------------------------------------------------------------------------------
def asset_path(variant: str = "absolute") -> Path:
    """Folder of a shipped variant under ``qwen_edu/assets/qwen2_5_vl_clock``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    path = Path(str(files("qwen_edu") / "assets" / "qwen2_5_vl_clock" / variant))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model; build it with `python -m qwen_edu.training.qwen2_5_vl`")
    return path


def load_variant(variant: str = "absolute") -> Qwen2_5_VLForConditionalGeneration:
    """A shipped variant (fp32, eval mode)."""
    import qwen_edu

    return qwen_edu.load_model(asset_path(variant), dtype=torch.float32)


def build_assets(out: str | Path, steps: int | None = None, eval_count: int = 400, progress: bool = True,
                 ) -> dict[str, Any]:
    """Train both variants (seed 0) and write them, their metrics and the model card under ``out``."""
    from qwen_edu.checkpoint import save_model

    out = Path(out)
    vocab = ClockVocab()
    held_out = eval_examples(eval_count)
    summary: dict[str, Any] = {"variants": {}, "eval_count": eval_count}
    for name in VARIANTS:
        config = ClockTrainConfig(time_ids=name)
        if steps is not None:
            config = replace(config, steps=steps)
        start = time.perf_counter()
        model, log = train_variant(config, vocab, progress=progress)
        seconds = time.perf_counter() - start
        metrics = evaluate(model, held_out, vocab, name)
        save_model(model, out / name)
        tail = [r["loss"] for r in log[-50:]]
        record = {"config": asdict(config), "train_seconds": round(seconds, 1),
                  "final_loss": round(sum(tail) / len(tail), 4), "metrics": metrics,
                  "parameters": model.num_parameters()}
        (out / name / "training_log.json").write_text(
            json.dumps({**record, "log": log[:: max(1, len(log) // 200)]}, indent=1))
        summary["variants"][name] = record
        if progress:
            print(f"{name}: {json.dumps(metrics)} ({seconds:.0f} s)")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "README.md").write_text(model_card(summary))
    return summary


def model_card(summary: dict[str, Any]) -> str:
    rows = []
    for name, record in summary["variants"].items():
        m = record["metrics"]
        swapped = "-" if m["wrong_is_other_rate"] is None else f"{m['wrong_is_other_rate']:.2f}"
        rows.append(f"| `{name}` | {m['accuracy']:.3f} | {m['fps_1']:.3f} | {m['fps_2']:.3f} | {swapped} | "
                    f"{record['final_loss']:.3f} | {record['train_seconds']:.0f} |")
    main = summary["variants"]["absolute"]
    return "\n".join([
        "# Chapter 12's small Qwen2.5-VL models: absolute time vs frame index",
        "",
        "Two `Qwen2_5_VLForConditionalGeneration` models (qwen_edu) trained from scratch on CPU on the *when*",
        "task of `qwen_edu.training.qwen2_5_vl`: a shape appears in a small video sampled at 1 or 2 frames per",
        "second; the answer is the second it appears. They differ only in the temporal M-RoPE ids:",
        "`absolute` puts frame groups on the clock (Qwen2.5-VL), `frame_index` counts groups (Qwen2-VL).",
        f"Sizes and schedule are the book's choices: {main['parameters']:,} parameters, {main['config']['steps']}"
        f" steps of {main['config']['batch_size']} fresh examples, AdamW lr {main['config']['lr']}, seed"
        f" {main['config']['seed']}.",
        "",
        "Rebuild:",
        "",
        "```bash",
        "python -m qwen_edu.training.qwen2_5_vl --out qwen_edu/assets/qwen2_5_vl_clock",
        "```",
        "",
        f"Held-out accuracy ({summary['eval_count']} examples; 'other rate' = share of wrong answers that are the",
        "other frame rate's reading of the same frame groups):",
        "",
        "| variant | accuracy | 1 fps | 2 fps | wrong = other rate | final loss | train s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Training times were measured on a shared two-core machine and are inflated by the contention.",
        "",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Train chapter 12's two small Qwen2.5-VL models.")
    parser.add_argument("--out", default="qwen_edu/assets/qwen2_5_vl_clock")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps (for a quick try)")
    parser.add_argument("--eval-count", type=int, default=400)
    args = parser.parse_args(argv)
    summary = build_assets(args.out, args.steps, args.eval_count)
    print(json.dumps({k: v["metrics"] for k, v in summary["variants"].items()}, indent=1))
    return summary


if __name__ == "__main__":
    main()
