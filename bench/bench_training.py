"""Training throughput: qwen_edu's Qwen2ForCausalLM vs transformers' Qwen2ForCausalLM, same everything.

Both models get the same config (the base model's shape by default), the same initial weights, the
same data, batch, AdamW groups, schedule, clipping and precision -- they run through the same
:class:`qwen_edu.training.Trainer`; only the model class differs. Rounds alternate between the two
models (so a noisy, shared machine hurts both alike) and the median tokens/s over rounds is reported.

    python bench/bench_training.py                      # base shape, bf16 autocast + fp32, 2 threads
    python bench/bench_training.py --precision fp32 --rounds 5 --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_models(config):
    import transformers

    from qwen_edu.models import Qwen2ForCausalLM
    from qwen_edu.training import init_weights

    torch.manual_seed(0)
    ours = init_weights(Qwen2ForCausalLM(config))
    hf_config = transformers.Qwen2Config(**config.to_hf_config())
    hf_config.use_cache = False
    hf = transformers.Qwen2ForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not [k for k in missing if k != "lm_head.weight"] and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return ours, hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from qwen_edu.models import QwenConfig
    from qwen_edu.training import PackedDataset, TrainConfig, Trainer, pack_sequences
    from qwen_edu.training.presets import RECIPES

    vocab = 1536
    config = QwenConfig(vocab_size=vocab, **RECIPES["base"].model)
    gen = torch.Generator().manual_seed(0)
    docs = torch.randint(0, vocab - 1, (400, 200), generator=gen).tolist()
    data = PackedDataset(pack_sequences(docs, args.seq_len, eos_id=vocab - 1))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"model H={config.hidden_size} L={config.num_hidden_layers} vocab={vocab}; batch {args.batch_size}x"
          f"{args.seq_len} (micro {args.micro_batch_size}); {args.rounds} rounds x {args.steps} steps")

    for precision in args.precision:
        ours, hf = build_models(config)
        total = 1 + args.rounds * (args.steps + 1)
        trainers = {}
        for name, model in (("qwen_edu", ours), ("transformers", hf)):
            cfg = TrainConfig(max_steps=total, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                              seq_len=args.seq_len, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_every=0,
                              precision=precision, progress=False)
            trainers[name] = Trainer(model, cfg, data, device="cpu")
            trainers[name].train(stop_at=1)  # warm-up step (allocations, first-call overheads)
        speeds: dict[str, list[float]] = {name: [] for name in trainers}
        losses: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                trainer.train(stop_at=trainer.step + 1)  # untimed: refill caches after the other model ran
                tokens0, t0 = trainer.tokens_seen, time.perf_counter()
                trainer.train(stop_at=trainer.step + args.steps)
                speeds[name].append((trainer.tokens_seen - tokens0) / (time.perf_counter() - t0))
                losses[name] = trainer.result.history[-1].loss
        ours_tps, hf_tps = statistics.median(speeds["qwen_edu"]), statistics.median(speeds["transformers"])
        print(f"[{precision}] qwen_edu {ours_tps:,.0f} tok/s | transformers {hf_tps:,.0f} tok/s | "
              f"ratio qwen_edu/transformers = {ours_tps / hf_tps:.2f}  "
              f"(per-round: {[round(s) for s in speeds['qwen_edu']]} vs {[round(s) for s in speeds['transformers']]}; "
              f"last loss {losses['qwen_edu']:.4f} vs {losses['transformers']:.4f})", flush=True)


if __name__ == "__main__":
    main()
