"""The load-balancing loss in the trainer: per micro-batch (transformers) and over the global batch (Qwen3).

What each mode must be:

* ``micro_batch`` -- exactly the aux loss the model (and transformers) computes for one forward call;
* ``global_batch`` -- the expert counts ``f`` of the micro-batches seen so far in the step, summed over
  data-parallel ranks, times the micro-batch's own mean probabilities ``P``;
* ``global_batch_exact`` -- ``f`` of the whole step from the first micro-batch, so the objective does
  not depend on how the global batch is cut into micro-batches and ranks.

Distributed runs use 2 CPU processes with gloo under ``torchrun``, as ``test_training_distributed.py``
does. Runs in different processes or split differently sum in different orders, so the tolerance is
float32 rounding: 1e-5 relative on losses, aux losses and the weights' checksum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qwen_edu.models.moe import load_balancing_loss, router_stats
from qwen_edu.training import TrainConfig, Trainer
from qwen_edu.training.balancing_check import run_balancing, tiny_moe
from qwen_edu.training.equivalence import tiny_data, tiny_model
from qwen_edu.training.load_balancing import LoadBalancer


def _logits(rows: int, seed: int, experts: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, experts, generator=gen, requires_grad=True) for _ in range(2)]  # two layers


def test_micro_batch_mode_is_the_models_own_aux_loss():
    model = tiny_moe().train()
    ids = torch.randint(0, 95, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, output_router_logits=True)
    balancer = LoadBalancer("micro_batch", top_k=2)
    balancer.begin_step()
    # Exact on purpose: both go through router_stats on the same logits (one computation, repeated).
    torch.testing.assert_close(balancer.loss(out.router_logits), out.aux_loss, rtol=0, atol=0)


def test_global_batch_accumulates_the_counts_of_the_step_so_far():
    batches = [_logits(5, seed) for seed in range(3)]
    balancer = LoadBalancer("global_batch", top_k=2)
    balancer.begin_step()
    counts = torch.zeros(6)
    rows = 0.0
    for logits in batches:
        stats = router_stats(logits, top_k=2)
        counts, rows = counts + stats.counts, rows + float(stats.rows)
        expected = 6 * torch.sum(counts / rows * stats.mean_prob)  # f: so far; P: this micro-batch
        loss = balancer.loss(logits)
        torch.testing.assert_close(loss, expected)
        loss.backward()  # the gradient flows through P only
        assert all(x.grad is not None for x in logits)
    first = LoadBalancer("global_batch", top_k=2)
    first.begin_step()  # the first micro-batch of a step sees only its own counts: the micro-batch loss
    torch.testing.assert_close(first.loss(batches[0]), load_balancing_loss(batches[0], top_k=2))
    balancer.begin_step()  # a new step forgets the old counts
    torch.testing.assert_close(balancer.loss(batches[2]), load_balancing_loss(batches[2], top_k=2))


def test_exact_mode_uses_the_whole_steps_counts_and_needs_them():
    batches = [_logits(4, seed) for seed in range(2)]
    total = router_stats(batches[0], 2) + router_stats(batches[1], 2)
    balancer = LoadBalancer("global_batch_exact", top_k=2)
    with pytest.raises(ValueError, match="needs the step's counts"):
        balancer.begin_step()
    balancer.begin_step(total.counts, total.rows)
    for logits in batches:
        expected = 6 * torch.sum(total.fraction * router_stats(logits, 2).mean_prob)
        torch.testing.assert_close(balancer.loss(logits), expected)


def _same(a: dict, b: dict) -> None:
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["aux_losses"] == pytest.approx(b["aux_losses"], rel=1e-5)
    assert a["weight_abs_sum"] == pytest.approx(b["weight_abs_sum"], rel=1e-5)


def test_on_one_micro_batch_per_step_the_three_modes_coincide():
    runs = [run_balancing(mode, steps=3, micro_batch_size=8) for mode in
            ("micro_batch", "global_batch", "global_batch_exact")]
    _same(runs[0], runs[1])
    _same(runs[0], runs[2])
    assert runs[0]["aux_losses"][0] >= 2.0  # k = 2: the balanced minimum of E * sum f P


def test_only_the_exact_global_objective_ignores_how_the_batch_is_split():
    exact = [run_balancing("global_batch_exact", steps=3, micro_batch_size=m) for m in (2, 8)]
    _same(*exact)
    micro = [run_balancing("micro_batch", steps=3, micro_batch_size=m) for m in (2, 8)]
    # balancing 2 sequences at a time is a stricter objective than balancing all 8: a larger aux loss
    assert all(small > big for small, big in zip(micro[0]["aux_losses"], micro[1]["aux_losses"], strict=True))
    assert micro[0]["weight_abs_sum"] != pytest.approx(micro[1]["weight_abs_sum"], rel=1e-5)


def test_the_switch_needs_an_moe_model():
    config = TrainConfig(max_steps=1, warmup_steps=0, batch_size=2, micro_batch_size=2, seq_len=16,
                         load_balancing="global_batch", progress=False)
    with pytest.raises(ValueError, match="needs an MoE model"):
        Trainer(tiny_model(), config, tiny_data())
    with pytest.raises(ValueError, match="load_balancing must be one of"):
        TrainConfig(load_balancing="per_token")


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_in_every_mode(tmp_path):
    """2 ranks x 2 micro-batches x 2 sequences. ``micro_batch`` balances the same 2-sequence micro-batches
    as one process with 4 of them; ``global_batch`` all-reduces the counts, so micro-batch ``m`` counts
    like one process's 4-sequence micro-batch ``m``; ``global_batch_exact`` is the one-batch objective."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qwen_edu.training.balancing_check", "--parallel", "ddp", "--micro-batch-size", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = {run["mode"]: run for run in json.loads(out.read_text())}
    assert {run["world_size"] for run in ddp.values()} == {2}
    single = {"micro_batch": 2, "global_batch": 4, "global_batch_exact": 8}
    for mode, micro_batch_size in single.items():
        _same(ddp[mode], run_balancing(mode, micro_batch_size=micro_batch_size))
    # and the three objectives really differ on this split
    assert ddp["micro_batch"]["aux_losses"][0] > ddp["global_batch"]["aux_losses"][0] \
        > ddp["global_batch_exact"]["aux_losses"][0]
