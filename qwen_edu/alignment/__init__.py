"""Post-training: supervised fine-tuning, reward models, PPO, DPO, and domain specialists.

The pieces, in the order the book builds them:

- ``data``: seeded chat conversations and preference pairs; ``sft_labels``, ``pad_batch``, ``encode_pair``.
- ``core``: ``sequence_logprobs``, masked statistics, ``generate_responses``, the reference-model check,
  the exact per-token KL (``kl_from_logits``, ``reply_kl``).
- ``sft``: ``train_sft`` (assistant-only next-token loss), ``evaluate_chat`` (format-following rate).
- ``reward``: ``RewardModel`` (backbone + scalar head at the last token), ``bradley_terry_loss``.
- ``ppo``: ``kl_penalty``, ``gae``, ``ppo_policy_loss``, ``ppo_value_loss``, ``ppo_step``, ``PPOTrainer``.
- ``dpo``: ``dpo_loss``, cached reference log-probs, ``train_dpo``.
- ``specialists``: the report's recipes: Code-Qwen (continued pre-training) then Code-Qwen-Chat (SFT),
  and Math-Qwen-Chat (math SFT on the base model), with before/after measures.
- ``pipeline``: ``run_alignment_pipeline`` -- all of it on the base model, with timings.
"""

from qwen_edu.alignment.core import (
    Responses,
    check_same_architecture,
    entropy_from_logits,
    frozen_copy,
    generate_responses,
    kl_from_logits,
    masked_mean,
    masked_whiten,
    pad_id_of,
    reply_kl,
    sequence_logprobs,
    token_logprobs,
)
from qwen_edu.alignment.data import (
    IGNORE_INDEX,
    check_answer,
    collate_pairs,
    encode_pair,
    encode_prompt,
    encode_sft,
    make_comparisons,
    make_conversations,
    make_prompts,
    pad_batch,
    sft_labels,
    validate_conversation,
    validate_pair,
)
from qwen_edu.alignment.dpo import DPOConfig, dpo_loss, evaluate_dpo, reference_logprobs, train_dpo
from qwen_edu.alignment.pipeline import (
    PIPELINE_PRESETS,
    PipelineConfig,
    pipeline_config,
    run_alignment_pipeline,
)
from qwen_edu.alignment.ppo import (
    PPOConfig,
    PPOTrainer,
    Rollout,
    collect_rollout,
    evaluate_policy,
    gae,
    kl_penalty,
    ppo_policy_loss,
    ppo_step,
    ppo_value_loss,
    shaped_rewards,
)
from qwen_edu.alignment.reward import (
    RewardConfig,
    RewardModel,
    ValueModel,
    bradley_terry_loss,
    evaluate_reward_model,
    last_token_index,
    train_reward_model,
)
from qwen_edu.alignment.sft import SFTConfig, evaluate_chat, train_sft
from qwen_edu.alignment.specialists import (
    SPECIALIST_NAMES,
    SPECIALIST_RECIPES,
    SpecialistConfig,
    arithmetic_accuracy,
    arithmetic_problems,
    code_conversations,
    code_reply_ok,
    continue_pretraining,
    math_conversations,
    specialist_measures,
    text_loss,
    train_specialist,
)

__all__ = [
    "IGNORE_INDEX",
    "Responses",
    "check_same_architecture",
    "entropy_from_logits",
    "frozen_copy",
    "generate_responses",
    "kl_from_logits",
    "masked_mean",
    "masked_whiten",
    "pad_id_of",
    "reply_kl",
    "sequence_logprobs",
    "token_logprobs",
    "check_answer",
    "collate_pairs",
    "encode_pair",
    "encode_prompt",
    "encode_sft",
    "make_comparisons",
    "make_conversations",
    "make_prompts",
    "pad_batch",
    "sft_labels",
    "validate_conversation",
    "validate_pair",
    "SFTConfig",
    "train_sft",
    "evaluate_chat",
    "RewardConfig",
    "RewardModel",
    "ValueModel",
    "bradley_terry_loss",
    "last_token_index",
    "train_reward_model",
    "evaluate_reward_model",
    "PPOConfig",
    "PPOTrainer",
    "Rollout",
    "collect_rollout",
    "evaluate_policy",
    "gae",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_step",
    "ppo_value_loss",
    "shaped_rewards",
    "DPOConfig",
    "dpo_loss",
    "evaluate_dpo",
    "reference_logprobs",
    "train_dpo",
    "SPECIALIST_NAMES",
    "SPECIALIST_RECIPES",
    "SpecialistConfig",
    "arithmetic_accuracy",
    "arithmetic_problems",
    "code_conversations",
    "code_reply_ok",
    "continue_pretraining",
    "math_conversations",
    "specialist_measures",
    "text_loss",
    "train_specialist",
    "PIPELINE_PRESETS",
    "PipelineConfig",
    "pipeline_config",
    "run_alignment_pipeline",
]
