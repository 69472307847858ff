"""The training loop: accumulate, clip, step, schedule, evaluate, checkpoint -- and resume exactly.

One optimizer step of :class:`Trainer`:

1. fetch this rank's ``accumulation_steps`` micro-batches (a pure function of the step, see
   :class:`~qwen_edu.training.data.StepBatchSampler`) and count the targets of the whole global
   batch (summed over ranks);
2. for each micro-batch: forward under autocast, *summed* next-token loss, backward of
   ``loss_sum * world_size / global_targets`` (DDP and FSDP average over ranks, hence the
   ``world_size``); DDP skips its gradient all-reduce until the last micro-batch;
3. unscale (fp16 only), clip the global gradient norm, ``AdamW.step``, ``scheduler.step``.

Because every micro-batch is weighted by its share of the step's targets, accumulating 4
micro-batches of 8 gives the same gradient as one batch of 32 -- also when the micro-batches hold
different numbers of targets (padding), where averaging per-micro-batch means would be wrong.

MoE models can add the load-balancing loss (``TrainConfig.load_balancing``): per micro-batch, or
with the expert counts of the whole global batch (:mod:`qwen_edu.training.load_balancing`).

A checkpoint holds the model, optimizer, scheduler, gradient scaler, step, RNG states and the
training config. The data position is the step itself, so a resumed run continues with exactly
the batches, learning rates and random numbers the uninterrupted run would have used, and gives
bit-identical losses (on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qwen_edu.training.data import PackedDataset, StepBatchSampler, _identity, check_batch_geometry
from qwen_edu.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, wrap_model
from qwen_edu.training.load_balancing import BALANCING_MODES, LoadBalancer
from qwen_edu.training.loss import causal_lm_loss, count_targets
from qwen_edu.training.optim import make_optimizer, make_scheduler

__all__ = ["TrainConfig", "Trainer", "ResumeError", "init_weights", "resolve_precision", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "trainer_state.pt"
# Config fields that decide which rows a step sees; a resume that changes them is not a resume.
_DATA_ORDER_FIELDS = ("seq_len", "batch_size", "seed")


class ResumeError(ValueError):
    """A training checkpoint that does not fit this model, optimizer or run."""


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in every checkpoint).

    ``batch_size`` is the *global* number of sequences per optimizer step; it must be a multiple of
    ``micro_batch_size * world_size``, and the quotient is the number of accumulation steps.
    ``load_balancing`` (MoE models) is one of :data:`~qwen_edu.training.load_balancing.BALANCING_MODES`;
    ``aux_loss_coef=None`` takes the model config's ``router_aux_loss_coef``.
    """

    max_steps: int = 1000
    batch_size: int = 32
    micro_batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    precision: str = "auto"  # "auto", "fp32", "bf16", "fp16"
    attn_implementation: str | None = None  # "sdpa" / "eager"; None keeps the model's setting
    parallel: str = "none"  # "none", "ddp", "fsdp"
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int | None = None  # micro-batches per rank; None = the whole validation set
    save_every: int = 0  # steps; 0 = only at the end (if out_dir is set)
    out_dir: str | None = None
    seed: int = 0
    num_threads: int | None = None  # torch.set_num_threads on CPU
    progress: bool = True
    num_workers: int = 0
    load_balancing: str = "none"  # "none", "micro_batch", "global_batch", "global_batch_exact"
    aux_loss_coef: float | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be between 0 and max_steps={self.max_steps}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto/fp32/bf16/fp16, got {self.precision!r}")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be none/ddp/fsdp, got {self.parallel!r}")
        if self.load_balancing not in BALANCING_MODES:
            raise ValueError(f"load_balancing must be one of {BALANCING_MODES}, got {self.load_balancing!r}")
        check_batch_geometry(self.batch_size, self.micro_batch_size, 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> bf16 on GPUs that have it, fp16 (+ GradScaler) on older GPUs (e.g. a T4), else fp32.

    On a CPU "auto" means fp32: bf16 autocast is faster only on CPUs with bf16 matrix units
    (AMX / AVX512-BF16); ask for ``"bf16"`` explicitly there (the base model recipe does: about
    1.3x faster than fp32 on the machine that trained it). In every mode the weights, gradients
    and optimizer state stay fp32; autocast only lowers the precision of the matmuls.
    """
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            warnings.warn("fp16 + GradScaler is meant for GPUs without bf16 (e.g. a T4); on this device it "
                          "runs, slowly -- prefer bf16 or fp32", stacklevel=3)
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, seed: int | None = None) -> nn.Module:
    """Hugging Face's Qwen2 initialisation: ``N(0, std)`` for linear and embedding weights (and MoE expert
    and router matrices), zero biases, RMSNorm gains at 1. (PyTorch's own defaults -- uniform Kaiming,
    ``N(0, 1)`` embeddings -- give a much larger initial loss for a language model.)"""
    if seed is not None:
        torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.fill_(1.0)
        elif type(module).__name__ in ("Experts", "TopKRouter"):  # MoE: fused expert matrices, the router
            for param in module.parameters(recurse=False):
                param.normal_(0.0, std)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _param_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(_full_shape(p)) for name, p in _unwrap(model).named_parameters()}


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.shape  # DTensor.shape is the global shape


@dataclass
class StepRecord:
    step: int  # 1-based: the number of optimizer steps done
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # targets seen so far (global)
    tokens_per_s: float
    val_loss: float | None = None
    aux_loss: float | None = None  # mean load-balancing loss of the step's micro-batches (MoE runs)


@dataclass
class TrainResult:
    history: list[StepRecord] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.history]

    @property
    def final_val_loss(self) -> float | None:
        return self.val_history[-1][1] if self.val_history else None


class Trainer:
    """Pre-train (or continue training) a causal LM whose ``forward(input_ids)`` returns ``.logits``.

    Args:
        model: any such ``nn.Module`` -- qwen_edu's ``Qwen2ForCausalLM`` or transformers' one.
        config: a :class:`TrainConfig`.
        train_data / val_data: :class:`PackedDataset` (val may be ``None``).
        on_step: ``on_step(step, loss, lr)`` after every optimizer step (e.g. a live loss plot).
        on_eval: ``on_eval(step, val_loss)`` after every evaluation.
        dist_info: from :func:`init_distributed`; by default it is read from the environment.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: PackedDataset,
                 val_data: PackedDataset | None = None, *,
                 on_step: Callable[[int, float, float], None] | None = None,
                 on_eval: Callable[[int, float], None] | None = None,
                 dist_info: DistInfo | None = None, device: str | torch.device | None = None) -> None:
        self.config = config
        self.info = dist_info or init_distributed(device)
        self.device = self.info.device
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        if config.parallel == "none" and self.info.world_size > 1:
            raise ValueError(f"running on {self.info.world_size} processes needs parallel='ddp' or 'fsdp'")
        self.accumulation_steps = check_batch_geometry(config.batch_size, config.micro_batch_size,
                                                       self.info.world_size)
        if train_data.seq_len != config.seq_len:
            raise ValueError(f"the training rows are {train_data.seq_len} tokens long but config.seq_len="
                             f"{config.seq_len}")
        self.precision = resolve_precision(config.precision, self.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.train_data, self.val_data = train_data, val_data
        self.on_step, self.on_eval = on_step, on_eval

        if config.attn_implementation is not None:
            setter = getattr(model, "set_attn_implementation", None)
            if setter is None:
                raise ValueError(f"{type(model).__name__} has no set_attn_implementation(); cannot switch to "
                                 f"{config.attn_implementation!r}")
            setter(config.attn_implementation)
        self.raw_model = model.to(self.device)
        self.model = wrap_model(self.raw_model, config.parallel, self.info)
        self.optimizer = make_optimizer(self.raw_model, config.lr, config.weight_decay, config.betas, config.eps,
                                        decay_embeddings=config.decay_embeddings)
        self.scheduler = make_scheduler(self.optimizer, warmup_steps=config.warmup_steps,
                                        total_steps=config.max_steps, min_lr_ratio=config.min_lr / config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.balancer, self.aux_loss_coef = self._make_balancer(config)
        self.last_aux_loss: float | None = None
        self.step = 0
        self.tokens_seen = 0
        self.result = TrainResult()

    def _make_balancer(self, config: TrainConfig) -> tuple[LoadBalancer | None, float]:
        if config.load_balancing == "none":
            return None, 0.0
        model_config = getattr(self.raw_model, "config", None)
        top_k = getattr(model_config, "num_experts_per_tok", None)
        if top_k is None or not callable(getattr(self.raw_model, "sparse_blocks", None)):
            raise ValueError(f"load_balancing={config.load_balancing!r} needs an MoE model (router logits); "
                             f"{type(self.raw_model).__name__} has none")
        coef = config.aux_loss_coef
        if coef is None:
            coef = float(getattr(model_config, "router_aux_loss_coef", 0.001))
        return LoadBalancer(config.load_balancing, top_k), coef

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(summed loss, number of targets)`` of one micro-batch."""
        loss_sum, targets, _ = self._forward(batch)
        return loss_sum, targets

    def _forward(self, batch: dict[str, torch.Tensor], router: bool = False, model: nn.Module | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """``(summed loss, targets, router logits per MoE layer or None)`` of one micro-batch."""
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        kwargs = {"output_router_logits": True} if router else {}
        with self._autocast():
            out = (model or self.model)(input_ids=input_ids, **kwargs)
        return causal_lm_loss(out.logits, labels, reduction="sum"), count_targets(labels), \
            getattr(out, "router_logits", None)

    @torch.no_grad()
    def _count_experts(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's expert counts over all micro-batches and ranks: a gradient-free pass (exact mode)."""
        assert self.balancer is not None
        counts = rows = None
        for batch in micro_batches:
            _, _, router_logits = self._forward(batch, router=True, model=self.raw_model)
            assert router_logits is not None
            c, r = self.balancer.count(router_logits)
            counts, rows = (c, r) if counts is None else (counts + c, rows + r)
        assert counts is not None and rows is not None
        return counts, rows

    def _sampler(self, start_step: int) -> StepBatchSampler:
        return StepBatchSampler(len(self.train_data), self.config.batch_size, self.config.micro_batch_size,
                                seed=self.config.seed, rank=self.info.rank, world_size=self.info.world_size,
                                start_step=start_step)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches; returns ``(global mean loss, grad norm)``."""
        self.model.train()
        local_targets = sum(count_targets(b["labels"]) for b in micro_batches)
        # (on self.device: NCCL reduces only GPU tensors)
        global_targets = all_reduce_sum(torch.as_tensor(local_targets, dtype=torch.float64, device=self.device)).item()
        if global_targets == 0:
            raise ValueError(f"step {self.step}: the global batch has no targets (all labels are -100)")
        scale = self.info.world_size / global_targets
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_total = torch.zeros((), dtype=torch.float64, device=self.device)
        is_ddp = self.config.parallel == "ddp"
        balancer = self.balancer
        if balancer is not None:
            balancer.begin_step(*(self._count_experts(micro_batches) if balancer.mode == "global_batch_exact"
                                  else (None, None)))
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or not is_ddp) else self.model.no_sync()
            with sync:
                loss_sum, _, router_logits = self._forward(batch, router=balancer is not None)
                objective = loss_sum * scale
                if balancer is not None:
                    assert router_logits is not None
                    aux = balancer.loss(router_logits)
                    objective = objective + aux * (self.aux_loss_coef / len(micro_batches))
                    aux_total += aux.detach().double()
                self.scaler.scale(objective).backward()
            loss_total += loss_sum.detach().double()
        if balancer is not None:
            micro_total = len(micro_batches) * self.info.world_size
            self.last_aux_loss = all_reduce_sum(aux_total).item() / micro_total
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(global_targets)
        loss = all_reduce_sum(loss_total).item() / global_targets
        return loss, grad_norm

    def _clip_gradients(self) -> float:
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: PackedDataset | None = None, max_batches: int | None = None) -> float:
        """Mean next-token loss over ``data`` (default: the validation set), weighted by targets.

        Rows are dealt out to ranks round-robin; every rank runs the same number of forward passes
        (FSDP's all-gathers need that), an exhausted rank re-runs a row with weight zero.
        """
        data = data if data is not None else self.val_data
        if data is None:
            raise ValueError("no validation data")
        max_batches = max_batches if max_batches is not None else self.config.eval_batches
        was_training = self.model.training
        self.model.eval()
        mb, world, rank = self.config.micro_batch_size, self.info.world_size, self.info.rank
        rows = list(range(rank, len(data), world))
        n_batches = math.ceil(math.ceil(len(data) / world) / mb)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in range(n_batches):
            idx = rows[b * mb:(b + 1) * mb]
            batch = data.__getitems__(idx or [0])
            loss_sum, n = self.forward_loss(batch)
            if idx:
                total += loss_sum.double()
                count += n.to(self.device, torch.float64)
        total, count = all_reduce_sum(total), all_reduce_sum(count)
        self.model.train(was_training)
        return (total / count).item() if count.item() else float("nan")

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, resume_from: str | os.PathLike | None = None, *, stop_at: int | None = None) -> TrainResult:
        """Run until ``config.max_steps`` (continuing from ``resume_from``, a checkpoint file or folder).

        ``stop_at=k`` pauses after optimizer step ``k`` without changing the schedule (the run can be
        continued by calling ``train()`` again, or saved and resumed elsewhere).
        """
        cfg = self.config
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=self._sampler(self.step),
                                             collate_fn=_identity, num_workers=cfg.num_workers)
        batches = iter(loader)
        bar = None
        if cfg.progress and self.info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True)
        start = time.perf_counter()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(self.accumulation_steps)]
                lr = self.optimizer.param_groups[0]["lr"]
                tokens_before = self.tokens_seen
                loss, grad_norm = self.train_step(micro)
                tps = (self.tokens_seen - tokens_before) / max(time.perf_counter() - t0, 1e-9)
                record = StepRecord(self.step, loss, lr, grad_norm, self.tokens_seen, tps,
                                    aux_loss=self.last_aux_loss)
                self.result.history.append(record)
                if self.on_step is not None and self.info.is_main:
                    self.on_step(self.step, loss, lr)
                done = self.step == cfg.max_steps
                if self.val_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or done):
                    record.val_loss = self.evaluate()
                    self.result.val_history.append((self.step, record.val_loss))
                    if self.on_eval is not None and self.info.is_main:
                        self.on_eval(self.step, record.val_loss)
                if bar is not None:
                    post = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
                    if self.last_aux_loss is not None:
                        post["aux"] = f"{self.last_aux_loss:.3f}"
                    if self.result.val_history:
                        post["val"] = f"{self.result.val_history[-1][1]:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if cfg.out_dir and ((cfg.save_every and self.step % cfg.save_every == 0) or done):
                    self.save_checkpoint(cfg.out_dir)
        finally:
            if bar is not None:
                bar.close()
        self.result.seconds += time.perf_counter() - start
        return self.result

    # ---- checkpoints ---------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.raw_model, self.optimizer, options=opts)
        model_sd = {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
        return model_sd, self.optimizer.state_dict()

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (collective under FSDP: call on all ranks)."""
        model_sd, optim_sd = self._state_dicts()
        rng = {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": "fsdp" if self.config.parallel == "fsdp" else "plain",
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "train_config": self.config.to_dict(),
            "param_fingerprint": _param_fingerprint(self.raw_model),
            "world_size": self.info.world_size,
            "val_history": list(self.result.val_history),
        }

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write ``trainer_state.pt`` into folder ``path`` (rank 0 writes; all ranks must call)."""
        path = Path(path)
        file = path / CHECKPOINT_NAME if path.suffix != ".pt" else path
        state = self.checkpoint_state()
        if self.info.is_main:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, file)
        barrier()
        return file

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a :meth:`save_checkpoint` file; raise :class:`ResumeError` if it does not fit."""
        path = Path(path)
        file = path / CHECKPOINT_NAME if path.is_dir() else path
        if not file.is_file():
            raise ResumeError(f"no training checkpoint at {file}")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ResumeError(f"{file} is not a readable training checkpoint: {exc}") from exc
        if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
            raise ResumeError(f"{file} is not a training checkpoint (no model/optimizer state)")
        self._check_compatible(state, file)

        if state["format"] == "fsdp" or self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            if state["format"] != self.config.parallel and self.config.parallel == "fsdp":
                raise ResumeError(f"{file} was written by a non-FSDP run; resume it with parallel='none' or 'ddp'")
            if state["format"] == "fsdp" and self.config.parallel != "fsdp":
                raise ResumeError(f"{file} was written by an FSDP run; resume it with parallel='fsdp'")
            set_state_dict(self.raw_model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.raw_model.load_state_dict(state["model"])
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ResumeError(f"{file}: the optimizer state does not fit this optimizer: {exc}") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        py = rng["python"]
        random.setstate((py[-2], tuple(py[:-2]), py[-1]))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"]))
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.result.val_history = [tuple(v) for v in state.get("val_history", [])]

    def _check_compatible(self, state: dict[str, Any], file: Path) -> None:
        saved = state.get("param_fingerprint", {})
        current = _param_fingerprint(self.raw_model)
        if saved != current:
            missing = [k for k in current if k not in saved]
            extra = [k for k in saved if k not in current]
            shapes = [f"{k}: checkpoint {saved[k]} vs model {current[k]}"
                      for k in current if k in saved and saved[k] != current[k]]
            parts = []
            if missing:
                parts.append(f"parameters missing from the checkpoint: {missing[:6]}")
            if extra:
                parts.append(f"parameters the model does not have: {extra[:6]}")
            if shapes:
                parts.append(f"shape mismatches: {shapes[:6]}")
            raise ResumeError(f"{file} was saved from a different model:\n  " + "\n  ".join(parts))
        if state["format"] == "plain" and self.config.parallel != "fsdp":
            saved_groups = [g.get("names") for g in state["optimizer"].get("param_groups", [])]
            current_groups = [g.get("names") for g in self.optimizer.param_groups]
            if saved_groups != current_groups:
                sizes_s = [len(g or []) for g in saved_groups]
                sizes_c = [len(g or []) for g in current_groups]
                raise ResumeError(
                    f"{file}: the optimizer was built differently (parameter groups of sizes {sizes_s} in the "
                    f"checkpoint, {sizes_c} now; did weight_decay / decay_embeddings change?)")
            ours = {id(p): p for g in self.optimizer.param_groups for p in g["params"]}
            flat = [p for g in self.optimizer.param_groups for p in g["params"]]
            for idx, st in state["optimizer"].get("state", {}).items():
                p = flat[int(idx)] if int(idx) < len(flat) else None
                exp_avg = st.get("exp_avg") if isinstance(st, dict) else None
                if p is None or id(p) not in ours or (exp_avg is not None and exp_avg.shape != p.shape):
                    raise ResumeError(f"{file}: optimizer state {idx} does not match the model's parameters")
        saved_cfg = state.get("train_config", {})
        for name in _DATA_ORDER_FIELDS:
            if name in saved_cfg and saved_cfg[name] != getattr(self.config, name):
                raise ResumeError(
                    f"{file}: config.{name}={getattr(self.config, name)!r} but the checkpoint was trained with "
                    f"{saved_cfg[name]!r}; an exact resume needs the same data order")
        changed = [k for k, v in saved_cfg.items()
                   if k not in _DATA_ORDER_FIELDS + ("progress", "out_dir", "save_every", "eval_every",
                                                     "num_workers", "num_threads", "parallel")
                   and getattr(self.config, k, v) != (tuple(v) if isinstance(v, list) else v)]
        if changed:
            warnings.warn(f"resuming {file} with changed settings {changed}: the run will not match an "
                          "uninterrupted one", stacklevel=3)
        if state.get("step", 0) > self.config.max_steps:
            raise ResumeError(f"{file} is at step {state['step']}, beyond max_steps={self.config.max_steps}")

