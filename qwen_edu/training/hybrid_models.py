"""Chapter 13's small models: full attention, pure Gated DeltaNet, and the 3:1 hybrid, trained alike.

The three models are Qwen3-Next-style decoders (:class:`~qwen_edu.models.qwen3_next.Qwen3NextForCausalLM`)
that differ only in ``layer_types``: four full-attention layers, four Gated DeltaNet layers, or three
DeltaNet layers then one attention layer. Everything else is the same: the book's base tokenizer, the
same rows in the same order, the same optimiser and schedule, and an MTP head trained alongside
(loss ``LM + mtp_weight * MTP``, as in DeepSeek-V3 and Qwen3-Next), which chapter 13 uses for
speculative decoding. Half of every batch are chapter 9's passkey rows (:mod:`qwen_edu.corpus.passkey`):
a secret code (a word and a digit) stated somewhere in 256 tokens of stories and asked for at the end,
with extra weight on the answer (:func:`~qwen_edu.training.retrieval_tuning.retrieval_loss`), so that
the chapter can compare how each architecture retrieves a fact, inside and beyond the training length.

The book's simplifications (its own choices, sized for a 2-core CPU): dense SwiGLU MLPs instead of the
512-expert MoE (the comparison is about the token mixer), ~1.3M parameters, 256-token rows.

``python -m qwen_edu.training.hybrid_models --out qwen_edu/assets/hybrid_models`` rebuilds the shipped
models (seed 0; bit for bit on the same machine and thread count), one sub-folder per architecture,
plus ``training_log.json`` and a model card. Bit for bit only as one run in the order of
:data:`ARCHITECTURES`: the DeltaNet layers' convolution weights keep PyTorch's default init, drawn from the
global random stream when the model is built, i.e. after the previous model's seeded init (checked: the
first step's losses of all three models match the shipped log when built in that order). A model trained
alone (``--only``) gets other convolution weights, so its numbers differ a little.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from qwen_edu.models.gated_deltanet import GatedDeltaNet
from qwen_edu.models.layers import ZeroCenteredRMSNorm
from qwen_edu.models.qwen3_next import FULL, LINEAR, Qwen3NextConfig, Qwen3NextForCausalLM

__all__ = ["ARCHITECTURES", "HybridRecipe", "model_config", "mtp_loss", "train_model", "build_hybrid_models",
           "hybrid_models_path", "load_hybrid_model", "model_card"]

#: layer_types of the three models, by name.
ARCHITECTURES: dict[str, list[str]] = {
    "full_attention": [FULL] * 4,
    "gated_deltanet": [LINEAR] * 4,
    "hybrid": [LINEAR, LINEAR, LINEAR, FULL],
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


@dataclass
class HybridRecipe:
    """Model shape and training settings shared by the three models (the book's choices)."""

    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, partial_rotary_factor=0.25, rope_theta=10000.0, num_experts=0,
        mtp_num_hidden_layers=1, tie_word_embeddings=True, max_position_embeddings=256))
    steps: int = 600
    batch_size: int = 16
    passkey_rows: int = 8  # of the batch_size rows of each step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    answer_weight: float = 1.0
    eval_every: int = 100
    eval_rows: int = 64
    seed: int = 0


def model_config(layer_types: list[str], tokenizer: Any, recipe: HybridRecipe) -> Qwen3NextConfig:
    """The config of one of the three models (vocabulary padded to a multiple of 64, like the base model)."""
    vocab = math.ceil(tokenizer.vocab_size / 64) * 64
    eos = tokenizer.eos_id
    return Qwen3NextConfig(vocab_size=vocab, num_hidden_layers=len(layer_types), layer_types=list(layer_types),
                           bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **recipe.model)


