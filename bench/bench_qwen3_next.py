"""Benchmark Qwen3-Next's pieces on the CPU, against transformers in the same run.

1. **Gated DeltaNet prefill** (the chunked form) and **decode** (the recurrent step with a cached
   state), tokens/s of ``qwen_edu``'s ``GatedDeltaNet`` against transformers' ``Qwen3NextGatedDeltaNet``
   (its pure-PyTorch path: no fla / causal-conv1d kernels on a CPU) with the same weights; the ratio
   should be >= 1.0x.
2. **The crossover**: the time per generated token of a 3:1 hybrid stack and of the same stack with
   only full-attention layers, as the context grows. Attention reads every cached key, so its step
   cost grows with the length; a DeltaNet layer's state is fixed, so its step cost does not. The
   crossover is the first measured context length at which the hybrid is faster per token.

Run:  OMP_NUM_THREADS=1 python bench/bench_qwen3_next.py [--quick]
Timings are medians of the CPU time of repeated, alternating runs (see :func:`median_seconds`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_edu.models.gated_deltanet import DeltaNetState, GatedDeltaNet  # noqa: E402
from qwen_edu.models.qwen3_next import FULL, LINEAR, Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402

# One DeltaNet layer with Qwen3-Next's head sizes (d_k = d_v = 128, 2 value heads per key head), a
# quarter of its heads, so that it runs in seconds on one CPU thread.
LAYER = dict(hidden_size=1024, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=128,
             linear_value_head_dim=128, linear_conv_kernel_dim=4)


def median_seconds(*fns, repeats: int) -> list[float]:
    """Median CPU time of each function (this process's, all threads: other jobs on a shared machine
    do not inflate it as they do wall time); the runs alternate, so what remains hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.process_time()
            fn()
            out.append(time.process_time() - start)
    return [statistics.median(t) for t in times]


def report(title: str, tokens: int, ours_s: float, theirs_s: float) -> None:
    print(title)
    print(f"  qwen_edu     {tokens / ours_s:12,.0f} tok/s")
    print(f"  transformers {tokens / theirs_s:12,.0f} tok/s")
    print(f"  ratio        {theirs_s / ours_s:12.2f}x")


def layers():
    import transformers
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    config = transformers.Qwen3NextConfig(**LAYER, num_hidden_layers=1, layer_types=[LINEAR], num_experts=0)
    torch.manual_seed(0)
    theirs = Qwen3NextGatedDeltaNet(config, 0).eval()
    ours = GatedDeltaNet(LAYER["hidden_size"], LAYER["linear_num_key_heads"], LAYER["linear_num_value_heads"],
                         LAYER["linear_key_head_dim"], LAYER["linear_value_head_dim"],
                         LAYER["linear_conv_kernel_dim"]).eval()
    ours.load_state_dict(theirs.state_dict())
    return config, ours, theirs


@torch.inference_mode()
def bench_deltanet(prefill: int, decode: int, repeats: int) -> None:
    from transformers.cache_utils import DynamicCache
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from qwen_edu.models.gated_deltanet import chunk_gated_delta_rule, l2norm

    config, ours, theirs = layers()
    x = torch.randn(1, prefill, LAYER["hidden_size"])
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=0)  # same layer, same numbers

    ours_s, theirs_s = median_seconds(lambda: ours(x), lambda: theirs(x), repeats=repeats)
    report(f"DeltaNet layer prefill, {prefill} tokens (chunked form):", prefill, ours_s, theirs_s)

    heads, d = LAYER["linear_num_value_heads"], LAYER["linear_key_head_dim"]
    q, k, v = (torch.randn(1, prefill, heads, d) for _ in range(3))
    g, beta = -torch.rand(1, prefill, heads), torch.rand(1, prefill, heads)
    qh, kh, vh, gh, bh = (t.transpose(1, 2) for t in (q, k, v, g, beta))
    ours_s, theirs_s = median_seconds(
        lambda: chunk_gated_delta_rule(l2norm(qh) * d**-0.5, l2norm(kh), vh, gh, bh),
        lambda: torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True),
        repeats=repeats)
    report(f"  of which the chunked delta rule alone ({heads} heads of {d}x{d}):", prefill, ours_s, theirs_s)

    steps = torch.randn(1, decode, LAYER["hidden_size"])
    context = x[:, :64]

    def ours_decode() -> None:
        state = DeltaNetState()
        ours(context, state)
        for t in range(decode):
            ours(steps[:, t:t + 1], state)

    def theirs_decode() -> None:
        cache = DynamicCache(config=config)
        theirs(context, cache=cache)
        for t in range(decode):
            theirs(steps[:, t:t + 1], cache=cache)

    prefill_ours, prefill_theirs = median_seconds(lambda: ours(context, DeltaNetState()),
                                                  lambda: theirs(context, cache=DynamicCache(config=config)),
                                                  repeats=repeats)
    ours_s, theirs_s = median_seconds(ours_decode, theirs_decode, repeats=repeats)
    report(f"DeltaNet layer decode, {decode} tokens one at a time (recurrent form, cached conv + state):",
           decode, ours_s - prefill_ours, theirs_s - prefill_theirs)


