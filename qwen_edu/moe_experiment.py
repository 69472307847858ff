"""Chapter 8's experiment: upcycle the book's base model into an MoE and keep training it next to dense models.

Four runs start from the shipped base model (``qwen_edu/assets/base_model``, dense FFN of 512) and
continue pre-training with identical data, order, schedule and optimizer. The data is the book's
generated corpus with a new mixture: 30% code and 30% arithmetic instead of 10% each (fresh documents,
seeds the base model never saw), so that the extra capacity has something to learn:

* ``dense-activated`` -- the base FFN widened (function-preserving, :func:`~qwen_edu.models.upcycle.widen_mlp`)
  to the MoE's *activated* width, shared + k * I = 512 + 4 * 64 = 768 neurons;
* ``moe`` -- :func:`~qwen_edu.models.upcycle.upcycle` with 32 routed experts of 64 neurons (four shuffled
  copies of the FFN, each cut into 8 slices), top-4, the FFN itself as the shared expert, and the
  load-balancing loss (coefficient ``aux_coef``);
* ``moe-no-aux`` -- the same MoE trained without the load-balancing loss;
* ``dense-total`` -- the base FFN widened to the MoE's *total* width, 512 + 32 * 64 = 2560 neurons.

These sizes, the learning rate and the step count are the book's choices for a 2-core CPU, not
Qwen's. Every run logs its training loss, the training FLOPs spent so far
(:func:`~qwen_edu.models.costs.flops_per_token`), validation loss, and for the MoEs the share of
routing assignments each expert received per layer. After training, the aux-loss MoE is probed:
which experts each domain (stories, code, arithmetic) and each token type is routed to, and what the
loss does without the shared expert or without the routed experts.

Upcycled routed experts start as a small correction to the shared expert, so their load moves slowly;
to see the load-balancing loss at work, two more runs train a small MoE *from scratch* (:data:`SCRATCH`,
no shared expert) with and without it, on the same data.

The notebook runs a short live version; the full runs are shipped as a small JSON log built by::

    python -m qwen_edu.moe_experiment --out qwen_edu/assets/moe_runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen_edu.models.costs import count_parameters, flops_per_token
from qwen_edu.models.moe import SparseMoeBlock, router_stats
from qwen_edu.models.qwen2_moe import Qwen2MoeForCausalLM
from qwen_edu.models.upcycle import matched_dense_width, moe_config_from_dense, upcycle, widen_mlp

__all__ = ["ExperimentConfig", "EXPERIMENT", "RUN_NAMES", "SCRATCH", "SCRATCH_RUNS", "scratch_moe", "build_models",
           "experiment_data", "train_run",
           "expert_shares",
           "domain_documents", "routing_by_domain", "token_type", "routing_by_token_type", "ablate",
           "document_loss", "shared_expert_report", "runs_path", "load_runs", "run_experiment"]

RUN_NAMES = ("dense-activated", "moe", "moe-no-aux", "dense-total")
DOMAINS = ("stories", "code", "arithmetic")
TOKEN_TYPES = ("word", "digit", "operator", "code keyword", "punctuation", "space/newline")
_KEYWORDS = {"def", "return", "if", "else", "elif", "for", "while", "in", "range", "len", "print", "and", "or",
             "not", "True", "False", "None", "import", "from", "class", "lambda", "is"}


@dataclass(frozen=True)
class ExperimentConfig:
    """The runs' shared settings (the book's choices)."""

    num_experts: int = 32
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    aux_coef: float = 0.01
    eval_every: int = 25
    eval_rows: int = 192
    load_every: int = 5
    seed: int = 0
    train_docs: int = 6000
    val_docs: int = 300
    code_fraction: float = 0.3
    arithmetic_fraction: float = 0.3


EXPERIMENT = ExperimentConfig()

#: The load-balancing comparison from scratch: a small MoE (no shared expert, 16 experts of 64, top-2)
#: trained from random weights with and without the auxiliary loss (the book's choices).
SCRATCH = ExperimentConfig(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=64, steps=150, lr=3e-3,
                           min_lr=3e-4, warmup_steps=15, eval_every=25, load_every=2)
SCRATCH_RUNS = ("scratch-aux", "scratch-no-aux")


def build_models(base: nn.Module, cfg: ExperimentConfig = EXPERIMENT, names: Sequence[str] = RUN_NAMES,
                 seed: int = 0) -> dict[str, nn.Module]:
    """The runs' starting points, all computing (nearly) the base model's function."""
    def moe() -> Qwen2MoeForCausalLM:
        return upcycle(base, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                       moe_intermediate_size=cfg.moe_intermediate_size, seed=seed)

    moe_config = moe_config_from_dense(base.config, num_experts=cfg.num_experts,  # type: ignore[arg-type]
                                       num_experts_per_tok=cfg.num_experts_per_tok,
                                       moe_intermediate_size=cfg.moe_intermediate_size)
    models: dict[str, nn.Module] = {}
    for name in names:
        if name.startswith("moe"):
            models[name] = moe()
        else:
            width = matched_dense_width(moe_config, "activated" if name == "dense-activated" else "total")
            models[name] = widen_mlp(base, width, seed=seed)
    return models


def scratch_moe(vocab_size: int, cfg: ExperimentConfig = SCRATCH, seed: int = 0) -> Qwen2MoeForCausalLM:
    """A 2-layer MoE language model with ``N(0, 0.02)`` weights (no shared expert), trained from scratch."""
    from qwen_edu.models.qwen2_moe import Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=cfg.num_experts,
                            num_experts_per_tok=cfg.num_experts_per_tok,
                            moe_intermediate_size=cfg.moe_intermediate_size, shared_expert_intermediate_size=0,
                            tie_word_embeddings=True, max_position_embeddings=256, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def experiment_data(tokenizer: Any, cfg: ExperimentConfig = EXPERIMENT) -> tuple[Any, Any]:
    """``(train, val)`` packed rows of ``cfg.seq_len`` tokens from the re-mixed corpus (seeds 1 and 2 + seed)."""
    from qwen_edu.corpus import build_corpus
    from qwen_edu.training.data import PackedDataset, pack_sequences, tokenize_documents

    mix = dict(code_fraction=cfg.code_fraction, arithmetic_fraction=cfg.arithmetic_fraction)
    out = []
    for n, seed in ((cfg.train_docs, cfg.seed + 1), (cfg.val_docs, cfg.seed + 2)):
        docs = build_corpus(n, seed=seed, **mix)
        out.append(PackedDataset(pack_sequences(tokenize_documents(tokenizer, docs), cfg.seq_len, tokenizer.eos_id)))
    return out[0], out[1]


def expert_shares(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """``[layers, E]``: each expert's share of a layer's (token, slot) assignments (rows sum to 1)."""
    return torch.stack([router_stats([logits], top_k).fraction / top_k for logits in router_logits])


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, rows: int, batch_size: int = 16) -> float:
    """Mean next-token loss over the first ``rows`` rows of a :class:`PackedDataset`."""
    from qwen_edu.training.loss import causal_lm_loss, count_targets

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(rows, len(data)), batch_size):
        batch = data.__getitems__(list(range(start, min(start + batch_size, rows, len(data)))))
        logits = model(batch["input_ids"]).logits
        total += float(causal_lm_loss(logits, batch["labels"], reduction="sum"))
        count += int(count_targets(batch["labels"]))
    model.train(was_training)
    return total / count


def train_run(model: nn.Module, train_data: Any, val_data: Any, cfg: ExperimentConfig = EXPERIMENT, *,
              aux_coef: float = 0.0, progress: str | None = None,
              on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Continue training ``model``; returns its log (steps, validation losses, expert loads for MoEs).

    Data order: a permutation of the training rows seeded by ``cfg.seed`` (the same for every run).
    The logged ``loss`` is the language-model cross-entropy only; ``aux`` is the load-balancing loss,
    added to the objective with weight ``aux_coef`` (it is logged for MoEs even when not trained on).
    """
    from qwen_edu.training.loss import causal_lm_loss
    from qwen_edu.training.optim import make_optimizer, make_scheduler

    is_moe = isinstance(model, Qwen2MoeForCausalLM)
    config = model.config  # type: ignore[attr-defined]
    per_token = flops_per_token(config, context=cfg.seq_len // 2, training=True)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                               min_lr_ratio=cfg.min_lr / cfg.lr)
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed))
    counts = count_parameters(config)
    log: dict[str, Any] = {"kind": "moe" if is_moe else "dense", "aux_coef": aux_coef,
                           "total_params": counts.total, "activated_params": counts.activated,
                           "train_flops_per_token": per_token, "steps": [], "val": [], "load": []}
    log["val"].append([0, evaluate(model, val_data, cfg.eval_rows)])
    steps = range(cfg.steps)
    if progress is not None:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress, dynamic_ncols=True)
    model.train()
    tokens = 0
    start = time.perf_counter()
    for step in steps:
        rows = order[(step * cfg.batch_size) % len(order):][:cfg.batch_size].tolist()
        batch = train_data.__getitems__(rows)
        ids = batch["input_ids"][:, :cfg.seq_len]
        labels = batch["labels"][:, :cfg.seq_len]
        out = model(ids, output_router_logits=True) if is_moe else model(ids)
        loss = causal_lm_loss(out.logits, labels)
        objective = loss + aux_coef * out.aux_loss if is_moe and aux_coef else loss
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += ids.numel()
        record = {"step": step + 1, "loss": float(loss.detach()), "lr": lr, "tokens": tokens, "flops": tokens * per_token}
        if is_moe:
            record["aux"] = float(out.aux_loss.detach())
            if step % cfg.load_every == 0 or step + 1 == cfg.steps:
                shares = expert_shares([x.detach() for x in out.router_logits], config.num_experts_per_tok)
                log["load"].append([step + 1, [[round(float(v), 5) for v in layer] for layer in shares]])
        log["steps"].append(record)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log["val"].append([step + 1, evaluate(model, val_data, cfg.eval_rows)])
        if on_step is not None:
            on_step(record)
    log["seconds"] = time.perf_counter() - start
    model.eval()
    return log


