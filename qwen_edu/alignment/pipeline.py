"""The whole post-training recipe on the book's base model: SFT -> reward model -> PPO, and DPO.

:func:`run_alignment_pipeline` takes a base model and its tokenizer and returns the trained models,
the training histories, held-out metrics and the time each stage took. The presets size the run:
``"smoke"`` (seconds, for tests) and ``"quick"`` (the notebooks' budget on a laptop CPU).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import frozen_copy
from qwen_edu.alignment.data import make_comparisons, make_conversations, make_prompts
from qwen_edu.alignment.dpo import DPOConfig, evaluate_dpo, train_dpo
from qwen_edu.alignment.ppo import PPOConfig, PPOTrainer, evaluate_policy
from qwen_edu.alignment.reward import RewardConfig, RewardModel, evaluate_reward_model, train_reward_model
from qwen_edu.alignment.sft import SFTConfig, evaluate_chat, train_sft

__all__ = ["PipelineConfig", "PIPELINE_PRESETS", "pipeline_config", "run_alignment_pipeline"]


@dataclass
class PipelineConfig:
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ppo_iterations: int = 20
    dpo: DPOConfig = field(default_factory=DPOConfig)
    num_conversations: int = 2000
    num_pairs: int = 2000
    num_rl_prompts: int = 1024
    num_eval: int = 128
    seed: int = 0


PIPELINE_PRESETS: dict[str, PipelineConfig] = {
    "smoke": PipelineConfig(SFTConfig(steps=20, batch_size=8), RewardConfig(steps=10, batch_size=8),
                            PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8),
                            2, DPOConfig(steps=5, batch_size=8), 64, 64, 32, 16),
    "quick": PipelineConfig(SFTConfig(steps=300, batch_size=16, lr=1e-3),
                            RewardConfig(steps=150, batch_size=16, lr=3e-4),
                            PPOConfig(batch_size=32, mini_batch_size=16, ppo_epochs=2, lr=3e-5, kl_coef=0.05,
                                      max_new_tokens=24),
                            25, DPOConfig(steps=100, batch_size=16, lr=3e-5, beta=0.2)),
}


def pipeline_config(preset: str = "quick", **overrides: Any) -> PipelineConfig:
    """A copy of a preset with top-level fields replaced (``ppo_iterations=10``, ``sft=SFTConfig(...)``)."""
    if preset not in PIPELINE_PRESETS:
        raise KeyError(f"unknown pipeline preset {preset!r}; known: {', '.join(PIPELINE_PRESETS)}")
    return replace(copy.deepcopy(PIPELINE_PRESETS[preset]), **overrides)


def _trainable_copy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def run_alignment_pipeline(base: nn.Module, tokenizer: Any, config: PipelineConfig | str = "quick", *,
                           progress: bool = True, run_dpo: bool = True, run_ppo: bool = True,
                           on_stage: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """SFT the base model, train a reward model from the SFT model, then PPO and DPO from the SFT model.

    The base model is not modified. Returns ``{"metrics", "models", "histories", "timings"}``;
    ``on_stage(name, metrics)`` is called after each stage.
    """
    if isinstance(config, str):
        config = pipeline_config(config)
    seed = config.seed
    conversations = make_conversations(config.num_conversations, seed=seed)
    pairs = make_comparisons(config.num_pairs, seed=seed + 1)
    held_pairs = make_comparisons(config.num_eval, seed=seed + 2)
    rl_prompts = make_prompts(config.num_rl_prompts, seed=seed + 3)
    eval_prompts = make_prompts(config.num_eval, seed=seed + 4)
    metrics: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    timings: dict[str, float] = {}
    models: dict[str, nn.Module] = {}

    def stage(name: str, values: dict[str, Any], started: float) -> None:
        timings[name] = time.perf_counter() - started
        metrics[name] = _scalars(values)
        if on_stage is not None:
            on_stage(name, metrics[name])

    t = time.perf_counter()
    base_eval = evaluate_chat(base, tokenizer, eval_prompts)
    stage("base", base_eval, t)

    torch.manual_seed(seed)
    t = time.perf_counter()
    sft_model = _trainable_copy(base)
    histories["sft"] = train_sft(sft_model, tokenizer, conversations, config.sft, progress=progress)
    sft_eval = evaluate_chat(sft_model, tokenizer, eval_prompts)
    models["sft"] = sft_model
    stage("sft", {**sft_eval, "final_loss": histories["sft"][-1]["loss"]}, t)

    t = time.perf_counter()
    reward_model = RewardModel.from_causal_lm(sft_model)
    histories["reward"] = train_reward_model(reward_model, tokenizer, pairs, config.reward, progress=progress)
    reward_model.eval()
    for p in reward_model.parameters():
        p.requires_grad_(False)
    models["reward"] = reward_model
    stage("reward", evaluate_reward_model(reward_model, tokenizer, held_pairs), t)

    reference = frozen_copy(sft_model)
    models["reference"] = reference
    sft_score = evaluate_policy(sft_model, reward_model, tokenizer, eval_prompts, ref_model=reference)

    if run_ppo:
        t = time.perf_counter()
        policy = _trainable_copy(sft_model)
        trainer = PPOTrainer(policy, reward_model, tokenizer, config.ppo, ref_model=reference)
        histories["ppo"] = trainer.train(rl_prompts, config.ppo_iterations, progress=progress)
        after = evaluate_policy(policy, reward_model, tokenizer, eval_prompts, ref_model=reference)
        chat = evaluate_chat(policy, tokenizer, eval_prompts)
        models["ppo"] = policy
        stage("ppo", {"reward_before": sft_score["reward"], "reward_after": after["reward"], "kl": after["kl"],
                      "train_reward_first": histories["ppo"][0]["reward"],
                      "train_reward_last": histories["ppo"][-1]["reward"],
                      "format_rate": chat["format_rate"], "answer_accuracy": chat["accuracy"],
                      **{k: v for k, v in chat.items() if k.startswith("accuracy_")}}, t)

    if run_dpo:
        t = time.perf_counter()
        dpo_policy = _trainable_copy(sft_model)
        before = evaluate_dpo(dpo_policy, reference, tokenizer, held_pairs, beta=config.dpo.beta)
        histories["dpo"] = train_dpo(dpo_policy, tokenizer, pairs, config.dpo, ref_model=reference,
                                     progress=progress)
        after = evaluate_dpo(dpo_policy, reference, tokenizer, held_pairs, beta=config.dpo.beta)
        scored = evaluate_policy(dpo_policy, reward_model, tokenizer, eval_prompts, ref_model=reference)
        chat = evaluate_chat(dpo_policy, tokenizer, eval_prompts)
        models["dpo"] = dpo_policy
        stage("dpo", {**after, "logprob_accuracy_before": before["logprob_accuracy"],
                      "rm_reward_before": sft_score["reward"], "rm_reward_after": scored["reward"],
                      "kl": scored["kl"], "format_rate": chat["format_rate"], "answer_accuracy": chat["accuracy"]},
              t)
    return {"metrics": metrics, "models": models, "histories": histories, "timings": timings}
