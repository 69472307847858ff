"""Pre-training a small Qwen: data packing, the loss, AdamW + schedule, the trainer, DDP/FSDP.

Building blocks, in the order the book shows them:

- :func:`pack_sequences`, :class:`PackedDataset`, :func:`make_dataloader` -- documents to batches;
- :func:`shift_labels`, :func:`causal_lm_loss` -- the next-token objective with ``-100`` ignored;
- :func:`param_groups`, :func:`lr_at_step`, :func:`make_optimizer`, :func:`make_scheduler`;
- :class:`TrainConfig`, :class:`Trainer` (``on_step(step, loss, lr)`` callback), :func:`init_weights`;
- :func:`init_distributed`, :func:`wrap_model` -- the same loop under ``torchrun`` with DDP or FSDP2;
- :data:`RECIPES`, :func:`prepare_data`, :func:`model_config` -- the ``tiny`` and ``base`` runs;
  :func:`base_model_path` -- the shipped base model's folder.

``python -m qwen_edu.training.train_base --out DIR`` trains the book's base model.
"""

from qwen_edu.training.data import (
    IGNORE_INDEX,
    PackedDataset,
    PackedSequences,
    StepBatchSampler,
    check_batch_geometry,
    make_dataloader,
    pack_sequences,
    split_documents,
    tokenize_documents,
)
from qwen_edu.training.distributed import DistInfo, init_distributed, wrap_model
from qwen_edu.training.loss import causal_lm_loss, count_targets, shift_labels
from qwen_edu.training.optim import lr_at_step, make_optimizer, make_scheduler, param_groups
from qwen_edu.training.presets import (
    RECIPES,
    PreparedData,
    Recipe,
    base_model_path,
    model_config,
    prepare_data,
    recipe,
)
from qwen_edu.training.trainer import (
    ResumeError,
    TrainConfig,
    Trainer,
    TrainResult,
    init_weights,
    resolve_precision,
)

__all__ = [
    "IGNORE_INDEX",
    "PackedSequences",
    "PackedDataset",
    "StepBatchSampler",
    "check_batch_geometry",
    "make_dataloader",
    "pack_sequences",
    "split_documents",
    "tokenize_documents",
    "shift_labels",
    "causal_lm_loss",
    "count_targets",
    "param_groups",
    "lr_at_step",
    "make_optimizer",
    "make_scheduler",
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "ResumeError",
    "init_weights",
    "resolve_precision",
    "DistInfo",
    "init_distributed",
    "wrap_model",
    "RECIPES",
    "Recipe",
    "recipe",
    "model_config",
    "prepare_data",
    "PreparedData",
    "base_model_path",
]