# ---------------------------------------------------------------------------------------------------
# What the experts do
# ---------------------------------------------------------------------------------------------------
def domain_documents(tokenizer: Any, n: int = 40, seed: int = 1000, max_tokens: int = 256) -> dict[str, list[list[int]]]:
    """Held-out generated documents of each domain (seeds unused by the training corpus), tokenized."""
    from qwen_edu.corpus import generate_arithmetic, generate_code, generate_stories

    docs = {"stories": generate_stories(n, seed=seed), "code": generate_code(n, seed=seed),
            "arithmetic": generate_arithmetic(n, seed=seed)}
    return {domain: [tokenizer.encode(d)[:max_tokens] for d in texts] for domain, texts in docs.items()}


def _routing(model: Qwen2MoeForCausalLM, ids: list[int]) -> torch.Tensor:
    """``[layers, tokens, k]`` expert indices chosen for one document."""
    with torch.no_grad():
        model(torch.tensor([ids]))
    k = model.config.num_experts_per_tok
    return torch.stack([torch.topk(b.router_logits, k, dim=-1).indices for b in model.sparse_blocks()])


def routing_by_domain(model: Qwen2MoeForCausalLM, docs: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    """Per domain, ``[layers, E]``: the share of the domain's (token, slot) assignments each expert got."""
    experts = model.config.num_experts
    out = {}
    for domain, documents in docs.items():
        counts = torch.zeros(len(model.sparse_blocks()), experts)
        for ids in documents:
            chosen = _routing(model, ids)
            for layer, picks in enumerate(chosen):
                counts[layer] += torch.bincount(picks.flatten(), minlength=experts).float()
        out[domain] = counts / counts.sum(-1, keepdim=True)
    return out


def token_type(text: str) -> str:
    """A coarse class of a token's text: word, digit, operator, code keyword, punctuation, space/newline."""
    core = text.strip()
    if not core:
        return "space/newline"
    if core.isdigit():
        return "digit"
    if core in _KEYWORDS:
        return "code keyword"
    if all(c in "+-*/=<>%" for c in core):
        return "operator"
    if all(c in string.punctuation for c in core):
        return "punctuation"
    return "word"


def routing_by_token_type(model: Qwen2MoeForCausalLM, tokenizer: Any, docs: dict[str, list[list[int]]]
                          ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per token type, ``[layers, E]`` assignment shares, and how many tokens of each type were seen."""
    experts, layers = model.config.num_experts, len(model.sparse_blocks())
    counts = {t: torch.zeros(layers, experts) for t in TOKEN_TYPES}
    seen = dict.fromkeys(TOKEN_TYPES, 0)
    for documents in docs.values():
        for ids in documents:
            chosen = _routing(model, ids)
            kinds = [token_type(tokenizer.decode([i])) for i in ids]
            for position, kind in enumerate(kinds):
                seen[kind] += 1
                for layer in range(layers):
                    counts[kind][layer, chosen[layer, position]] += 1
    shares = {t: c / c.sum(-1, keepdim=True).clamp_min(1) for t, c in counts.items() if seen[t]}
    return shares, {t: n for t, n in seen.items() if n}


@contextlib.contextmanager
def ablate(model: Qwen2MoeForCausalLM, *, shared: bool = False, routed: bool = False) -> Iterator[None]:
    """Temporarily zero the shared expert's and/or the routed experts' contribution in every MoE block."""
    def zero(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(output)

    hooks = []
    for block in model.sparse_blocks():
        if shared and block.shared_expert is not None:
            hooks.append(block.shared_expert.register_forward_hook(zero))
        if routed:
            hooks.append(block.experts.register_forward_hook(zero))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def document_loss(model: nn.Module, documents: list[list[int]]) -> float:
    from qwen_edu.training.loss import causal_lm_loss, count_targets

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in documents:
            x = torch.tensor([ids])
            total += float(causal_lm_loss(model(x).logits, x, reduction="sum"))
            count += int(count_targets(x))
    return total / count


def _moe_inputs(model: Qwen2MoeForCausalLM, documents: list[list[int]]) -> list[torch.Tensor]:
    """Per MoE layer, the ``[tokens, H]`` inputs its block saw over all ``documents``."""
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, SparseMoeBlock):
            inputs[i] = []
            hooks.append(layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0])))
    with torch.no_grad():
        for ids in documents:
            model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return [torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for xs in inputs.values()]


def shared_expert_report(model: Qwen2MoeForCausalLM, docs: dict[str, list[list[int]]]) -> dict[str, dict[str, Any]]:
    """Per domain: loss of the full model, without the shared expert, without the routed experts; and per
    layer the mean sigmoid gate of the shared expert and the size of its output relative to the routed one."""
    report: dict[str, dict[str, Any]] = {}
    for domain, documents in docs.items():
        entry: dict[str, Any] = {"full": document_loss(model, documents)}
        with ablate(model, shared=True):
            entry["no_shared"] = document_loss(model, documents)
        with ablate(model, routed=True):
            entry["no_routed"] = document_loss(model, documents)
        gates, ratios = [], []
        for block, xs in zip(model.sparse_blocks(), _moe_inputs(model, documents), strict=True):
            with torch.no_grad():
                gate = torch.sigmoid(block.shared_expert_gate(xs))  # type: ignore[misc]
                shared = block.shared_output(xs)
                _, weights, chosen = block.gate(xs)
                routed = block.experts(xs, chosen, weights)
            gates.append(float(gate.mean()))
            ratios.append(float(shared.norm(dim=-1).mean() / routed.norm(dim=-1).mean()))  # type: ignore[union-attr]
        entry["gate_mean"], entry["shared_to_routed_norm"] = gates, ratios
        report[domain] = entry
    return report


# ---------------------------------------------------------------------------------------------------
# The shipped runs
# ---------------------------------------------------------------------------------------------------
def runs_path() -> Path:
    """The shipped log of the full runs (``qwen_edu/assets/moe_runs/runs.json``)."""
    path = Path(str(files("qwen_edu") / "assets" / "moe_runs" / "runs.json"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build it with `python -m qwen_edu.moe_experiment "
                                "--out qwen_edu/assets/moe_runs`")
    return path


def load_runs(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or runs_path(), encoding="utf-8") as fh:
        return json.load(fh)


def _tensors_to_lists(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [[round(float(v), 5) for v in row] for row in value] if value.dim() == 2 else value.tolist()
    if isinstance(value, dict):
        return {k: _tensors_to_lists(v) for k, v in value.items()}
    return value


def run_experiment(out: str | Path, cfg: ExperimentConfig = EXPERIMENT, names: Sequence[str] = RUN_NAMES) -> dict:
    """Train every run from the base model and write ``runs.json`` (and a README) into ``out``."""
    import qwen_edu
    from qwen_edu.training import base_model_path

    torch.manual_seed(cfg.seed)
    base_dir = base_model_path()
    tokenizer = qwen_edu.load_tokenizer(base_dir)
    base = qwen_edu.load_model(base_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    train, val = experiment_data(tokenizer, cfg)
    data_seconds = time.perf_counter() - t0
    models = build_models(base, cfg, names, seed=cfg.seed)
    docs = domain_documents(tokenizer)
    at_start: dict[str, Any] = {}
    if "moe" in models:  # routing of the freshly upcycled model, to compare the trained one with
        fresh = models["moe"]
        assert isinstance(fresh, Qwen2MoeForCausalLM)
        at_start = {"routing_by_domain": _tensors_to_lists(routing_by_domain(fresh, docs)),
                    "routing_by_token_type": _tensors_to_lists(routing_by_token_type(fresh, tokenizer, docs)[0])}
    result: dict[str, Any] = {"config": asdict(cfg), "runs": {}, "data_seconds": data_seconds,
                              "train_rows": len(train), "val_rows": len(val),
                              "base_val_loss": evaluate(base, val, cfg.eval_rows)}
    for name, model in models.items():
        aux = cfg.aux_coef if name == "moe" else 0.0
        result["runs"][name] = train_run(model, train, val, cfg, aux_coef=aux, progress=name)
    vocab = base.config.vocab_size  # type: ignore[union-attr]
    result["scratch"] = {"config": asdict(SCRATCH), "runs": {}}
    result["scratch"]["analysis"] = {}
    for name in SCRATCH_RUNS:
        model = scratch_moe(vocab, SCRATCH, seed=cfg.seed)
        aux = SCRATCH.aux_coef if name == "scratch-aux" else 0.0
        result["scratch"]["runs"][name] = train_run(model, train, val, SCRATCH, aux_coef=aux, progress=name)
        by_type, _ = routing_by_token_type(model, tokenizer, docs)
        result["scratch"]["analysis"][name] = {
            "routing_by_domain": _tensors_to_lists(routing_by_domain(model, docs)),
            "routing_by_token_type": _tensors_to_lists(by_type)}
    if "moe" in models:
        moe = models["moe"]
        assert isinstance(moe, Qwen2MoeForCausalLM)
        by_type, seen = routing_by_token_type(moe, tokenizer, docs)
        result["analysis"] = {
            "at_start": at_start,
            "routing_by_domain": _tensors_to_lists(routing_by_domain(moe, docs)),
            "routing_by_token_type": _tensors_to_lists(by_type),
            "token_type_counts": seen,
            "shared_expert": shared_expert_report(moe, docs),
            "documents_per_domain": len(docs["stories"]),
        }
    result["machine"] = f"{platform.machine()} torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.json", "w", encoding="utf-8") as fh:
        json.dump(result, fh, separators=(",", ":"))
    (out / "README.md").write_text(_readme(result), encoding="utf-8")
    return result


def _readme(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = ["# Chapter 8: the upcycling runs", "",
             "Logs of the four continued-training runs and the two from-scratch runs of "
             "`qwen_edu.moe_experiment` (chapter 8 plots them), rebuilt by:",
             "", "```bash", "python -m qwen_edu.moe_experiment --out qwen_edu/assets/moe_runs", "```", "",
             f"Settings (the book's choices): {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens, "
             f"AdamW lr {cfg['lr']} (warm-up {cfg['warmup_steps']}, cosine to {cfg['min_lr']}), fp32, seed "
             f"{cfg['seed']}; MoE: {cfg['num_experts']} routed experts of {cfg['moe_intermediate_size']}, top-"
             f"{cfg['num_experts_per_tok']}, shared expert = the base FFN, aux-loss coefficient {cfg['aux_coef']}.",
             "", f"Base model validation loss: {result['base_val_loss']:.4f}", "",
             "| run | total params | activated params | final val loss | train seconds |", "|---|---:|---:|---:|---:|"]
    for name, run in result["runs"].items():
        lines.append(f"| {name} | {run['total_params']:,} | {run['activated_params']:,} | {run['val'][-1][1]:.4f} "
                     f"| {run['seconds']:.0f} |")
    lines += ["", "From scratch (a 2-layer MoE, 16 experts of 64, top-2, no shared expert; "
              f"{result['scratch']['config']['steps']} steps at lr {result['scratch']['config']['lr']}):", "",
              "| run | final val loss | train seconds |", "|---|---:|---:|"]
    for name, run in result["scratch"]["runs"].items():
        lines.append(f"| {name} | {run['val'][-1][1]:.4f} | {run['seconds']:.0f} |")
    lines += ["", f"Machine: {result['machine']} (a 2-core CPU shared with other jobs; times are inflated).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the chapter-8 MoE runs log.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=EXPERIMENT.steps)
    parser.add_argument("--runs", nargs="+", default=list(RUN_NAMES), choices=RUN_NAMES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig(steps=args.steps)
    result = run_experiment(args.out, cfg, args.runs)
    for name, run in result["runs"].items():
        print(f"{name:<16} val {run['val'][0][1]:.4f} -> {run['val'][-1][1]:.4f} in {run['seconds']:.0f}s")


if __name__ == "__main__":
    main()