def stack(layer_types: list[str]) -> Qwen3NextForCausalLM:
    """A small model (dense MLPs, no MTP): only the token mixers differ between the two stacks."""
    config = Qwen3NextConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                             num_hidden_layers=len(layer_types), layer_types=layer_types, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
                             linear_key_head_dim=64, linear_value_head_dim=64, num_experts=0,
                             mtp_num_hidden_layers=0, max_position_embeddings=65536)
    torch.manual_seed(0)
    return Qwen3NextForCausalLM(config).eval()


@torch.inference_mode()
def seconds_per_token(models: list[Qwen3NextForCausalLM], context: int, steps: int, repeats: int) -> list[float]:
    """Per model, the median time of one cached decode step after ``context`` tokens (one prefill,
    then ``repeats`` groups of ``steps`` steps, alternating between the models; the context grows by
    ``repeats * steps`` tokens while measuring, a small fraction of it)."""
    ids = torch.randint(0, 1024, (1, context), generator=torch.Generator().manual_seed(0))
    token = ids[:, -1:]
    caches = []
    for model in models:
        caches.append(model.model.new_cache())
        model(ids, cache=caches[-1], logits_to_keep=1)

    def steps_of(model: Qwen3NextForCausalLM, cache):  # type: ignore[no-untyped-def]
        return lambda: [model(token, cache=cache, logits_to_keep=1) for _ in range(steps)]

    times = median_seconds(*(steps_of(m, c) for m, c in zip(models, caches, strict=True)), repeats=repeats)
    return [t / steps for t in times]


def bench_crossover(lengths: list[int], steps: int, repeats: int) -> None:
    hybrid = stack([LINEAR, LINEAR, LINEAR, FULL] * 2)
    full = stack([FULL] * 8)
    print("Time per generated token vs context (8 layers, hidden 512; hybrid = 3 DeltaNet : 1 attention):")
    print(f"  {'context':>8} {'full attn ms':>13} {'hybrid ms':>10} {'hybrid/full':>12}")
    crossover = None
    for length in lengths:
        f, h = seconds_per_token([full, hybrid], length, steps, repeats)
        print(f"  {length:>8,} {1e3 * f:>13.2f} {1e3 * h:>10.2f} {h / f:>12.2f}")
        if crossover is None and h < f:
            crossover = length
    where = f"{crossover:,} tokens of context" if crossover else f"not reached up to {lengths[-1]:,} tokens"
    print(f"  crossover (hybrid faster per token from): {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.quick:
        bench_deltanet(prefill=256, decode=32, repeats=3)
        bench_crossover([128, 1024, 4096], steps=8, repeats=3)
    else:
        bench_deltanet(prefill=2048, decode=128, repeats=5)
        bench_crossover([128, 256, 512, 1024, 2048, 4096, 8192], steps=8, repeats=5)


if __name__ == "__main__":
    main()
