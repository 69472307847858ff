"""Chapter 11's two training experiments: QK-norm and attention logits, micro- vs global-batch balancing.

**QK-norm** (:func:`qk_norm_run`). A small Qwen3 is trained on the book's corpus at a learning rate ten
times the base model's, once with QK-norm and once without (otherwise identical: same init, data
and order). Every few steps :func:`~qwen_edu.models.qwen3.attention_logit_stats` records the largest
attention logit per layer. Without the norm nothing bounds ``|q|`` and ``|k|``, so the logits can
grow with the weights until the softmax saturates; with it, ``|q| = |k| = sqrt(d)`` up to the learnt
per-feature gains.

**Load balancing** (:func:`balance_run`). A small Qwen3-MoE (16 experts, top-2, no shared expert) is
trained from scratch on *domain-pure* rows of the book's corpus -- stories, Python functions and
arithmetic lines, one third each -- with a micro-batch of one row and gradient accumulation over 8
(the book's stand-in for the few sequences a large model's micro-batch holds). ``"micro_batch"``
balancing then asks every single row, i.e. every domain on its own, to use all experts evenly;
``"global_batch"`` asks it of the 8-row global batch. The runs report validation loss per domain and
how the experts specialise: the routing share of each expert per domain
(:func:`routing_by_domain`) and the mutual information between a token's domain and its experts
(:func:`domain_expert_information`, 0 bits = routing ignores the domain, log2(3) = 1.58 bits =
every domain has experts of its own).

The sizes, learning rates, coefficients and step counts are the book's choices for a 2-core CPU,
not Qwen's. The notebook runs short versions live; the full runs ship as a JSON log built by::

    python -m qwen_edu.training.qwen3_experiments --out qwen_edu/assets/qwen3_runs
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from qwen_edu.corpus import build_corpus, generate_arithmetic, generate_code, generate_stories
from qwen_edu.models.moe import SparseMoeBlock
from qwen_edu.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, attention_logit_stats
from qwen_edu.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from qwen_edu.training.data import PackedDataset, PackedSequences, pack_sequences, tokenize_documents
from qwen_edu.training.trainer import TrainConfig, Trainer, init_weights

__all__ = ["DOMAINS", "QKNormConfig", "BalanceConfig", "book_tokenizer", "corpus_rows", "qk_norm_run",
           "domain_rows", "balance_model", "routing_by_domain", "domain_expert_information", "balance_run",
           "runs_path", "load_runs", "run_experiments"]

DOMAINS = ("stories", "code", "arithmetic")


def book_tokenizer() -> Any:
    """The base model's byte-level BPE tokenizer (1,477 tokens), from ``qwen_edu/assets/base_model``."""
    from qwen_edu.tokenizer import load_tokenizer
    from qwen_edu.training.presets import base_model_path

    return load_tokenizer(base_model_path())


# ---------------------------------------------------------------------------------------------------
# QK-norm and the growth of attention logits
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QKNormConfig:
    """The book's choices: a 4-layer, 128-wide Qwen3 with 4 heads of 32, trained at lr 3e-2 (the base
    model used 3e-3) without weight decay, so that nothing but the norm holds the logits back."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    head_dim: int = 32
    steps: int = 60
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-2
    warmup_steps: int = 5
    log_every: int = 5
    n_docs: int = 1500
    seed: int = 0


def corpus_rows(tokenizer: Any, n_docs: int, seq_len: int, seed: int = 0) -> PackedDataset:
    """``n_docs`` documents of the base model's corpus mixture, packed into rows of ``seq_len``."""
    docs = build_corpus(n_docs, seed=seed)
    return PackedDataset(pack_sequences(tokenize_documents(tokenizer, docs), seq_len, tokenizer.eos_id,
                                        drop_last=True))


def _vocab_rows(tokenizer: Any) -> int:
    return math.ceil(tokenizer.vocab_size / 64) * 64


