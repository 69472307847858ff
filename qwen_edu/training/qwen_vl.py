"""A small Qwen-VL trained on a CPU: the three stages of the Qwen-VL recipe on generated scenes.

Qwen-VL (Bai et al., 2023) trains in three stages; this module runs the same schedule at toy scale:

=============  =========================  ==========  ===============================================
stage          data                       resolution  trained (the rest frozen)
=============  =========================  ==========  ===============================================
1 pretrain     captions                   48 px       the ViT and the adapter; **the LLM is frozen**
                                                      (the paper: 224 px)
2 multitask    captions, VQA, grounding   96 px       **everything** (the paper: 448 px)
3 sft          ChatML conversations       96 px       the adapter and the LLM; **the ViT is frozen**
=============  =========================  ==========  ===============================================

The book's choices (not the paper's):

* The language model is the book's base model (chapter 3), converted to the Qwen-1 layout Qwen-VL uses
  (its 2 key/value heads repeated to 6 -- an exact conversion -- and its tied head untied). It has only
  read children's stories, so a **stage 0** ("language") first continues its pre-training on the text of
  the scene domain alone (captions, questions, boxes; no pictures): Qwen-7B already knows words such as
  "triangle", ours must learn them before a frozen LLM can be asked to say them.
* The ViT is small and starts from random weights (Qwen-VL starts from OpenCLIP's ViT-bigG).
* Pictures are :mod:`qwen_edu.corpus.scenes` drawn on the fly from seeds, so no scene is ever repeated,
  and held-out scenes come from another seed range.
* 8 px patches and 36 queries on a 6x6 grid: stage 1 sees a 6x6 patch grid (one patch per query, like
  224 px = 16x16 patches for Qwen-VL's 256 queries) and stages 2-3 a 12x12 grid (four patches per
  query, like 448 px). The learned ViT position table is 6x6 and is resized bicubically to 12x12.

After each stage the model is measured on held-out scenes: caption exact-match accuracy, VQA
exact-match accuracy and grounding IoU (mean, and the share of boxes with IoU >= 0.5).

``python -m qwen_edu.training.qwen_vl --out qwen_edu/assets/qwen_vl_model`` builds the shipped model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.corpus.scenes import COLOURS, KINDS, QA, Scene, SceneObject, make_scene
from qwen_edu.models.qwen_vl import QwenVLConfig, QwenVLForCausalLM
from qwen_edu.tokenizer.qwen_vl import (
    QwenVLTokenizer,
    add_qwen_vl_tokens,
    box_iou,
    parse_boxes,
)
from qwen_edu.training.data import IGNORE_INDEX
from qwen_edu.training.loss import causal_lm_loss
from qwen_edu.training.optim import lr_at_step
from qwen_edu.vision.qwen_vl_vit import QwenVLVisionConfig, QwenVLVisionTransformer, image_transform

__all__ = [
    "StageSettings",
    "VLSettings",
    "STAGES",
    "qwen_vl_model_path",
    "build_tokenizer",
    "build_model",
    "qwen1_from_qwen2",
    "set_trainable",
    "stage_example",
    "encode_example",
    "collate",
    "patch_targets",
    "train_stage",
    "generate_answers",
    "held_out_scenes",
    "evaluation_requests",
    "evaluate",
    "run_pipeline",
    "main",
]

MAX_OBJECTS = 2
HELD_OUT_SEED = 10_000_000  # held-out scenes use seeds from here on; training seeds stay far below
CAPTION_PROMPT = "Generate the caption in English:"
ANSWER_SUFFIX = " Answer:"
STAGES = ("vision", "language", "pretrain", "multitask", "sft")


@dataclass
class StageSettings:
    """One training stage: its data, resolution, steps and which parts learn."""

    name: str
    steps: int
    image_size: int
    lr: float  # learning rate of the vision side (0 = frozen)
    llm_lr: float  # learning rate of the language model (0 = frozen)
    train_vit: bool  # the ViT (conv1, positional table, blocks) learns when lr > 0; else only the adapter
    tasks: tuple[str, ...]  # "patches" (0a), "text" (0b), "caption"/"describe"/"vqa"/"ground" (1-2), "chat" (3)
    batch_size: int = 32
    warmup: int = 30


@dataclass
class VLSettings:
    """Everything that defines the shipped model's run (seeded, so the run is reproducible)."""

    visual: dict[str, Any] = field(default_factory=lambda: dict(
        width=96, layers=3, heads=4, mlp_ratio=4.0, image_size=96, patch_size=8, n_queries=36,
        positional_grid=6))
    stages: tuple[StageSettings, ...] = (
        StageSettings("vision", 800, 96, lr=2e-3, llm_lr=0.0, train_vit=True, tasks=("patches",)),
        StageSettings("language", 150, 96, lr=0.0, llm_lr=1e-3, train_vit=False, tasks=("text",)),
        StageSettings("pretrain", 300, 48, lr=1.5e-3, llm_lr=0.0, train_vit=True, tasks=("caption",),
                      batch_size=16),
        StageSettings("multitask", 1200, 96, lr=1.5e-3, llm_lr=1e-3, train_vit=True,
                      tasks=("describe", "vqa", "ground"), batch_size=16),
        StageSettings("sft", 300, 96, lr=3e-4, llm_lr=1e-4, train_vit=False, tasks=("chat",), batch_size=16),
    )
    #: Also run stage 1 with the LLM unfrozen (from the same start, then discarded), to measure what
    #: freezing the small LLM costs; recorded as the "pretrain_llm_unfrozen" entry of the report.
    ablate_frozen_llm: bool = True
    scene_size: int = 96
    seed: int = 0
    eval_scenes: int = 100
    weight_decay: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def qwen_vl_model_path() -> Path:
    """The folder of the shipped small Qwen-VL (``qwen_edu/assets/qwen_vl_model``)."""
    path = Path(str(files("qwen_edu") / "assets" / "qwen_vl_model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model; build it with `python -m qwen_edu.training.qwen_vl "
                                "--out qwen_edu/assets/qwen_vl_model`")
    return path


# --- model and tokenizer ----------------------------------------------------------------------------------
def build_tokenizer(base_dir: str | Path | None = None, image_span: int = 36) -> QwenVLTokenizer:
    """The base model's tokenizer plus the nine Qwen-VL tokens, appended after its specials."""
    from qwen_edu.tokenizer import load_tokenizer
    from qwen_edu.training.presets import base_model_path

    base = load_tokenizer(base_dir or base_model_path())
    return QwenVLTokenizer(add_qwen_vl_tokens(base), image_span)


@torch.no_grad()
def qwen1_from_qwen2(source: nn.Module, target: QwenVLForCausalLM) -> None:
    """Copy a Qwen2 decoder (GQA, maybe tied) into ``target``'s Qwen-1 decoder (MHA, untied), exactly.

    Query head h of a GQA model reads key/value head ``h // group``; repeating each k/v head's rows
    ``group`` times gives the MHA weights that compute the same attention. The tied embedding is copied
    into the separate ``lm_head``.
    """
    src, dst = source.model, target.model
    group = source.config.num_attention_heads // source.config.num_key_value_heads
    d = source.config.head_dim
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    target.lm_head.weight.copy_(source.lm_head.weight)
    for a, b in zip(src.layers, dst.layers):
        b.load_state_dict({k: v for k, v in a.state_dict().items()
                           if not k.startswith(("self_attn.k_proj", "self_attn.v_proj"))}, strict=False)
        for name in ("k_proj", "v_proj"):
            s, t = getattr(a.self_attn, name), getattr(b.self_attn, name)
            t.weight.copy_(s.weight.view(-1, d, s.weight.shape[1]).repeat_interleave(group, 0).flatten(0, 1))
            t.bias.copy_(s.bias.view(-1, d).repeat_interleave(group, 0).flatten())


def build_model(settings: VLSettings, tokenizer: QwenVLTokenizer, base_dir: str | Path | None = None
                ) -> QwenVLForCausalLM:
    """A Qwen-VL whose LLM is the base model (Qwen-1 layout) and whose vision side is freshly initialised."""
    import qwen_edu
    from qwen_edu.training.presets import base_model_path

    base = qwen_edu.load_model(base_dir or base_model_path(), dtype=torch.float32)
    bc = base.config
    visual = QwenVLVisionConfig(**settings.visual, output_dim=bc.hidden_size, image_start_id=tokenizer.img_start_id)
    config = QwenVLConfig(
        vocab_size=bc.vocab_size, hidden_size=bc.hidden_size, intermediate_size=bc.intermediate_size,
        num_hidden_layers=bc.num_hidden_layers, num_attention_heads=bc.num_attention_heads,
        head_dim=bc.head_dim, rms_norm_eps=bc.rms_norm_eps, rope_theta=bc.rope_theta,
        max_position_embeddings=8192, tie_word_embeddings=False, qkv_bias=True,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id, visual=visual,
    )
    torch.manual_seed(settings.seed)
    model = QwenVLForCausalLM(config)
    _init_visual(model.visual)
    qwen1_from_qwen2(base, model)
    return model


@torch.no_grad()
def _init_visual(visual: QwenVLVisionTransformer, std: float = 0.02, local_scale: float = 3.0,
                 local_frequencies: int = 8) -> None:
    """Initialise the vision side for a short run on a CPU (the book's choices).

    N(0, 0.02) weights and zero biases (ViT practice); ``proj`` so small that the visual tokens start at
    the scale of the LLM's token embeddings (std ~0.14 here).

    The adapter starts as a **local pooling**. The sin-cos table alone makes attention only weakly local
    (most of its frequencies hardly change across a 6x6 grid), so the q and k projections start by keeping
    just the ``local_frequencies`` fastest sin/cos pairs of each axis, scaled by ``local_scale``; ``ln_q``
    starts at zero (a query is its position) and ``ln_kv`` at 0.25 (positions dominate the keys). Each
    query then averages the patches around its own grid cell; the v projection is the identity. Without
    this, a short run averages every query over the whole picture and the visual tokens carry little more
    than which colours appear somewhere.
    """
    for module in visual.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
    pool = visual.attn_pool
    d = pool.embed_dim
    keep = torch.zeros(d)
    for block in range(4):  # [sin(col), cos(col), sin(row), cos(row)], fastest frequencies first
        keep[block * d // 4:block * d // 4 + local_frequencies] = 1.0
    pool.attn.in_proj_weight.copy_(torch.cat([local_scale * torch.diag(keep)] * 2 + [torch.eye(d)]))
    pool.attn.in_proj_bias.zero_()
    pool.ln_q.weight.zero_()
    pool.ln_kv.weight.fill_(0.25)
    visual.proj.normal_(0.0, 0.01)


def set_trainable(model: QwenVLForCausalLM, *, llm: bool, vit: bool, adapter: bool = True) -> dict[str, int]:
    """Freeze or unfreeze the three parts; returns how many parameters of each part will learn.

    The adapter is ``attn_pool`` + ``ln_post`` + ``proj``; its sin-cos table never learns.
    """
    counts = {"vit": 0, "adapter": 0, "llm": 0}
    wanted = {"vit": vit, "adapter": adapter, "llm": llm}
    for name, param in model.named_parameters():
        part = _part_of(name)
        param.requires_grad_(wanted[part] and name != "visual.attn_pool.pos_embed")
        counts[part] += param.numel() if param.requires_grad else 0
    return counts


def _part_of(name: str) -> str:
    if not name.startswith("visual."):
        return "llm"
    return "adapter" if name.startswith(("visual.attn_pool", "visual.ln_post", "visual.proj")) else "vit"


# --- data ------------------------------------------------------------------------------------------------
def _image_label(scene: Scene) -> str:
    return f"scene_{scene.seed}.png"


def stage_example(task: str, scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """``(format, prompt, answer)`` for one task on one scene.

    ``text`` (stage 0) is one line of the domain's text with no picture, learnt whole.
    Plain format (stages 1-2, like Qwen-VL's pre-training data): ``Picture 1: <img>..</img>\\n`` then a
    task prompt (none for stage-1 captions, ``Generate the caption in English:``, ``{question} Answer:``,
    or ``<ref>the red circle</ref>``) and the answer, ending with ``<|endoftext|>``. Chat format (stage 3):
    one ChatML user turn with the picture and an instruction, the answer as the assistant turn.
    """
    picture = f"Picture 1: <img>{_image_label(scene)}</img>\n"
    obj = rng.choice(scene.objects)
    box = scene.normalized_box(obj)
    box_text = f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"
    if task == "text":  # stage 0: the words and formats of the domain, without the picture
        qa = rng.choice(scene.questions)
        return "text", "", rng.choice((f"{CAPTION_PROMPT} {scene.caption}", f"{qa.question}{ANSWER_SUFFIX} {qa.answer}",
                                       f"<ref>the {obj.name}</ref>{box_text}"))
    if task == "caption":
        return "plain", picture, scene.caption
    if task == "describe":
        return "plain", picture + CAPTION_PROMPT, " " + scene.caption
    if task == "vqa":
        qa = rng.choice(scene.questions)
        return "plain", picture + qa.question + ANSWER_SUFFIX, " " + qa.answer
    if task == "ground":
        return "plain", f"{picture}<ref>the {obj.name}</ref>", box_text
    if task == "chat":
        kind = rng.choice(("describe", "vqa", "vqa", "ground"))
        if kind == "describe":
            return "chat", picture + "Describe the picture.", scene.caption
        if kind == "vqa":
            qa = rng.choice(scene.questions)
            return "chat", picture + qa.question, qa.answer
        return "chat", picture + f"Where is the {obj.name}?", f"<ref>the {obj.name}</ref>{box_text}"
    raise ValueError(f"unknown task {task!r}")


def encode_example(tokenizer: QwenVLTokenizer, fmt: str, prompt: str, answer: str | None
                   ) -> tuple[list[int], list[int]]:
    """``(ids, labels)``: labels are the ids on the answer (and its closing token), ``-100`` elsewhere.

    ``answer=None`` encodes the prompt only, ready for generation.
    """
    if fmt == "chat":
        messages = [{"role": "user", "content": prompt}]
        if answer is None:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True).ids
            return ids, [IGNORE_INDEX] * len(ids)
        # The reply starts with a space (the book's choice, not Qwen-VL-Chat's format): then its words keep
        # the tokens they have after " Answer:" in stage 2 (" green", not "g|re|en").
        enc = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": " " + answer}])
        return enc.ids, [t if m else IGNORE_INDEX for t, m in zip(enc.ids, enc.loss_mask)]
    prompt_ids = tokenizer.encode(prompt)
    if fmt == "text":
        assert answer is not None
        ids = [*tokenizer.encode(answer), tokenizer.eos_id]
        return ids, list(ids)
    if answer is None:
        return prompt_ids, [IGNORE_INDEX] * len(prompt_ids)
    answer_ids = [*tokenizer.encode(answer), tokenizer.eos_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, left: bool = False
            ) -> dict[str, torch.Tensor]:
    """Pad to one length (right for training, ``left=True`` for generation): ids, labels, attention_mask."""
    width = max(len(ids) for ids, _ in examples)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in examples:
        pad = width - len(ids)
        rows = (ids, [pad_id] * pad), (labels, [IGNORE_INDEX] * pad), ([1] * len(ids), [0] * pad)
        for key, (real, fill) in zip(out, rows):
            out[key].append(fill + real if left else real + fill)
    return {k: torch.tensor(v) for k, v in out.items()}


def _scene(seed: int, size: int = 96) -> Scene:
    """A training or held-out scene: 1 or 2 objects (the book's small model; captions of three objects,
    left to right, were too much for it in a CPU-sized run)."""
    return make_scene(seed, size=size, max_objects=MAX_OBJECTS)


# --- stage 0a: the ViT alone ---------------------------------------------------------------------------------
COLOUR_IDS = {c: i + 1 for i, c in enumerate(COLOURS)}  # 0 = background
KIND_IDS = {k: i + 1 for i, k in enumerate(KINDS)}


def patch_targets(scene: Scene, grid: int, min_share: float = 0.125) -> tuple[torch.Tensor, torch.Tensor]:
    """``(colour, kind)`` class of each patch of a ``grid x grid`` patching, row-major; 0 = background.

    A patch belongs to the object that covers most of it, if that object covers at least ``min_share``.
    """
    assert scene.labels is not None
    size = scene.labels.shape[0]
    if size % grid:
        raise ValueError(f"a {size} px scene does not split into a {grid}x{grid} grid")
    cell = size // grid
    blocks = torch.from_numpy(scene.labels).view(grid, cell, grid, cell).permute(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = torch.stack([(blocks == i).sum(-1) for i in range(1, len(scene.objects) + 1)], dim=-1)
    best = counts.max(-1)
    owner = torch.where(best.values >= min_share * cell * cell, best.indices + 1, 0)
    colour = torch.tensor([0] + [COLOUR_IDS[o.colour] for o in scene.objects])[owner]
    kind = torch.tensor([0] + [KIND_IDS[o.kind] for o in scene.objects])[owner]
    return colour, kind


def _train_patches(model: QwenVLForCausalLM, stage: StageSettings, seed: int, scene_size: int, progress: bool,
                   on_step: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """Stage 0a: the ViT alone learns to name the colour and the kind under every patch (two linear probes).

    A stand-in for the OpenCLIP pre-training Qwen-VL's ViT comes with: dense labels teach a ViT from
    scratch in minutes what the frozen-LLM captioning of stage 1 alone teaches it only slowly. The probes
    are thrown away afterwards. Resolutions alternate between the stage-1 and stage-2 sizes.
    """
    from tqdm.auto import tqdm

    visual = model.visual
    counts = set_trainable(model, llm=False, vit=True, adapter=False)
    generator = torch.Generator().manual_seed(seed)
    heads = nn.ModuleDict({"colour": nn.Linear(visual.config.width, len(COLOUR_IDS) + 1),
                           "kind": nn.Linear(visual.config.width, len(KIND_IDS) + 1)})
    for head in heads.values():
        nn.init.normal_(head.weight, std=0.02, generator=generator)
        nn.init.zeros_(head.bias)
    params = [p for p in visual.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sizes = (stage.image_size // 2, stage.image_size)
    visual.train()
    log: list[dict[str, Any]] = []
    start = time.perf_counter()
    for step in (bar := tqdm(range(stage.steps), desc=f"stage {stage.name}", disable=not progress)):
        scale = lr_at_step(step, max_lr=1.0, warmup_steps=stage.warmup, total_steps=stage.steps, min_lr=0.1)
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * scale
        size = sizes[step % 2]
        scenes = [_scene(seed * 1_000_000 + step * stage.batch_size + i, scene_size) for i in range(stage.batch_size)]
        pixels = torch.stack([image_transform(sc.image, size) for sc in scenes])
        grid = size // visual.config.patch_size
        targets = [patch_targets(sc, grid) for sc in scenes]
        colour, kind = (torch.cat([t[j] for t in targets]) for j in (0, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = visual.patch_features(pixels)[0].flatten(0, 1)
        features = features.float()
        on_object = kind > 0  # the kind is learnt where there is an object (most patches are background)
        loss = (F.cross_entropy(heads["colour"](features), colour)
                + F.cross_entropy(heads["kind"](features[on_object]), kind[on_object]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            right = (heads["kind"](features).argmax(-1) == kind) & (heads["colour"](features).argmax(-1) == colour)
        entry = {"step": step, "loss": loss.item(), "lr_scale": scale, "image_size": size,
                 "object_patch_accuracy": right[on_object].float().mean().item(),
                 "seconds": time.perf_counter() - start}
        log.append(entry)
        if on_step is not None:
            on_step(entry)
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{entry['object_patch_accuracy']:.2f}")
    visual.eval()
    log[-1]["trainable"] = counts
    return log


# --- training ----------------------------------------------------------------------------------------------
def _optimizer(model: nn.Module, stage: StageSettings, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the stage's learning rates: the vision side at ``lr``, the LLM at ``llm_lr``.

    Weight decay on matrices only (chapter 3's rule); frozen parameters are left out.
    """
    groups = []
    for part_lr, visual in ((stage.lr, True), (stage.llm_lr, False)):
        chosen = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual.") == visual]
        for decay in (True, False):
            params = [p for p in chosen if (p.dim() >= 2) == decay]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": part_lr,
                               "base_lr": part_lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)


def train_stage(model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, stage: StageSettings, *, seed: int,
                weight_decay: float = 0.05, scene_size: int = 96, progress: bool = True,
                on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train one stage on freshly drawn scenes (seeds ``seed * 1_000_000 + i``); returns the per-step log."""
    from tqdm.auto import tqdm

    if stage.tasks == ("patches",):
        return _train_patches(model, stage, seed, scene_size, progress, on_step)
    counts = set_trainable(model, llm=stage.llm_lr > 0, vit=stage.lr > 0 and stage.train_vit, adapter=stage.lr > 0)
    model.train()
    optimizer = _optimizer(model, stage, weight_decay)
    rng = random.Random(seed)
    log = []
    start = time.perf_counter()
    steps = tqdm(range(stage.steps), desc=f"stage {stage.name}", disable=not progress)
    for step in steps:
        scale = lr_at_step(step, max_lr=1.0, warmup_steps=stage.warmup, total_steps=stage.steps, min_lr=0.1)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        examples, pixels = [], []
        for i in range(stage.batch_size):
            scene = _scene(seed * 1_000_000 + step * stage.batch_size + i, scene_size)
            fmt, prompt, answer = stage_example(rng.choice(stage.tasks), scene, rng)
            examples.append(encode_example(tokenizer, fmt, prompt, answer))
            if fmt != "text":
                pixels.append(image_transform(scene.image, stage.image_size))
        batch = collate(examples, tokenizer.eos_id)
        images = torch.stack(pixels) if stage.tasks != ("text",) else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=images).logits
        loss = causal_lm_loss(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        entry = {"step": step, "loss": loss.item(), "lr_scale": scale, "seconds": time.perf_counter() - start}
        log.append(entry)
        if on_step is not None:
            on_step(entry)
        if progress and step % 10 == 0:
            steps.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    log[-1]["trainable"] = counts  # type: ignore[assignment]
    return log


# --- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, prompts: Sequence[tuple[str, str]],
                     images: Sequence[Any], image_size: int, max_new_tokens: int = 40, batch_size: int = 25
                     ) -> list[str]:
    """Greedy answers to ``(format, prompt)`` pairs about ``images`` (one picture per prompt), in batches."""
    import qwen_edu

    stops = [tokenizer.eos_id, tokenizer.im_end_id]
    out = []
    for at in range(0, len(prompts), batch_size):
        chunk = prompts[at:at + batch_size]
        batch = collate([encode_example(tokenizer, fmt, prompt, None) for fmt, prompt in chunk],
                        tokenizer.eos_id, left=True)
        pixels = torch.stack([image_transform(image, image_size) for image in images[at:at + batch_size]])
        ids = qwen_edu.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                eos_token_id=stops, pad_token_id=tokenizer.eos_id, pixel_values=pixels)
        for row in ids[:, batch["input_ids"].shape[1]:].tolist():
            row = row[:next((i for i, t in enumerate(row) if t in stops), len(row))]
            out.append(tokenizer.decode(row))
    return out


def held_out_scenes(count: int, size: int = 96) -> list[Scene]:
    """Evaluation scenes: seeds from :data:`HELD_OUT_SEED` on, never drawn in training."""
    return [_scene(HELD_OUT_SEED + i, size) for i in range(count)]


def evaluation_requests(scenes: Sequence[Scene], fmt: str = "plain"
                        ) -> tuple[dict[str, list[str]], list[QA], list[SceneObject]]:
    """What :func:`evaluate` asks about each scene: ``(requests, questions, target objects)``.

    ``requests`` maps "caption", "vqa" and "ground" to one prompt per scene, in the format of ``fmt`` (see
    :func:`evaluate`). The question and the object to ground are drawn from the scene's own seed, so any
    subset of scenes gets the same requests.
    """
    picked = [(rng.choice(s.questions), rng.choice(s.objects)) for s in scenes for rng in [random.Random(s.seed)]]
    qas, targets = [qa for qa, _ in picked], [obj for _, obj in picked]
    picture = [f"Picture 1: <img>{_image_label(s)}</img>\n" for s in scenes]
    if fmt == "chat":
        requests = {"caption": [p + "Describe the picture." for p in picture],
                    "vqa": [p + qa.question for p, qa in zip(picture, qas)],
                    "ground": [p + f"Where is the {o.name}?" for p, o in zip(picture, targets)]}
    else:
        prompt = "" if fmt == "pretrain" else CAPTION_PROMPT
        requests = {"caption": [p + prompt for p in picture],
                    "vqa": [p + qa.question + ANSWER_SUFFIX for p, qa in zip(picture, qas)],
                    "ground": [f"{p}<ref>the {o.name}</ref>" for p, o in zip(picture, targets)]}
    return requests, qas, targets


def evaluate(model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, scenes: Sequence[Scene], image_size: int,
             fmt: str = "plain") -> dict[str, Any]:
    """Caption accuracy, VQA accuracy (per question type too) and grounding IoU on ``scenes``.

    ``fmt="plain"`` asks with the stage-2 prompts, ``"chat"`` with stage-3 ChatML instructions, and
    ``"pretrain"`` like ``"plain"`` but captions with the bare stage-1 prompt (the picture alone). Each scene
    gets one caption request, one question and one grounding request (:func:`evaluation_requests`).
    """
    requests, qas, targets = evaluation_requests(scenes, fmt)
    images = [s.image for s in scenes]
    kind = "chat" if fmt == "chat" else "plain"
    answers = {task: generate_answers(model, tokenizer, [(kind, r) for r in reqs], images, image_size)
               for task, reqs in requests.items()}
    caption_ok = [a.strip() == s.caption for a, s in zip(answers["caption"], scenes)]
    named = [sum(f" {o.name}" in f" {a.strip().rstrip('.')} ".replace(",", " ") for o in s.objects) / len(s.objects)
             for a, s in zip(answers["caption"], scenes)]
    vqa_ok = [a.strip() == qa.answer for a, qa in zip(answers["vqa"], qas)]
    ious, malformed = [], 0
    for answer, scene, obj in zip(answers["ground"], scenes, targets):
        try:
            boxes = parse_boxes(answer if answer.lstrip().startswith("<") else "")
        except ValueError:  # a malformed box, or an unclosed <ref> / <box>: no box
            boxes, malformed = [], malformed + 1
        ious.append(box_iou(boxes[0].box, scene.normalized_box(obj)) if boxes else 0.0)
    by_type: dict[str, list[bool]] = {}
    for qa, ok in zip(qas, vqa_ok):
        by_type.setdefault(qa.type, []).append(ok)
    return {
        "caption_accuracy": sum(caption_ok) / len(scenes),
        "caption_object_recall": sum(named) / len(scenes),
        "vqa_accuracy": sum(vqa_ok) / len(scenes),
        "vqa_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "grounding_iou": sum(ious) / len(scenes),
        "grounding_acc50": sum(i >= 0.5 for i in ious) / len(scenes),
        "grounding_malformed": malformed,
        "samples": [{"seed": s.seed, "caption": answers["caption"][i], "question": qas[i].question,
                     "answer": answers["vqa"][i], "expected": qas[i].answer, "ground": answers["ground"][i],
                     "target": targets[i].name, "iou": ious[i]} for i, s in enumerate(scenes[:12])],
    }


def _headline(metrics: dict[str, Any]) -> str:
    return (f"caption {metrics['caption_accuracy']:.0%} (objects named {metrics['caption_object_recall']:.0%}), "
            f"VQA {metrics['vqa_accuracy']:.0%}, grounding IoU {metrics['grounding_iou']:.2f} "
            f"(>=0.5: {metrics['grounding_acc50']:.0%})")


# --- the whole run -------------------------------------------------------------------------------------------
def run_pipeline(settings: VLSettings | None = None, *, progress: bool = True, base_dir: str | Path | None = None
                 ) -> tuple[QwenVLForCausalLM, QwenVLTokenizer, dict[str, Any]]:
    """Build the model, train the stages, measure after each; returns ``(model, tokenizer, report)``.

    The last stage's metrics are measured on the weights rounded to bfloat16, as they are shipped.
    """
    settings = settings or VLSettings()
    tokenizer = build_tokenizer(base_dir, image_span=int(settings.visual.get("n_queries", 256)))
    model = build_model(settings, tokenizer, base_dir)
    scenes = held_out_scenes(settings.eval_scenes, settings.scene_size)
    report: dict[str, Any] = {"settings": settings.to_dict(), "stages": []}

    def run(stage: StageSettings, index: int, name: str) -> None:
        log = train_stage(model, tokenizer, stage, seed=settings.seed * 10 + index + 1,
                          weight_decay=settings.weight_decay, scene_size=settings.scene_size, progress=progress)
        if stage is settings.stages[-1]:  # round the weights as they are shipped (buffers stay exact)
            with torch.no_grad():
                for param in model.parameters():
                    param.copy_(param.to(torch.bfloat16))
        fmt = "chat" if "chat" in stage.tasks else "pretrain" if stage.tasks == ("caption",) else "plain"
        metrics = None
        if stage.tasks != ("patches",):  # the ViT alone is not connected to the LLM yet
            image_size = stage.image_size if stage.lr > 0 else settings.visual["image_size"]
            metrics = evaluate(model, tokenizer, scenes, image_size, fmt)
            if progress:
                print(f"after {name}: {_headline(metrics)}")
        report["stages"].append({"name": name, "format": fmt, "settings": dataclasses.asdict(stage), "log": log,
                                 "metrics": metrics, "trainable": log[-1]["trainable"],
                                 "seconds": log[-1]["seconds"]})

    for index, stage in enumerate(settings.stages):
        if stage.name == "pretrain" and settings.ablate_frozen_llm:
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            later = next(s for s in settings.stages if s.name == "multitask")
            run(dataclasses.replace(stage, llm_lr=later.llm_lr), index, "pretrain_llm_unfrozen")
            model.load_state_dict(saved)
        run(stage, index, stage.name)
    return model, tokenizer, report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m qwen_edu.training.qwen_vl --out DIR``: train and write the model folder with its card."""
    from qwen_edu.checkpoint import save_model
    from qwen_edu.tokenizer import save_pretrained

    parser = argparse.ArgumentParser(description="Train the book's small Qwen-VL (chapter 7) on a CPU.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke test, not the asset)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = VLSettings()
    if args.quick:
        settings.stages = tuple(dataclasses.replace(s, steps=2, warmup=1, batch_size=2) for s in settings.stages)
        settings.eval_scenes = 3
    start = time.perf_counter()
    model, tokenizer, report = run_pipeline(settings)
    report["total_seconds"] = time.perf_counter() - start
    report["machine"] = f"{platform.machine()} torch {torch.__version__}, {args.threads} thread(s)"
    out = Path(args.out)
    save_model(model.to(torch.bfloat16), out)
    save_pretrained(tokenizer.tokenizer, out)
    (out / "training_log.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "README.md").write_text(model_card(report))
    print(f"wrote {out} in {report['total_seconds'] / 60:.1f} min")
    return report


def model_card(report: dict[str, Any]) -> str:
    """The README of the shipped model: what it is, how it was trained, what it scores, where it fails."""
    s = report["settings"]
    v = s["visual"]
    side = int(math.isqrt(v["n_queries"]))
    rows = []
    for stage in report["stages"]:
        st, m = stage["settings"], stage["metrics"]
        trainable = ", ".join(f"{k} {n:,}" for k, n in stage["trainable"].items() if n) or "-"
        scores = ("(not connected to the LLM yet) | | |" if m is None else
                  f"{m['caption_accuracy']:.0%} ({m['caption_object_recall']:.0%}) | {m['vqa_accuracy']:.0%} | "
                  f"{m['grounding_iou']:.2f} / {m['grounding_acc50']:.0%} |")
        rows.append(f"| {stage['name']} | {st['steps']} x {st['batch_size']} | {st['image_size']} px | "
                    f"{', '.join(st['tasks'])} | {trainable} | {scores} {stage['seconds'] / 60:.1f} min |")
    final = report["stages"][-1]["metrics"]
    by_type = ", ".join(f"{k} {a:.0%}" for k, a in final["vqa_by_type"].items())
    return f"""# qwen-edu small Qwen-VL

The vision-language model of chapter 7: a **Qwen-VL** in the original checkpoint layout
(`config.json` with `model_type: "qwen"` and a `visual` dict; `transformer.visual.*` and `transformer.h.*`
keys), at toy scale. Load it with `qwen_edu.load_model`; tokenize with
`qwen_edu.tokenizer.qwen_vl.load_qwen_vl_tokenizer(folder)` (image spans of {v['n_queries']} slots).

| | |
|---|---|
| language model | the book's base model (chapter 3) in the Qwen-1 layout: 4 layers, hidden 192, 6 heads (its 2 KV heads repeated), untied head |
| vision tower | ViT: {v['patch_size']} px patches, width {v['width']}, {v['layers']} blocks, {v['heads']} heads, learned {v['positional_grid']}x{v['positional_grid']} position table; adapter: {v['n_queries']} queries ({side}x{side}), 1 head of width 192 |
| vocabulary | the base model's 1,477 tokens + `<ref>` ... `<imgpad>` at ids 1477-1485 |
| weights | `model.safetensors`, bfloat16 |
| data | `qwen_edu.corpus.scenes`: {s['scene_size']}x{s['scene_size']} pictures of 1-{MAX_OBJECTS} coloured shapes and digits, drawn from seeds |
| training | {report['total_seconds'] / 60:.1f} min on {report['machine']}, a 2-core CPU shared with other jobs |

## Training

| stage | steps x batch | resolution | tasks | trainable parameters | caption exact (objects named) | VQA | grounding IoU / >=0.5 | time |
|---|---|---|---|---|---:|---:|---:|---:|
{chr(10).join(rows)}

`vision` and `language` prepare the parts (the book's stand-ins for OpenCLIP's pre-trained ViT and for
Qwen-7B's knowledge of the words); `pretrain`, `multitask` and `sft` are Qwen-VL's three stages with its
freezing schedule. `pretrain_llm_unfrozen` is an ablation (discarded): stage 1 from the same start with
the LLM trained too. Metrics are measured after each stage on {s['eval_scenes']} held-out scenes (seeds from
{HELD_OUT_SEED:,}): caption exact match (and the share of objects the caption names), VQA exact match,
and the IoU of the first box generated for `<ref>the <object></ref>`. Stage 1 is asked with its bare
prompt, stages 0b and 2 with the multi-task prompts, stage 3 in ChatML. The last row is measured on the
shipped bfloat16 weights. VQA by question type after stage 3: {by_type}.

## Reproduce

```bash
python -m qwen_edu.training.qwen_vl --out qwen_edu/assets/qwen_vl_model
```

Seed {s['seed']} fixes the initial weights, every training scene and the held-out scenes; the same machine
and thread count repeat the run bit for bit. `training_log.json` holds the settings, the per-step losses
and the metrics of every stage.

## Book choices (not Qwen-VL's)

A tiny ViT trained from scratch (first on per-patch colour and shape labels) instead of OpenCLIP's
ViT-bigG; {v['n_queries']} queries and a learned {v['positional_grid']}x{v['positional_grid']} ViT position table instead of 256
and 16x16 (written to `config.json` as `n_queries` and `positional_grid`); 48/96 px instead of 224/448 px;
generated scenes instead of web data; the adapter initialised as a local pooling (each query
averaging the patches around its own grid cell, see `_init_visual`); chat replies that start with a
space (Qwen-VL-Chat's do not), so that their words keep the tokens they have in stage 2 (` green`, not
`g|re|en`).

## Limitations

It has only ever seen flat shapes and digits on light backgrounds: on a photograph it still answers
with shapes and colours. A frozen 2M-parameter LLM is hard to steer, so stage 1 teaches it little;
most of the skill comes from stage 2. It tells colours, counts and sides apart but seldom the kind of
an object (see the VQA by type), and most of its boxes miss (see the IoU).
"""


if __name__ == "__main__":
    main()
