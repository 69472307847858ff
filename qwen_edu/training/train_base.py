"""Train the book's base model from nothing: corpus -> BPE vocabulary -> Qwen2 -> HF checkpoint folder.

Reproduce the shipped model (about 15 minutes on 2 CPU cores)::

    python -m qwen_edu.training.train_base --out qwen_edu/assets/base_model

The same script runs on several processes with an existing engine (gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 2 -m qwen_edu.training.train_base --parallel ddp --out /tmp/base
    torchrun --nproc_per_node 2 -m qwen_edu.training.train_base --parallel fsdp --out /tmp/base

The output folder holds ``config.json`` + ``model.safetensors`` (loadable by transformers'
``Qwen2ForCausalLM`` and ``qwen_edu.load_model``), the tokenizer (``tokenizer.json`` etc., loadable by
``qwen_edu.load_tokenizer`` and the ``tokenizers`` library), ``training_log.json`` and a model card.
The resumable trainer state goes to ``--work-dir`` (default ``<out>/../<name>_work``), not into the
shipped folder; ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from qwen_edu.training.distributed import init_distributed
from qwen_edu.training.presets import model_config, prepare_data, recipe
from qwen_edu.training.trainer import CHECKPOINT_NAME, Trainer, init_weights

__all__ = ["main", "sample_stories", "SAMPLE_PROMPTS"]

SAMPLE_PROMPTS = ["Once upon a time, there was", "One day, Tom went to the park with his friend", "def add(a, b):\n",
                  "12 + 35 ="]


@torch.no_grad()
def sample_stories(model, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 120, seed: int = 0,
                   temperature: float = 0.8, top_k: int | None = 40) -> list[str]:
    """Continue each prompt (sampling with a seeded generator, stopping at end-of-text)."""
    from qwen_edu.generation import generate

    model.eval()
    out = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(prompt)], device=next(model.parameters()).device)
        gen = torch.Generator(device=ids.device).manual_seed(seed + i)
        full = generate(model, ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                        temperature=max(temperature, 1e-6), top_k=top_k, eos_token_id=tokenizer.eos_id,
                        generator=gen)
        out.append(tokenizer.decode(full[0].tolist(), skip_special_tokens=True))
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output checkpoint folder (HF layout)")
    p.add_argument("--recipe", default="base", help="'base' (the shipped model) or 'tiny'")
    p.add_argument("--steps", type=int, default=None, help="override max_steps")
    p.add_argument("--seed", type=int, default=None, help="override the seed (corpus, init, data order)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--parallel", default=None, choices=["none", "ddp", "fsdp"])
    p.add_argument("--attn", default=None, choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--work-dir", default=None, help="where the resumable trainer state is written")
    p.add_argument("--resume", action="store_true", help="continue from --work-dir's trainer state")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    info = init_distributed(args.device)
    overrides = {k: v for k, v in dict(max_steps=args.steps, seed=args.seed, precision=args.precision,
                                       parallel=args.parallel, attn_implementation=args.attn,
                                       num_threads=args.threads).items() if v is not None}
    if info.world_size > 1 and "parallel" not in overrides:
        overrides["parallel"] = "ddp"
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / f"{out.name}_work"
    overrides["out_dir"] = str(work)
    overrides["progress"] = not args.no_progress
    r = recipe(args.recipe, **overrides)
    cfg = r.train
    if cfg.num_threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)

    t0 = time.perf_counter()
    data = prepare_data(r)
    t_data = time.perf_counter() - t0
    config = model_config(r, data.tokenizer)
    torch.manual_seed(cfg.seed)
    from qwen_edu.models import Qwen2ForCausalLM

    model = init_weights(Qwen2ForCausalLM(config))
    n_params = model.num_parameters()
    if info.is_main:
        print(f"corpus: {len(data.train_docs)} train / {len(data.val_docs)} val documents, "
              f"{data.train.packed.num_tokens:,} / {data.val.packed.num_tokens:,} tokens "
              f"({len(data.train)} / {len(data.val)} rows of {cfg.seq_len}); vocabulary {data.tokenizer.vocab_size} "
              f"(embedding rows {config.vocab_size}); model {n_params:,} parameters; data ready in {t_data:.1f}s",
              flush=True)
    trainer = Trainer(model, cfg, data.train, data.val, dist_info=info)
    resume = work / CHECKPOINT_NAME if args.resume else None
    t1 = time.perf_counter()
    result = trainer.train(resume_from=resume)
    train_seconds = time.perf_counter() - t1

    # Gather the full weights (a collective under FSDP), then rank 0 writes the folder.
    full_state, _ = trainer._state_dicts()
    summary: dict = {}
    if info.is_main:
        from qwen_edu.checkpoint import save_model
        from qwen_edu.tokenizer import save_pretrained

        final = Qwen2ForCausalLM(config)
        final.load_state_dict(full_state)
        final.eval()
        val_fp32 = _evaluate_plain(final, data.val, cfg.micro_batch_size)
        save_dtype = getattr(torch, args.save_dtype)
        shipped = Qwen2ForCausalLM(config).to(save_dtype)
        shipped.load_state_dict({k: v.to(save_dtype) for k, v in full_state.items()})
        out.mkdir(parents=True, exist_ok=True)
        save_model(shipped, out)
        save_pretrained(data.tokenizer, out)
        val_shipped = _evaluate_plain(shipped.float(), data.val, cfg.micro_batch_size)
        samples = sample_stories(final, data.tokenizer)
        summary = {
            "recipe": r.name,
            "command": "python -m qwen_edu.training.train_base " + " ".join(argv or []) if argv is not None else
            "python -m qwen_edu.training.train_base --out " + str(args.out),
            "seed": cfg.seed,
            "parameters": n_params,
            "vocab_size_tokenizer": data.tokenizer.vocab_size,
            "train_tokens_per_epoch": data.train.packed.num_tokens,
            "val_tokens": data.val.packed.num_tokens,
            "tokens_seen": trainer.tokens_seen,
            "steps": trainer.step,
            "train_config": {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "progress")},
            "world_size": info.world_size,
            "data_seconds": round(t_data, 1),
            "train_seconds": round(train_seconds, 1),
            "final_train_loss": result.history[-1].loss if result.history else None,
            "final_val_loss_fp32_weights": val_fp32,
            "final_val_loss_shipped_weights": val_shipped,
            "shipped_dtype": args.save_dtype,
            "val_history": result.val_history,
            "loss_every_10_steps": [(h.step, round(h.loss, 4)) for h in result.history if h.step % 10 == 0],
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads".strip(),
            "samples": samples,
        }
        with open(out / "training_log.json", "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
            fh.write("\n")
        print(json.dumps({k: summary[k] for k in ("steps", "train_seconds", "final_train_loss",
                                                   "final_val_loss_fp32_weights",
                                                   "final_val_loss_shipped_weights")}), flush=True)
        for s in samples:
            print("---\n" + s, flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


@torch.no_grad()
def _evaluate_plain(model, data, micro_batch_size: int) -> float:
    from qwen_edu.training.loss import causal_lm_loss, count_targets

    total, count = 0.0, 0
    for start in range(0, len(data), micro_batch_size):
        batch = data.__getitems__(list(range(start, min(start + micro_batch_size, len(data)))))
        logits = model(input_ids=batch["input_ids"]).logits
        total += causal_lm_loss(logits, batch["labels"], reduction="sum").item()
        count += int(count_targets(batch["labels"]))
    return total / count


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