def qk_norm_run(qk_norm: bool, config: QKNormConfig = QKNormConfig(), *, data: PackedDataset | None = None,
                tokenizer: Any = None, progress: bool = False) -> dict[str, Any]:
    """Train the small Qwen3 with or without QK-norm; return the loss per step and, every
    ``log_every`` steps, the largest attention logit of each layer on a fixed probe row."""
    tokenizer = tokenizer or book_tokenizer()
    data = data or corpus_rows(tokenizer, config.n_docs, config.seq_len, config.seed)
    torch.manual_seed(config.seed)
    model_config = Qwen3Config(vocab_size=_vocab_rows(tokenizer), hidden_size=config.hidden_size,
                               intermediate_size=3 * config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                               num_attention_heads=config.num_attention_heads, num_key_value_heads=2,
                               head_dim=config.head_dim, max_position_embeddings=config.seq_len,
                               tie_word_embeddings=True, qk_norm=qk_norm)
    model = init_weights(Qwen3ForCausalLM(model_config), seed=config.seed)
    train = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, micro_batch_size=config.batch_size,
                        seq_len=config.seq_len, lr=config.lr, min_lr=config.lr,
                        warmup_steps=min(config.warmup_steps, config.steps), weight_decay=0.0, grad_clip=None, precision="fp32", eval_every=0, progress=progress,
                        seed=config.seed)
    probe = data[0]["input_ids"][None]
    logits: list[tuple[int, list[float]]] = [(0, [s["max_logit"] for s in attention_logit_stats(model, probe)])]

    def record(step: int, loss: float, lr: float) -> None:
        if step % config.log_every == 0:
            model.eval()
            logits.append((step, [s["max_logit"] for s in attention_logit_stats(model, probe)]))
            model.train()

    result = Trainer(model, train, data, on_step=record, device="cpu").train()
    return {"qk_norm": qk_norm, "losses": result.losses, "logit_steps": [s for s, _ in logits],
            "max_logits": [v for _, v in logits], "grad_norms": [r.grad_norm for r in result.history]}


# ---------------------------------------------------------------------------------------------------
# Micro-batch vs global-batch load balancing
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BalanceConfig:
    """The book's choices for the balancing experiment (see the module docstring)."""

    hidden_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    head_dim: int = 32
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    steps: int = 300
    batch_size: int = 8
    micro_batch_size: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    aux_loss_coef: float = 0.1
    train_rows_per_domain: int = 400
    val_rows_per_domain: int = 16
    eval_every: int = 50
    seed: int = 0


def _domain_documents(domain: str, n: int, seed: int) -> list[str]:
    if domain == "stories":
        return generate_stories(n, seed=seed)
    if domain == "code":
        return generate_code(n, seed=seed)
    if domain == "arithmetic":
        return generate_arithmetic(n, seed=seed)
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def domain_rows(tokenizer: Any, rows: int, seq_len: int, seed: int = 0) -> dict[str, PackedSequences]:
    """``rows`` packed rows of ``seq_len`` tokens per domain, each row from one domain only."""
    out = {}
    for i, domain in enumerate(DOMAINS):
        docs: list[list[int]] = []
        tokens, n = 0, 64
        while tokens < rows * (seq_len + 1):  # generate until there is enough text for the rows
            docs = tokenize_documents(tokenizer, _domain_documents(domain, n, seed=1000 * seed + i))
            tokens, n = sum(len(d) + 1 for d in docs), 2 * n
        packed = pack_sequences(docs, seq_len, tokenizer.eos_id, drop_last=True)
        out[domain] = PackedSequences(packed.input_ids[:rows], packed.labels[:rows])
    return out


def _mixed(parts: dict[str, PackedSequences]) -> PackedDataset:
    return PackedDataset(PackedSequences(torch.cat([p.input_ids for p in parts.values()]),
                                         torch.cat([p.labels for p in parts.values()])))


