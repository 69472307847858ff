"""The aligned checkpoints the book ships: the SFT chat model and its reward model.

Chapter 5 trains both live; chapter 6 (PPO, DPO) starts from these shipped copies so that each notebook
stays inside the book's time budget. They are reproduced, bit for bit on the same machine, by::

    python -m qwen_edu.alignment.assets --out qwen_edu/assets

which runs the ``"quick"`` pipeline's SFT and reward-model stages (seed 0) on the shipped base model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib.resources import files
from pathlib import Path

import torch

__all__ = ["sft_model_path", "reward_model_path", "build_assets"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def _asset(name: str) -> Path:
    path = Path(str(files("qwen_edu") / "assets" / name))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model; build it with `python -m qwen_edu.alignment.assets`")
    return path


def sft_model_path() -> Path:
    """The shipped SFT chat model (a causal LM folder with the base model's tokenizer)."""
    return _asset("sft_model")


def reward_model_path() -> Path:
    """The shipped reward model (load with ``RewardModel.from_pretrained``)."""
    return _asset("reward_model")


def build_assets(out: str | Path, preset: str = "quick") -> dict:
    """Train SFT and the reward model from the base model and write both folders under ``out``."""
    import qwen_edu
    from qwen_edu.alignment.data import make_comparisons, make_conversations, make_prompts
    from qwen_edu.alignment.pipeline import pipeline_config
    from qwen_edu.alignment.reward import RewardModel, evaluate_reward_model, train_reward_model
    from qwen_edu.alignment.sft import evaluate_chat, train_sft
    from qwen_edu.checkpoint import save_model
    from qwen_edu.training import base_model_path

    out = Path(out)
    config = pipeline_config(preset)
    base_dir = base_model_path()
    model = qwen_edu.load_model(base_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    tokenizer = qwen_edu.load_tokenizer(base_dir)
    seed = config.seed
    conversations = make_conversations(config.num_conversations, seed=seed)
    pairs = make_comparisons(config.num_pairs, seed=seed + 1)
    held_pairs = make_comparisons(config.num_eval, seed=seed + 2)
    eval_prompts = make_prompts(config.num_eval, seed=seed + 4)

    start = time.perf_counter()
    torch.manual_seed(seed)
    train_sft(model, tokenizer, conversations, config.sft, progress=True)
    sft_seconds = time.perf_counter() - start
    chat = evaluate_chat(model, tokenizer, eval_prompts)
    start = time.perf_counter()
    reward = RewardModel.from_causal_lm(model)
    train_reward_model(reward, tokenizer, pairs, config.reward, progress=True)
    reward_seconds = time.perf_counter() - start
    reward.eval()
    rm_eval = evaluate_reward_model(reward, tokenizer, held_pairs)

    sft_dir, rm_dir = out / "sft_model", out / "reward_model"
    save_model(model.to(torch.bfloat16), sft_dir)
    for name in _TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, sft_dir / name)
    reward.to(torch.bfloat16).save_pretrained(rm_dir)
    facts = {
        "command": f"python -m qwen_edu.alignment.assets --out {out} --preset {preset}",
        "seed": seed,
        "sft_seconds": round(sft_seconds, 1),
        "reward_seconds": round(reward_seconds, 1),
        "sft_format_rate": chat["format_rate"],
        "sft_answer_accuracy": chat["accuracy"],
        "reward_heldout_accuracy": rm_eval["accuracy"],
    }
    for folder in (sft_dir, rm_dir):
        (folder / "alignment_log.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="qwen_edu/assets")
    parser.add_argument("--preset", default="quick")
    args = parser.parse_args(argv)
    print(json.dumps(build_assets(args.out, args.preset), indent=2))


if __name__ == "__main__":
    main()
