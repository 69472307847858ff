"""Check that each load-balancing mode trains the same on 1 and N processes (and how the modes differ).

Train a tiny Qwen3-MoE a few steps per mode and write losses, aux losses and a weight checksum as JSON::

    python -m qwen_edu.training.balancing_check --out /tmp/one.json
    torchrun --nproc_per_node 2 -m qwen_edu.training.balancing_check --parallel ddp --out /tmp/ddp.json

With the same global batch, ``"micro_batch"`` on 2 ranks x 2 micro-batches of 2 sequences equals one
process with 4 micro-batches of 2 (the same micro-batches); ``"global_batch"`` equals one process with
2 micro-batches of 4 (micro-batch ``m`` is the union of the ranks' ``m``-th ones and their counts are
all-reduced); ``"global_batch_exact"`` equals any split, one micro-batch of 8 included. The test suite
runs this on CPU with gloo (``tests/test_qwen3_load_balancing.py``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from qwen_edu.training.load_balancing import BALANCING_MODES

__all__ = ["tiny_moe", "run_balancing"]

def tiny_moe(vocab_size: int = 96, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Qwen3-MoE (8 experts, top-2) with transformers' N(0, 0.02) initialisation."""
    from qwen_edu.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen_edu.training.trainer import init_weights

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                            max_position_embeddings=64, tie_word_embeddings=True)
    return init_weights(Qwen3MoeForCausalLM(config))


def run_balancing(mode: str, parallel: str = "none", steps: int = 4, batch_size: int = 8,
                  micro_batch_size: int = 2, aux_loss_coef: float = 0.1) -> dict[str, Any]:
    """Train :func:`tiny_moe` for ``steps`` steps with load balancing ``mode``; losses, aux losses and a
    weight checksum (``torchrun`` sets the process group; the same global batch on any world size)."""
    from qwen_edu.training.distributed import init_distributed
    from qwen_edu.training.equivalence import tiny_data
    from qwen_edu.training.trainer import TrainConfig, Trainer

    info = init_distributed("cpu")
    torch.set_num_threads(1)
    data = tiny_data()
    config = TrainConfig(max_steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=16,
                         lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=0, precision="fp32", parallel=parallel,
                         progress=False, seed=0, load_balancing=mode, aux_loss_coef=aux_loss_coef)
    trainer = Trainer(tiny_moe(), config, data, dist_info=info)
    result = trainer.train()
    state, _ = trainer._state_dicts()
    return {"mode": mode, "world_size": info.world_size, "losses": result.losses,
            "aux_losses": [r.aux_loss for r in result.history], "grad_norms": [r.grad_norm for r in result.history],
            "weight_abs_sum": float(sum(v.double().abs().sum() for v in state.values()))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="train a tiny MoE with each load-balancing mode; write JSON")
    p.add_argument("--modes", nargs="+", default=list(BALANCING_MODES[1:]), choices=BALANCING_MODES[1:])
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = [run_balancing(mode, args.parallel, args.steps, args.batch_size, args.micro_batch_size)
            for mode in args.modes]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(runs, fh)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