def mtp_loss(model: Qwen3NextForCausalLM, hidden: torch.Tensor, input_ids: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the MTP head: from ``hidden[t]`` (main model) and token t+1, predict t+2.

    ``labels`` are the main model's (unshifted, ``-100`` ignored); shifting them by one more position
    gives the MTP targets.
    """
    from qwen_edu.training.loss import causal_lm_loss

    logits = model.mtp_logits(hidden[:, :-1], input_ids[:, 1:])  # position t: (h_t, x_{t+1}) -> x_{t+2}
    return causal_lm_loss(logits, labels[:, 1:])


def _init(model: Qwen3NextForCausalLM, seed: int) -> Qwen3NextForCausalLM:
    """HF-style ``N(0, 0.02)`` init (:func:`~qwen_edu.training.init_weights`), zero-centred norms back
    at 0, and Mamba2's decay init for every DeltaNet head: ``A ~ U(1, 16)`` and ``dt_bias`` the inverse
    softplus of ``dt ~ logU(0.001, 0.1)``, so that at the start ``g = -A softplus(a + dt_bias)`` spans
    about -1.6 (forget within a token) to -0.001 (remember for hundreds of tokens)."""
    from qwen_edu.training import init_weights

    init_weights(model, seed=seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ZeroCenteredRMSNorm):
                module.weight.zero_()
            elif isinstance(module, GatedDeltaNet):
                heads = module.A_log.shape[0]
                module.A_log.copy_(torch.empty(heads).uniform_(1.0, 16.0).log())
                dt = torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
    return model


def _rows(tokenizer: Any, recipe: HybridRecipe) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Training rows for every step (corpus rows then passkey rows, per step) and validation corpus rows."""
    from qwen_edu.corpus.passkey import passkey_training_rows
    from qwen_edu.training import prepare_data
    from qwen_edu.training import recipe as base_recipe

    data = prepare_data(base_recipe("base"), tokenizer=tokenizer)
    corpus_per_step = recipe.batch_size - recipe.passkey_rows
    gen = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(data.train), generator=gen)[:recipe.steps * corpus_per_step]
    corpus = data.train.__getitems__(order.tolist())
    passkey = passkey_training_rows(tokenizer, recipe.steps * recipe.passkey_rows, recipe.seq_len, seed=recipe.seed,
                                    min_length=recipe.seq_len)
    key_ids = torch.tensor([r["input_ids"] for r in passkey])
    key_labels = torch.tensor([r["labels"] for r in passkey])
    key_answer = torch.tensor([r["answer_mask"] for r in passkey], dtype=torch.bool)

    def per_step(corpus_part: torch.Tensor, passkey_part: torch.Tensor) -> torch.Tensor:
        a = corpus_part.view(recipe.steps, corpus_per_step, -1)
        b = passkey_part.view(recipe.steps, recipe.passkey_rows, -1)
        return torch.cat([a, b], dim=1)

    train = {"input_ids": per_step(corpus["input_ids"], key_ids), "labels": per_step(corpus["labels"], key_labels),
             "answer_mask": per_step(torch.zeros_like(corpus["labels"], dtype=torch.bool), key_answer)}
    val = data.val.__getitems__(list(range(min(recipe.eval_rows, len(data.val)))))
    return train, val


