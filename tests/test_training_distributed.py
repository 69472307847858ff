"""DDP and FSDP2 on 2 CPU processes (gloo) train like 1 process with the same global batch.

Each case launches ``torchrun --standalone --nproc_per_node 2 -m qwen_edu.training.equivalence``
(6 optimizer steps of a tiny model, global batch 8 = 2 ranks x 2 micro-batches x 2 sequences) and
compares with the same run in one process (4 micro-batches of 2). The processes sum in a different
order, so the tolerance is float32 rounding: 1e-5 relative on every loss, grad norm and the weights'
checksum (observed differences are ~1e-7). The ``resume`` cases stop after 3 steps, write a full
(gathered) checkpoint, and finish in a fresh, differently initialised model -- the distributed
checkpoint must restore it exactly enough to land on the same losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qwen_edu.training.equivalence import run_equivalence

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_process() -> dict:
    before = torch.get_num_threads()
    try:
        return run_equivalence("none")
    finally:
        torch.set_num_threads(before)


def _torchrun(parallel: str, out: str, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qwen_edu.training.equivalence", "--parallel", parallel, "--out", out, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.parametrize("parallel,resume", [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)])
def test_two_processes_match_one(parallel, resume, single_process, tmp_path):
    extra = ("--resume-at", "3", "--work-dir", str(tmp_path / "ckpt")) if resume else ()
    multi = _torchrun(parallel, str(tmp_path / "out.json"), *extra)
    assert multi["world_size"] == 2 and multi["parallel"] == parallel
    assert len(multi["losses"]) == len(single_process["losses"]) == 6
    assert multi["losses"] == pytest.approx(single_process["losses"], rel=1e-5)
    assert multi["grad_norms"] == pytest.approx(single_process["grad_norms"], rel=1e-5)
    assert multi["val_loss"] == pytest.approx(single_process["val_loss"], rel=1e-5)
    assert multi["weight_abs_sum"] == pytest.approx(single_process["weight_abs_sum"], rel=1e-5)
    assert single_process["losses"][0] != single_process["losses"][-1]  # it did train
