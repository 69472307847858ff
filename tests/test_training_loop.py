"""The training loop's pieces: loss shifting, schedule, weight-decay groups, accumulation, resume, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from qwen_edu.models import Qwen2ForCausalLM, QwenConfig
from qwen_edu.training import (
    IGNORE_INDEX,
    PackedDataset,
    ResumeError,
    TrainConfig,
    Trainer,
    causal_lm_loss,
    init_weights,
    lr_at_step,
    make_scheduler,
    pack_sequences,
    param_groups,
    shift_labels,
)
from qwen_edu.training.equivalence import tiny_data, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=8, micro_batch_size=2, seq_len=16, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                eval_every=0, precision="fp32", progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# ---- loss ---------------------------------------------------------------------------------------
def test_shift_labels_moves_targets_left():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]


def test_causal_lm_loss_matches_manual_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    manual = []
    for b in range(2):
        for t in range(4):  # position t predicts token t+1
            if labels[b, t + 1] != IGNORE_INDEX:
                manual.append(-F.log_softmax(logits[b, t], -1)[labels[b, t + 1]])
    assert torch.allclose(causal_lm_loss(logits, labels), torch.stack(manual).mean())
    assert torch.allclose(causal_lm_loss(logits, labels, reduction="sum"), torch.stack(manual).sum())
    changed = logits.clone()
    changed[1, 2:] += 100  # positions whose targets are ignored (or past the end) do not matter
    assert torch.allclose(causal_lm_loss(changed, labels), causal_lm_loss(logits, labels))
    with pytest.raises(ValueError, match="line up"):
        causal_lm_loss(logits, labels[:, :3])


# ---- schedule and parameter groups ---------------------------------------------------------------
def test_schedule_key_values():
    kw = dict(max_lr=3e-3, warmup_steps=10, total_steps=110, min_lr=3e-4)
    assert lr_at_step(0, **kw) == pytest.approx(3e-4)  # first warm-up step: 1/10 of max
    assert lr_at_step(9, **kw) == pytest.approx(3e-3)  # end of warm-up
    assert lr_at_step(10, **kw) == pytest.approx(3e-3)  # start of the cosine
    assert lr_at_step(60, **kw) == pytest.approx((3e-3 + 3e-4) / 2)  # midpoint of the decay
    assert lr_at_step(110, **kw) == pytest.approx(3e-4)  # end
    assert lr_at_step(500, **kw) == pytest.approx(3e-4)  # beyond the end
    values = [lr_at_step(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    with pytest.raises(ValueError):
        lr_at_step(0, max_lr=1, warmup_steps=20, total_steps=10)


def test_scheduler_follows_lr_at_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = make_scheduler(opt, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    for step in range(25):
        expected = lr_at_step(step, max_lr=2.0, warmup_steps=4, total_steps=20, min_lr=0.2)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
        opt.step()
        sched.step()


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert "model.embed_tokens.weight" in decay["names"]  # tied with lm_head: decayed once
    assert "lm_head.weight" not in decay["names"] + no_decay["names"]
    assert any(n.endswith("q_proj.bias") for n in no_decay["names"])
    assert any(n.endswith("layernorm.weight") for n in no_decay["names"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    decay2, _ = param_groups(model, 0.1, decay_embeddings=False)
    assert "model.embed_tokens.weight" not in decay2["names"]


def test_init_weights_gives_small_initial_loss():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 16))
    loss = causal_lm_loss(model(ids).logits, ids)
    assert abs(loss.item() - math.log(96)) < 0.1  # near-uniform predictions at the start


# ---- accumulation -----------------------------------------------------------------------------------
def _first_step_grads(micro_batch_size: int, data: PackedDataset) -> tuple[dict[str, torch.Tensor], float]:
    trainer = Trainer(tiny_model(), _cfg(max_steps=2, micro_batch_size=micro_batch_size), data)
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.optimizer.step._wrapped_by_lr_sched = True  # keep LambdaLR from warning about the patch
    result = trainer.train(stop_at=1)
    return grads, result.losses[0]


def test_gradient_accumulation_equals_one_big_batch():
    # rows with many ignored labels make the micro-batches hold different numbers of targets, so
    # averaging per-micro-batch means would *not* match; weighting by the step's targets does
    packed = tiny_data()
    packed.packed.labels[::3, 5:] = IGNORE_INDEX
    big, big_loss = _first_step_grads(8, packed)
    accumulated, acc_loss = _first_step_grads(2, packed)
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-7)


# ---- exact resume ---------------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path):
    data = tiny_data()
    full = Trainer(tiny_model(), _cfg(max_steps=8), data, data).train()
    first = Trainer(tiny_model(), _cfg(max_steps=8, out_dir=str(tmp_path)), data, data)
    first.train(stop_at=3)
    first.save_checkpoint(tmp_path)
    resumed = Trainer(tiny_model(seed=99), _cfg(max_steps=8), data, data)  # different init: all must be restored
    rest = resumed.train(resume_from=tmp_path)
    assert first.result.losses + rest.losses == full.losses  # exact equality, not allclose
    assert resumed.step == 8


def test_resume_rejects_another_model(tmp_path):
    data = tiny_data()
    t = Trainer(tiny_model(), _cfg(), data)
    t.train(stop_at=1)
    t.save_checkpoint(tmp_path)
    config = tiny_model().config.replace(hidden_size=48, head_dim=None)
    other = init_weights(Qwen2ForCausalLM(QwenConfig(**{**config.__dict__, "extra": {}})))
    with pytest.raises(ResumeError, match="different model"):
        Trainer(other, _cfg(), data).load_checkpoint(tmp_path)


def test_resume_rejects_other_optimizer_groups_and_data_order(tmp_path):
    data = tiny_data()
    t = Trainer(tiny_model(), _cfg(), data)
    t.train(stop_at=1)
    t.save_checkpoint(tmp_path)
    with pytest.raises(ResumeError, match="optimizer was built differently"):
        Trainer(tiny_model(), _cfg(decay_embeddings=False), data).load_checkpoint(tmp_path)
    with pytest.raises(ResumeError, match="batch_size"):
        Trainer(tiny_model(), _cfg(batch_size=16), data).load_checkpoint(tmp_path)
    with pytest.raises(ResumeError, match="no training checkpoint"):
        Trainer(tiny_model(), _cfg(), data).load_checkpoint(tmp_path / "nowhere")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(tiny_model(), _cfg(lr=5e-3), data).load_checkpoint(tmp_path)
    assert any("changed settings ['lr']" in str(w.message) for w in caught)


# ---- errors and switches ------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        _cfg(batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="precision"):
        _cfg(precision="fp8")
    with pytest.raises(ValueError, match="rows are 16 tokens long"):
        Trainer(tiny_model(), _cfg(seq_len=32), tiny_data())


def test_fp16_grad_scaler_path_and_its_resume(tmp_path):
    # the T4 path (fp16 autocast + GradScaler) also runs on a CPU, which lets us test it here
    data = tiny_data()
    with pytest.warns(UserWarning, match="fp16"):
        full_trainer = Trainer(tiny_model(), _cfg(precision="fp16"), data)
    assert full_trainer.scaler.is_enabled()
    full = full_trainer.train().losses
    assert all(math.isfinite(x) for x in full)
    with pytest.warns(UserWarning, match="fp16"):
        first = Trainer(tiny_model(), _cfg(precision="fp16"), data)
    first.train(stop_at=2)
    first.save_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="fp16"):
        resumed = Trainer(tiny_model(seed=5), _cfg(precision="fp16"), data)
    rest = resumed.train(resume_from=tmp_path).losses
    assert first.result.losses + rest == full
    assert resumed.scaler.get_scale() == full_trainer.scaler.get_scale()


def test_callbacks_eager_attention_and_bf16():
    data = tiny_data()
    seen, evals = [], []
    cfg = _cfg(max_steps=4, eval_every=2, eval_batches=4, attn_implementation="eager", precision="bf16")
    trainer = Trainer(tiny_model(), cfg, data, data, on_step=lambda s, loss, lr: seen.append((s, loss, lr)),
                      on_eval=lambda s, v: evals.append((s, v)))
    result = trainer.train()
    assert trainer.raw_model.config.attn_implementation == "eager"
    assert [s for s, _, _ in seen] == [1, 2, 3, 4] and [s for s, _ in evals] == [2, 4]
    assert all(math.isfinite(loss) for _, loss, _ in seen)
    assert result.final_val_loss == evals[-1][1]


def test_eager_and_sdpa_train_alike():
    data = tiny_data()
    a = Trainer(tiny_model(), _cfg(max_steps=3, attn_implementation="eager"), data).train().losses
    b = Trainer(tiny_model(), _cfg(max_steps=3, attn_implementation="sdpa"), data).train().losses
    assert a == pytest.approx(b, rel=1e-5)


def test_loss_goes_down_on_learnable_data():
    docs = [[1, 2, 3, 4, 5, 6, 7, 8]] * 40  # a repeated pattern
    data = PackedDataset(pack_sequences(docs, seq_len=16, eos_id=95))
    result = Trainer(tiny_model(), _cfg(max_steps=30, lr=3e-2), data).train()
    assert result.losses[-1] < 0.3 * result.losses[0]


def test_train_steps_follows_the_schedule_and_learns():
    from qwen_edu.training.optim import lr_at_step, train_steps

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    seen: list[int] = []
    log = train_steps(model, lambda step: F.mse_loss(model(x), y), steps=60, lr=0.1, warmup_steps=5,
                      on_step=lambda step, loss: seen.append(step))
    assert seen == list(range(60)) and [r["step"] for r in log] == seen
    assert [r["lr"] for r in log] == pytest.approx(
        [lr_at_step(s, max_lr=0.1, warmup_steps=5, total_steps=60, min_lr=0.01) for s in range(60)])
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]  # a linear fit that AdamW finds quickly
