"""The aligned checkpoints the book ships: the SFT chat model and its reward model.

Chapter 5 trains both live; chapter 6 (PPO, DPO) starts from these shipped copies so that each notebook
stays inside the book's time budget. They are reproduced, bit for bit on the same machine, by::

    python -m qwen_edu.alignment.assets --out qwen_edu/assets

which runs the ``"quick"`` pipeline's SFT and reward-model stages (seed 0) on the shipped base model.

``python -m qwen_edu.alignment.assets --pmp-study`` writes ``reward_model/pmp_study.json``: held-out
reward-model accuracy along fine-tuning for three starting points (the base model, the base model
after preference-model pre-training, the SFT model), over several seeds -- the comparison chapter 5
shows without spending its time budget on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib.resources import files
from pathlib import Path

import torch

__all__ = ["sft_model_path", "reward_model_path", "build_assets", "pmp_study", "PMP_STUDY_FILE"]

PMP_STUDY_FILE = "pmp_study.json"

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


def pmp_study(out: str | Path, *, seeds: tuple[int, ...] = (0, 1, 2), pmp_steps: int = 100, steps: int = 150,
              eval_every: int = 25, num_eval: int = 256) -> dict:
    """Reward-model accuracy on ``num_eval`` held-out chat pairs every ``eval_every`` fine-tuning steps.

    Starts: ``"base"`` (the pretrained model, no PMP), ``"base+pmp"`` (the pretrained model after
    ``pmp_steps`` of preference-model pre-training: Qwen's recipe) and ``"sft"`` (the shipped SFT
    model, no PMP: the book's default). Fine-tuning uses the ``"quick"`` preset's reward settings.
    Writes ``out/reward_model/pmp_study.json`` after every run and returns its content; runs already
    in that file with the same settings are kept, not repeated (an interrupted study resumes).
    """
    from dataclasses import asdict, replace

    import qwen_edu
    from qwen_edu.alignment.data import make_comparisons, make_pmp_pairs
    from qwen_edu.alignment.pipeline import pipeline_config
    from qwen_edu.alignment.reward import (
        RewardModel,
        evaluate_reward_model,
        evaluate_text_pairs,
        train_reward_model,
    )
    from qwen_edu.training import base_model_path

    base_config = pipeline_config("quick")
    tokenizer = qwen_edu.load_tokenizer(base_model_path())
    pairs = make_comparisons(base_config.num_pairs, seed=1)
    held = make_comparisons(num_eval, seed=2)
    pmp_held = make_pmp_pairs(num_eval, seed=10_001)
    starts = {"base": (base_model_path(), 0), "base+pmp": (base_model_path(), pmp_steps),
              "sft": (sft_model_path(), 0)}
    path = Path(out) / "reward_model" / PMP_STUDY_FILE
    settings = {"command": "python -m qwen_edu.alignment.assets --pmp-study --seeds "
                           + " ".join(str(s) for s in seeds),
                "seeds": list(seeds), "pmp_steps": pmp_steps, "steps": steps, "eval_every": eval_every,
                "num_eval": num_eval, "reward_config": asdict(base_config.reward)}
    runs: list[dict] = []
    if path.is_file():
        old = json.loads(path.read_text())
        if all(old.get(k) == v for k, v in settings.items() if k not in ("command", "seeds")):
            runs = [r for r in old["runs"] if r["seed"] in seeds]
    for seed in seeds:
        for name, (folder, n_pmp) in starts.items():
            if any(r["start"] == name and r["seed"] == seed for r in runs):
                continue
            config = replace(base_config.reward, steps=steps, pmp_steps=n_pmp, seed=seed)
            torch.manual_seed(seed)
            model = RewardModel.from_causal_lm(qwen_edu.load_model(folder, dtype=torch.float32))
            curve: list[tuple[int, float]] = []

            def checkpoint(record: dict, model: RewardModel = model, curve: list = curve) -> None:
                done = record["step"] + 1
                if record["stage"] == "finetune" and (done % eval_every == 0 or done == 1):
                    curve.append((done, evaluate_reward_model(model, tokenizer, held)["accuracy"]))
                    model.train()

            start = time.perf_counter()
            train_reward_model(model, tokenizer, pairs, config, on_step=checkpoint, progress=False)
            final = evaluate_reward_model(model, tokenizer, held)
            runs.append({"start": name, "seed": seed, "curve": curve, "final": final,
                         "pmp_heldout_accuracy": evaluate_text_pairs(model, tokenizer, pmp_held)["accuracy"],
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name:>8} seed {seed}: held-out accuracy {final['accuracy']:.3f}", flush=True)
            path.write_text(json.dumps({**settings, "runs": runs}, indent=1) + "\n")
    study = {**settings, "runs": runs}
    path.write_text(json.dumps(study, indent=1) + "\n")
    return study


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="qwen_edu/assets")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--pmp-study", action="store_true", help="only (re)write reward_model/pmp_study.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the PMP study")
    args = parser.parse_args(argv)
    if args.pmp_study:
        pmp_study(args.out, seeds=tuple(args.seeds))
        return
    print(json.dumps(build_assets(args.out, args.preset), indent=2))


if __name__ == "__main__":
    main()
