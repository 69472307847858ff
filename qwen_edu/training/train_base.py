"""Train the book's base model from nothing: corpus -> BPE vocabulary -> Qwen2 -> HF checkpoint folder.

Reproduce the shipped model (about 15 minutes on 2 CPU cores)::

    python -m qwen_edu.training.train_base --out qwen_edu/assets/base_model

The same script runs on several processes with an existing engine (gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 2 -m qwen_edu.training.train_base --parallel ddp --out /tmp/base
    torchrun --nproc_per_node 2 -m qwen_edu.training.train_base --parallel fsdp --out /tmp/base

The output folder holds ``config.json`` + ``model.safetensors`` (loadable by transformers'
``Qwen2ForCausalLM`` and ``qwen_edu.load_model``), the tokenizer (``tokenizer.json`` etc., loadable by
``qwen_edu.load_tokenizer`` and the ``tokenizers`` library), ``training_log.json`` and a model card.
The resumable trainer state goes to ``--work-dir`` (default ``$TMPDIR/qwen_edu_runs/<out folder name>``),
never into the shipped folder; ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen_edu.training.distributed import init_distributed
from qwen_edu.training.presets import model_config, prepare_data, recipe
from qwen_edu.training.trainer import CHECKPOINT_NAME, Trainer, init_weights

__all__ = ["main", "sample_stories", "model_card", "write_model_card", "SAMPLE_PROMPTS", "VAL_LOSS_THRESHOLD"]

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
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward pass and process (default: the recipe's, split over processes)")
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
    if args.steps is not None:  # a shorter run keeps its warm-up inside the run
        overrides["warmup_steps"] = min(recipe(args.recipe).train.warmup_steps, args.steps)
    base_train = recipe(args.recipe).train
    if args.micro_batch_size is not None:
        overrides["micro_batch_size"] = args.micro_batch_size
    elif base_train.batch_size % (base_train.micro_batch_size * info.world_size):
        # same global batch (so the same training maths), split over the processes
        overrides["micro_batch_size"] = max(1, base_train.batch_size // info.world_size)
    if info.world_size > 1 and "parallel" not in overrides:
        overrides["parallel"] = "ddp"
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "qwen_edu_runs" / out.resolve().name
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
            "n_docs": r.n_docs,
            "command": "python -m qwen_edu.training.train_base " + " ".join(sys.argv[1:] if argv is None else argv),
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
            "history": [{"step": h.step, "loss": round(h.loss, 5), "lr": float(f"{h.lr:.6g}"),
                         "grad_norm": round(h.grad_norm, 4)} for h in result.history],
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                       f"{torch.get_num_threads()} thread(s)".strip(),
            "samples": samples,
        }
        (out / "README.md").write_text(model_card(summary, config), encoding="utf-8")
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


VAL_LOSS_THRESHOLD = 0.6  # what tests/test_training_base_model.py demands of the shipped weights


def model_card(summary: dict, config) -> str:
    """The README.md of the output folder, filled in from the run's summary."""
    t = summary["train_config"]
    tokens = summary["tokens_seen"]
    samples = "\n\n".join("```text\n" + s.strip() + "\n```" for s in summary["samples"])
    val_rows = "\n".join(f"| {step} | {loss:.4f} |" for step, loss in summary["val_history"])
    return f"""# qwen-edu base model

The small base model the book pre-trains in chapter 3 and builds on later (alignment, specialists).
It is a **Qwen2-architecture** decoder -- the same code path as Qwen2/Qwen2.5 (`model_type: "qwen2"`),
just tiny -- trained from scratch on the book's own generated corpus (`qwen_edu.corpus`).

| | |
|---|---|
| architecture | Qwen2: {config.num_hidden_layers} layers, hidden {config.hidden_size}, SwiGLU {config.intermediate_size}, \
{config.num_attention_heads} query heads / {config.num_key_value_heads} KV heads (GQA, head dim {config.head_dim}), RoPE θ={config.rope_theta:g}, \
RMSNorm ε={config.rms_norm_eps:g}, q/k/v bias, tied embeddings |
| parameters | {summary["parameters"]:,} |
| vocabulary | {summary["vocab_size_tokenizer"]} byte-level BPE tokens, the last three special (end-of-text, \
ChatML im_start / im_end); embedding padded to {config.vocab_size} rows |
| weights | `model.safetensors`, {summary["shipped_dtype"]} |
| context | trained on {t["seq_len"]}-token rows (RoPE allows more, untested) |
| final validation loss | **{summary["final_val_loss_shipped_weights"]:.4f}** nats/token (shipped weights, fp32 compute); \
the tests require < {VAL_LOSS_THRESHOLD} |
| training time | {summary["train_seconds"] / 60:.1f} min ({summary["train_seconds"]:.0f} s) + {summary["data_seconds"]:.0f} s data preparation, \
{summary["world_size"]} process(es), {summary["tokens_seen"] / summary["train_seconds"]:,.0f} tokens/s on \
{" ".join(summary["machine"].split())} (a 2-core CPU shared with other jobs) |

## Reproduce

```bash
python -m qwen_edu.training.train_base --out qwen_edu/assets/base_model
```

(this run: `{summary["command"]}`; `--threads` and `--work-dir` change neither the data nor the schedule).

Seed {summary["seed"]} fixes everything: the corpus (`build_corpus({summary.get("n_docs", 60000)}, seed={summary["seed"]})`), the
tokenizer, the initial weights and the data order. Re-running on the same machine and thread count
repeats the run bit for bit; other CPUs give slightly different numbers (different kernels).
The resumable trainer state goes to `$TMPDIR/qwen_edu_runs/` (or `--work-dir`), not into this folder;
`--resume` continues an interrupted run exactly. The same command runs on several processes:
`torchrun --nproc_per_node 2 -m qwen_edu.training.train_base --parallel ddp|fsdp --out DIR`
(same global batch, so the same training maths up to float rounding).

## Data

`qwen_edu.corpus.build_corpus`: about 80% simple stories from a templated grammar (characters, places,
objects, eight plots), 10% small Python functions and 10% arithmetic lines (`12 + 35 = 47`).
{summary["train_tokens_per_epoch"]:,} training tokens per epoch, {summary["val_tokens"]:,} validation tokens (the last 1% of the
documents, held out before the tokenizer is trained). Documents are packed into rows of {t["seq_len"]} tokens
with `<|endoftext|>` after each one. The run saw {tokens:,} tokens ({tokens / summary["train_tokens_per_epoch"]:.2f} epochs).

**Why a trained vocabulary, not Qwen's.** Qwen's 151,643-token vocabulary would need a
{151936 * config.hidden_size / 1e6:.0f}M-parameter embedding at this width -- many times the whole model. A BPE
vocabulary trained with the book's own trainer (`qwen_edu.tokenizer.train_tokenizer`, Qwen's
pre-tokenizer regex, asked for 2048 entries) stops at {summary["vocab_size_tokenizer"] - 3} + 3 special tokens because by then no
pair repeats: every word of the corpus is already one token.

## Training

AdamW (β = {tuple(t["betas"])}, ε = {t["eps"]:g}), weight decay {t["weight_decay"]} on matrices only (norm gains and biases
undecayed), peak learning rate {t["lr"]:g} after {t["warmup_steps"]} linear warm-up steps, cosine decay to {t["min_lr"]:g} at step
{t["max_steps"]}, gradient clipping at {t["grad_clip"]}, {t["batch_size"]} sequences per step, {t["precision"]} autocast,
`{t["attn_implementation"] or "sdpa"}` attention. Initialisation N(0, 0.02) as in Hugging Face's Qwen2.

| step | validation loss |
|---:|---:|
{val_rows}

## Use

```python
import torch
import qwen_edu
from importlib.resources import files
path = files("qwen_edu") / "assets" / "base_model"
tok = qwen_edu.load_tokenizer(path)
model = qwen_edu.load_model(path, dtype="float32")
ids = torch.tensor([tok.encode("Once upon a time, there was")])
print(tok.decode(qwen_edu.generate(model, ids, max_new_tokens=150, eos_token_id=tok.eos_id)[0].tolist()))
```

`transformers.Qwen2ForCausalLM.from_pretrained(path)` and `tokenizers.Tokenizer.from_file(path / "tokenizer.json")`
read the same files.

## Samples (temperature 0.8, top-k 40, seed 0)

{samples}

## Limitations

It knows only the generated corpus: simple stories in a small vocabulary, the shapes of small Python
functions, and the *look* of arithmetic -- its sums are mostly wrong (the specialisation chapter fixes
that). Names and objects are sometimes mixed up within a story. It is a teaching model, not a
general-purpose one.
"""


def write_model_card(folder: str | os.PathLike) -> Path:
    """Re-render ``README.md`` of a trained folder from its ``training_log.json`` and ``config.json``."""
    from qwen_edu.models import QwenConfig

    folder = Path(folder)
    summary = json.loads((folder / "training_log.json").read_text(encoding="utf-8"))
    path = folder / "README.md"
    path.write_text(model_card(summary, QwenConfig.from_hf_config(folder)), encoding="utf-8")
    return path


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