def balance_model(config: BalanceConfig, vocab_size: int) -> Qwen3MoeForCausalLM:
    """The small Qwen3-MoE of the experiment, freshly initialised (seeded)."""
    model_config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=config.hidden_size,
                                  intermediate_size=4 * config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                                  num_attention_heads=config.num_attention_heads, num_key_value_heads=2,
                                  head_dim=config.head_dim, num_experts=config.num_experts,
                                  num_experts_per_tok=config.num_experts_per_tok,
                                  moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=True,
                                  max_position_embeddings=config.seq_len, tie_word_embeddings=True)
    return init_weights(Qwen3MoeForCausalLM(model_config), seed=config.seed)


@torch.no_grad()
def routing_by_domain(model: Qwen3MoeForCausalLM, rows: dict[str, PackedSequences]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each domain's tokens go, on the given rows (one forward pass per domain):

    * ``shares [layers, domains, experts]``: the share of the domain's (token, slot) assignments that
      each expert receives (each domain's shares sum to 1);
    * ``row_max_load [layers]``: per sequence, the busiest expert's load over the mean load, averaged
      over the sequences -- 1 when every single sequence spreads evenly over the experts.
    """
    was_training = model.training
    model.eval()
    blocks: list[SparseMoeBlock] = model.sparse_blocks()
    experts = blocks[0].num_experts
    shares = torch.zeros(len(blocks), len(rows), experts)
    row_max = torch.zeros(len(blocks))
    for d, packed in enumerate(rows.values()):
        model(packed.input_ids)
        n_rows = packed.input_ids.shape[0]
        for layer, block in enumerate(blocks):
            assert block.router_logits is not None
            picked = torch.topk(block.router_logits.float(), block.top_k, dim=-1).indices.view(n_rows, -1)
            per_row = torch.zeros(n_rows, experts).scatter_add_(1, picked, torch.ones(picked.shape))
            shares[layer, d] = per_row.sum(0) / picked.numel()
            row_max[layer] += (per_row.max(1).values / per_row.mean(1)).sum() / (n_rows * len(rows))
    model.train(was_training)
    return shares, row_max


def domain_expert_information(shares: torch.Tensor) -> torch.Tensor:
    """Mutual information (bits) between a token's domain and the expert it is routed to, per layer,
    for ``shares [layers, domains, experts]`` with domains equally weighted: ``H(expert) -
    H(expert | domain)``."""
    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log2(p.clamp_min(1e-12))).sum(-1)

    return entropy(shares.mean(dim=1)) - entropy(shares).mean(dim=1)


def _domain_losses(trainer: Trainer, val: dict[str, PackedSequences]) -> dict[str, float]:
    return {domain: trainer.evaluate(PackedDataset(rows)) for domain, rows in val.items()}


def balance_run(mode: str, config: BalanceConfig = BalanceConfig(), *, tokenizer: Any = None,
                data: tuple[dict[str, PackedSequences], dict[str, PackedSequences]] | None = None,
                progress: bool = False, on_step: Callable[[int, float, float], None] | None = None
                ) -> dict[str, Any]:
    """Train the small Qwen3-MoE with load balancing ``mode``; return its history, the validation loss
    per domain, the final routing shares per domain and the domain-expert information."""
    tokenizer = tokenizer or book_tokenizer()
    if data is None:
        data = (domain_rows(tokenizer, config.train_rows_per_domain, config.seq_len, config.seed),
                domain_rows(tokenizer, config.val_rows_per_domain, config.seq_len, config.seed + 1))
    train_rows, val_rows = data
    model = balance_model(config, _vocab_rows(tokenizer))
    train = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
                        seq_len=config.seq_len, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                        weight_decay=0.1, precision="fp32", eval_every=0, progress=progress, seed=config.seed,
                        load_balancing=mode, aux_loss_coef=config.aux_loss_coef, eval_batches=None)
    trainer = Trainer(model, train, _mixed(train_rows), on_step=on_step, device="cpu")
    evals: list[dict[str, Any]] = []
    start = time.perf_counter()
    for stop in range(config.eval_every, config.steps + config.eval_every, config.eval_every):
        trainer.train(stop_at=min(stop, config.steps))
        evals.append({"step": trainer.step, **_domain_losses(trainer, val_rows)})
    shares, row_max = routing_by_domain(model, val_rows)
    return {"mode": mode, "losses": trainer.result.losses, "aux_losses": [r.aux_loss for r in trainer.result.history],
            "evals": evals, "shares": shares.tolist(), "information_bits": domain_expert_information(shares).tolist(),
            "row_max_load": row_max.tolist(), "seconds": time.perf_counter() - start, "model": model}


# ---------------------------------------------------------------------------------------------------
# The shipped runs
# ---------------------------------------------------------------------------------------------------
def runs_path() -> Path:
    """The shipped log of the full runs (``qwen_edu/assets/qwen3_runs/runs.json``)."""
    return Path(str(files("qwen_edu") / "assets" / "qwen3_runs" / "runs.json"))


def load_runs(path: str | Path | None = None) -> dict[str, Any]:
    """The shipped runs (or those at ``path``); raises ``FileNotFoundError`` with the command to build them."""
    path = Path(path) if path is not None else runs_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build it with "
                                "`python -m qwen_edu.training.qwen3_experiments --out qwen_edu/assets/qwen3_runs`")
    return json.loads(path.read_text(encoding="utf-8"))


def _summary(run: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"seed": seed, **run["evals"][-1], "information_bits": run["information_bits"],
            "row_max_load": run["row_max_load"]}


def run_experiments(out: str | Path, balance: BalanceConfig = BalanceConfig(), qk: QKNormConfig = QKNormConfig(),
                    modes: tuple[str, ...] = ("micro_batch", "global_batch", "global_batch_exact"),
                    seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """Run both experiments at full length and write ``runs.json`` into ``out``.

    The balancing runs are repeated for every seed in ``seeds`` (other documents, initial weights and
    data order); the log keeps the first seed's full history and every seed's final numbers."""
    torch.set_num_threads(1)
    tokenizer = book_tokenizer()
    runs: dict[str, Any] = {}
    for seed in seeds:
        config = replace(balance, seed=seed)
        data = (domain_rows(tokenizer, config.train_rows_per_domain, config.seq_len, seed),
                domain_rows(tokenizer, config.val_rows_per_domain, config.seq_len, seed + 1))
        for mode in modes:
            run = balance_run(mode, config, tokenizer=tokenizer, data=data, progress=True)
            run.pop("model")
            summary = _summary(run, seed)
            if mode not in runs:
                runs[mode] = {**run, "seeds": []}
            runs[mode]["seeds"].append(summary)
    qk_data = corpus_rows(tokenizer, qk.n_docs, qk.seq_len, qk.seed)
    qk_runs = {str(flag): qk_norm_run(flag, qk, data=qk_data, tokenizer=tokenizer, progress=True)
               for flag in (True, False)}
    log = {"command": f"python -m qwen_edu.training.qwen3_experiments --out {out}",
           "machine": f"{platform.machine()} torch {torch.__version__}, 1 thread", "domains": list(DOMAINS),
           "balance_config": asdict(balance), "balance": runs, "qk_config": asdict(qk), "qk_norm": qk_runs}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="chapter 11's QK-norm and load-balancing runs")
    p.add_argument("--out", required=True, help="folder for runs.json (the shipped one: qwen_edu/assets/qwen3_runs)")
    p.add_argument("--steps", type=int, default=BalanceConfig.steps, help="balancing run length")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="balancing run seeds")
    args = p.parse_args(argv)
    log = run_experiments(args.out, BalanceConfig(steps=args.steps), seeds=tuple(args.seeds))
    for mode, run in log["balance"].items():
        for s in run["seeds"]:
            print(mode, {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()})


if __name__ == "__main__":
    main()
