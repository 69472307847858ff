"""Check that DDP / FSDP on N processes train exactly like one process with the same global batch.

Run a few steps of a tiny model and write the per-step losses (and a weight checksum) as JSON::

    python -m qwen_edu.training.equivalence --out /tmp/one.json
    torchrun --nproc_per_node 2 -m qwen_edu.training.equivalence --parallel ddp --out /tmp/ddp.json
    torchrun --nproc_per_node 2 -m qwen_edu.training.equivalence --parallel fsdp --out /tmp/fsdp.json

Every run uses the same global batch (``--batch-size`` sequences per optimizer step); the
processes split it, and the single process accumulates gradients over the same rows. The losses
then agree to float32 rounding (different summation orders; ~1e-6 relative), not bit for bit.
The test suite runs this on CPU with gloo (``tests/test_training_distributed.py``).
"""

from __future__ import annotations

import argparse
import json

import torch

from qwen_edu.models import Qwen2ForCausalLM, QwenConfig
from qwen_edu.training.data import PackedDataset, pack_sequences
from qwen_edu.training.distributed import init_distributed
from qwen_edu.training.trainer import TrainConfig, Trainer, init_weights

__all__ = ["run_equivalence", "tiny_model", "tiny_data"]


def tiny_model(vocab_size: int = 96, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = QwenConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        max_position_embeddings=128, rope_theta=10000.0)
    return init_weights(Qwen2ForCausalLM(config))


def tiny_data(n_docs: int = 120, seq_len: int = 16, vocab_size: int = 96, seed: int = 0) -> PackedDataset:
    """Random documents of random length (eos id = vocab_size - 1), packed; the last row is padded."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab_size - 1, (int(torch.randint(3, 30, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(n_docs)]
    return PackedDataset(pack_sequences(docs, seq_len, eos_id=vocab_size - 1))


def run_equivalence(parallel: str = "none", steps: int = 6, batch_size: int = 8, micro_batch_size: int = 2,
                    precision: str = "fp32", resume_at: int | None = None, work_dir: str | None = None) -> dict:
    """Train ``steps`` steps; with ``resume_at=k`` stop after k steps, save, and finish in a *new* trainer
    (fresh model and optimizer) resumed from the checkpoint in ``work_dir``."""
    info = init_distributed("cpu")
    torch.set_num_threads(1)
    data = tiny_data()
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=16,
                      lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, precision=precision, parallel=parallel,
                      progress=False, seed=0)
    trainer = Trainer(tiny_model(), cfg, data, data, dist_info=info)
    if resume_at is None:
        result = trainer.train()
        losses, norms = result.losses, [r.grad_norm for r in result.history]
    else:
        if work_dir is None:
            raise ValueError("resume_at needs a work_dir for the checkpoint")
        first = trainer.train(stop_at=resume_at)
        losses, norms = first.losses, [r.grad_norm for r in first.history]
        trainer.save_checkpoint(work_dir)
        trainer = Trainer(tiny_model(seed=123), cfg, data, data, dist_info=info)  # different init on purpose
        result = trainer.train(resume_from=work_dir)
        losses = losses + result.losses
        norms = norms + [r.grad_norm for r in result.history]
    state, _ = trainer._state_dicts()
    checksum = float(sum(v.double().abs().sum() for v in state.values()))
    return {"world_size": info.world_size, "parallel": parallel, "losses": losses,
            "grad_norms": norms, "val_loss": result.final_val_loss,
            "weight_abs_sum": checksum}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="DDP/FSDP vs single-process equivalence run")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--resume-at", type=int, default=None, help="save after this many steps and resume")
    p.add_argument("--work-dir", default=None, help="checkpoint folder for --resume-at")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = run_equivalence(args.parallel, args.steps, args.batch_size, args.micro_batch_size,
                          resume_at=args.resume_at, work_dir=args.work_dir)
    if out["world_size"] == 1 or torch.distributed.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(out, fh)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