@torch.no_grad()
def _validate(model: Qwen3NextForCausalLM, val: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean validation loss of the main head and of the MTP head, on the corpus rows."""
    from qwen_edu.training.loss import causal_lm_loss

    model.eval()
    lm, mtp = [], []
    for start in range(0, len(val["input_ids"]), 16):
        ids, labels = val["input_ids"][start:start + 16], val["labels"][start:start + 16]
        out = model(ids)
        lm.append(float(causal_lm_loss(out.logits, labels)))
        mtp.append(float(mtp_loss(model, out.last_hidden_state, ids, labels)))
    model.train()
    return sum(lm) / len(lm), sum(mtp) / len(mtp)


def train_model(layer_types: list[str], tokenizer: Any, recipe: HybridRecipe, rows: tuple[dict, dict] | None = None,
                *, progress: bool = True, name: str = "") -> tuple[Qwen3NextForCausalLM, dict[str, Any]]:
    """Train one of the three models from scratch; returns it (eval mode) and its log."""
    from qwen_edu.training.optim import make_optimizer, make_scheduler
    from qwen_edu.training.retrieval_tuning import retrieval_loss

    train, val = rows if rows is not None else _rows(tokenizer, recipe)
    model = _init(Qwen3NextForCausalLM(model_config(layer_types, tokenizer, recipe)), recipe.seed)
    optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay)
    scheduler = make_scheduler(optimizer, warmup_steps=recipe.warmup_steps, total_steps=recipe.steps,
                               min_lr_ratio=recipe.min_lr_ratio)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.steps, desc=name or "training")
    log: dict[str, Any] = {"layer_types": list(layer_types), "parameters": model.num_parameters(),
                           "steps": [], "val": []}
    start = time.perf_counter()
    cpu_start = time.process_time()
    model.train()
    for step in range(recipe.steps):
        ids, labels, answer = train["input_ids"][step], train["labels"][step], train["answer_mask"][step]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
            loss, answer_loss = retrieval_loss(out.logits, labels, answer, recipe.answer_weight)
            extra = mtp_loss(model, out.last_hidden_state, ids, labels)
        optimizer.zero_grad(set_to_none=True)
        (loss + recipe.mtp_weight * extra).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        log["steps"].append({"loss": round(loss.item() - recipe.answer_weight * answer_loss.item(), 5),
                             "answer_loss": round(answer_loss.item(), 5), "mtp_loss": round(extra.item(), 5)})
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            val_lm, val_mtp = _validate(model, val)
            log["val"].append({"step": step + 1, "loss": round(val_lm, 5), "mtp_loss": round(val_mtp, 5)})
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{log['steps'][-1]['loss']:.3f}", answer=f"{answer_loss.item():.3f}")
    if bar is not None:
        bar.close()
    log["seconds"] = round(time.perf_counter() - start, 1)
    log["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    return model.eval(), log


def hybrid_models_path() -> Path:
    """The shipped models (``qwen_edu/assets/hybrid_models``), one sub-folder per architecture."""
    path = Path(str(files("qwen_edu") / "assets" / "hybrid_models"))
    if not (path / "training_log.json").is_file():
        raise FileNotFoundError(f"{path} holds no models; build them with "
                                "`python -m qwen_edu.training.hybrid_models --out qwen_edu/assets/hybrid_models`")
    return path


def load_hybrid_model(name: str, dtype: torch.dtype | str = "float32") -> Qwen3NextForCausalLM:
    """One of the shipped models by name (a key of :data:`ARCHITECTURES`)."""
    import qwen_edu

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return qwen_edu.load_model(hybrid_models_path() / name, dtype=dtype)  # type: ignore[return-value]


def build_hybrid_models(out: str | Path, recipe: HybridRecipe | None = None, *, threads: int | None = 1,
                        names: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the models and write ``out/<name>/`` (bf16 weights, config, tokenizer) plus ``training_log.json``.

    A model whose folder already exists is kept (the run can be resumed model by model, though a resumed run
    does not reproduce the models bit for bit: see the module's docstring).
    """
    from qwen_edu.checkpoint import save_model
    from qwen_edu.tokenizer import load_tokenizer
    from qwen_edu.training import base_model_path

    if threads:
        torch.set_num_threads(threads)
    recipe = recipe or HybridRecipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(base_model_path())
    log_path = out / "training_log.json"
    log: dict[str, Any] = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log["recipe"] = asdict(recipe)
    log.setdefault("models", {})
    log["torch"] = torch.__version__
    log["threads"] = torch.get_num_threads()
    rows = _rows(tokenizer, recipe)
    for name in names or list(ARCHITECTURES):
        folder = out / name
        if (folder / "model.safetensors").is_file() and name in log["models"]:
            continue
        model, model_log = train_model(ARCHITECTURES[name], tokenizer, recipe, rows, progress=progress, name=name)
        save_model(model.to(torch.bfloat16), folder)
        for file in _TOKENIZER_FILES:
            shutil.copy(base_model_path() / file, folder / file)
        log["models"][name] = model_log
        log_path.write_text(json.dumps(log, indent=1) + "\n")
    (out / "README.md").write_text(model_card(log))
    return log


def model_card(log: dict[str, Any]) -> str:
    """The asset's README, written from its training log."""
    recipe = log["recipe"]
    rows = []
    for name, entry in log["models"].items():
        kinds = " ".join("L" if t == LINEAR else "F" for t in entry["layer_types"])
        final = entry["val"][-1]
        rows.append(f"| `{name}` | {kinds} | {entry['parameters']:,} | {final['loss']:.4f} | {final['mtp_loss']:.4f} "
                    f"| {entry['cpu_seconds'] / 60:.1f} min CPU ({entry['seconds'] / 60:.0f} min wall) |")
    shape = ", ".join(f"{k}={v}" for k, v in recipe["model"].items())
    return f"""# Chapter 13's small models: full attention, Gated DeltaNet, 3:1 hybrid

Three Qwen3-Next-architecture decoders (`model_type: "qwen3_next"`, loaded by `qwen_edu.load_model`)
that differ only in `layer_types` (L = Gated DeltaNet, F = gated full attention). Each has an MTP
head (`mtp.*`). Weights are bfloat16; the tokenizer is the base model's (chapter 3).

| model | layers | parameters | validation loss | MTP loss | training time |
|---|---|---:|---:|---:|---|
{chr(10).join(rows)}

Validation losses are nats/token on {recipe['eval_rows']} held-out corpus rows of {recipe['seq_len']} tokens
(the MTP head predicts the token after next, given the next one). Training time on
{log['threads']} thread(s), torch {log['torch']}, on a 2-core CPU shared with other jobs (hence wall >> CPU).

## Recipe (the book's choices, sized for a CPU)

Shape: {shape}. {recipe['steps']} steps of {recipe['batch_size']} rows: {recipe['batch_size'] - recipe['passkey_rows']}
packed corpus rows (the base model's corpus) and {recipe['passkey_rows']} passkey rows (chapter 9's secret-code
task at the training length). AdamW, lr {recipe['lr']} with {recipe['warmup_steps']} warm-up steps and cosine
decay to {recipe['min_lr_ratio']:.0%}, weight decay {recipe['weight_decay']}, gradient clipping 1.0, bf16 autocast.
Loss: language modelling + {recipe['answer_weight']} x the mean loss on the passkey answers
+ {recipe['mtp_weight']} x the MTP head's loss. Init: N(0, 0.02), zero-centred norms at 0, Mamba2's decay
init for the DeltaNet heads. Seed {recipe['seed']}.

## Reproduce

```bash
python -m qwen_edu.training.hybrid_models --out qwen_edu/assets/hybrid_models
```

Same machine and thread count: the same bits. `training_log.json` holds every step's losses.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (e.g. qwen_edu/assets/hybrid_models)")
    parser.add_argument("--steps", type=int, default=HybridRecipe.steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=list(ARCHITECTURES), help="train only these models")
    args = parser.parse_args(argv)
    recipe = HybridRecipe(steps=args.steps, warmup_steps=min(HybridRecipe.warmup_steps, args.steps // 10),
                          eval_every=min(HybridRecipe.eval_every, args.steps))
    log = build_hybrid_models(args.out, recipe, threads=args.threads, names=args.only)
    for name, model_log in log["models"].items():
        final = model_log["val"][-1]
        print(f"{name:>15}: val loss {final['loss']:.4f}, MTP {final['mtp_loss']:.4f}, "
              f"{model_log['seconds']:,.0f} s")


if __name__ == "__main__":
    main()
