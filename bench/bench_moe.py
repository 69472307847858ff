"""Benchmark qwen_edu's Qwen2-MoE against transformers on a Qwen1.5-MoE-A2.7B-shaped model cut to 2 layers.

Real widths (hidden 2048, 16 heads, 60 routed experts of 1408 with top-4, a shared expert of 5632, the
151,936-row vocabulary), random weights, one set of tensors shared by both libraries (the parameter
names are the same), measured in the same process on the CPU, fp32 and bf16:

* **model**: prefill (one ``--prefill``-token prompt) and cached decode tokens/s through a bare forward
  loop and through each library's ``generate`` (best of interleaved runs; ``bench_model.bench_speed``);
* **block**: the sparse MoE block alone, for a prefill-sized batch of tokens and for a single decode
  token -- ours with each dispatch kernel against transformers' ``grouped_mm`` (its default) and
  ``eager`` expert paths;
* **dispatch cost**: our routed experts against (a) an all-experts dense reference that runs every
  expert on every token and masks the result (an MoE without sparse dispatch: E/k times the FLOPs)
  and (b) one dense SwiGLU as wide as the k chosen experts together (the same FLOPs, no routing: the
  ideal a dispatch can only approach).

Run:  python bench/bench_moe.py [--prefill 256] [--decode-tokens 16] [--repeats 3] [--threads N]
Needs about 8 GB of RAM (the fp32 weights, once).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import _ratio, bench_speed  # noqa: E402  (the same timing loop as the dense benchmark)


def build_ours(layers: int, vocab: int):
    """Our model with N(0, 0.02) matrices (norm gains 1, biases 0)."""
    from qwen_edu.models.presets import preset
    from qwen_edu.models.qwen2_moe import Qwen2MoeForCausalLM

    config = preset("Qwen1.5-MoE-A2.7B", num_hidden_layers=layers, vocab_size=vocab)
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = Qwen2MoeForCausalLM(config)
    ours.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0 if "norm" in name else 0.0)
    ours.model.rotary_emb = type(ours.model.rotary_emb)(config.head_dim, config.rope_theta, None,
                                                        config.max_position_embeddings)
    return ours.eval()


def mirror_in_transformers(ours):
    """transformers' Qwen2MoeForCausalLM holding the very same tensors as ``ours`` (no copy)."""
    import transformers
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRotaryEmbedding

    hf_config = transformers.Qwen2MoeConfig(**ours.config.to_hf_config())
    with torch.device("meta"):
        hf = transformers.Qwen2MoeForCausalLM(hf_config)
    hf.load_state_dict(ours.state_dict(), strict=True, assign=True)
    hf.model.rotary_emb = Qwen2MoeRotaryEmbedding(hf_config)
    hf.config._attn_implementation = "sdpa"
    return hf.eval()


def best_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each variant, the variants interleaved round by round (a busy machine's speed
    drifts; interleaving makes the drift hit every variant alike, and the minimum drops the spikes)."""
    for fn in variants.values():
        fn()  # warm-up
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _set_impl(module, attribute: str, value: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        setattr(module, attribute, value)
        return fn()
    return run


def all_experts_dense(block, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then keep each token's top-k weighted outputs (no dispatch)."""
    _, weights, chosen = block.gate(x)
    dense_weights = torch.zeros(x.shape[0], block.num_experts, dtype=x.dtype).scatter(1, chosen, weights)
    hidden = torch.matmul(x, block.experts.gate_up_proj.transpose(1, 2))  # [E, T, 2I]
    gate, up = hidden.chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, block.experts.down_proj.transpose(1, 2))  # [E, T, H]
    return (out * dense_weights.T[:, :, None]).sum(0)


@torch.inference_mode()
def bench_block(ours, hf, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds per call of layer 0's MoE block (and its routed part) for ``tokens`` tokens."""
    from qwen_edu.models.layers import MLP

    block, theirs = ours.model.layers[0].mlp, hf.model.layers[0].mlp
    dtype = block.gate.weight.dtype
    x = torch.randn(1, tokens, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    flat = x.view(tokens, -1)
    _, weights, chosen = block.gate(flat)
    k, width = block.top_k, block.experts.intermediate_size
    same_flops = MLP(flat.shape[1], k * width).to(dtype)
    variants: dict[str, Callable[[], object]] = {}
    for impl in ("loop", "grouped_mm"):
        variants[f"qwen_edu block ({impl})"] = _set_impl(block.experts, "implementation", impl, lambda: block(x))
        variants[f"qwen_edu routed experts ({impl})"] = _set_impl(
            block.experts, "implementation", impl, lambda: block.experts(flat, chosen, weights))
    for impl in ("grouped_mm", "eager"):
        variants[f"transformers block ({impl})"] = _set_impl(theirs.experts.config, "_experts_implementation", impl,
                                                             lambda: theirs(x))
    if tokens * block.num_experts * 2 * width * x.element_size() < 2**31:
        variants["all-experts dense reference"] = lambda: all_experts_dense(block, flat)
    variants[f"dense SwiGLU of width k*I = {k * width}"] = lambda: same_flops(flat)
    out = best_seconds(variants, repeats)
    block.experts.implementation = "auto"
    theirs.experts.config._experts_implementation = "grouped_mm"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    ours = build_ours(args.layers, args.vocab)
    hf = mirror_in_transformers(ours)
    print(f"Qwen1.5-MoE-A2.7B shape cut to {args.layers} layers, vocab {args.vocab:,}: "
          f"{ours.num_parameters() / 1e9:.2f}B parameters, built in {time.perf_counter() - t:.0f}s; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    prompt = torch.randint(0, args.vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        same = torch.equal(ours(prompt[:, :32]).logits.argmax(-1), hf(prompt[:, :32]).logits.argmax(-1))
    print(f"same greedy next tokens on a 32-token prompt (fp32): {same}")

    model_rows, block_rows = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        if dtype != ours.dtype:
            del hf  # let the old-dtype tensors go before converting (one copy of the weights at a time)
            ours.to(dtype)
            hf = mirror_in_transformers(ours)
        speeds = bench_speed({"qwen_edu": ours, "transformers": hf}, prompt, args.decode_tokens, args.repeats)
        model_rows.append((dtype_name, speeds))
        for tokens in (args.prefill, 1):
            block_rows.append((dtype_name, tokens, bench_block(ours, hf, tokens, args.repeats)))

    print()
    header = f"{'model':<34} {'dtype':<9} {'qwen_edu':>10} {'transformers':>13} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for dtype_name, speeds in model_rows:
        for key, label in [("prefill_tok_s", f"prefill {args.prefill} tok (tok/s)"),
                           ("decode_tok_s", f"cached decode {args.decode_tokens} tok (tok/s)"),
                           ("generate_tok_s", "generate() end to end (tok/s)")]:
            a, b = speeds["qwen_edu"][key], speeds["transformers"][key]
            print(f"{label:<34} {dtype_name:<9} {a:>10.2f} {b:>13.2f} {_ratio(a, b)}")
    print("ratio = qwen_edu / transformers tok/s (higher is better; target >= 1.0x)")

    for dtype_name, tokens, times in block_rows:
        print(f"\nMoE block of layer 0, {tokens} token(s), {dtype_name}: ms per call; for whole blocks the "
              "ratio is transformers grouped_mm (its default) / this, > 1 = faster than transformers")
        reference = times["transformers block (grouped_mm)"]
        routed = times["qwen_edu routed experts (grouped_mm)"]
        for name, seconds in times.items():
            extra = f" {_ratio(reference, seconds)}" if "block" in name else ""
            if name.startswith(("all-experts", "dense SwiGLU")):
                extra = f"   our routed experts (grouped_mm) take {routed / seconds:.2f}x this"
            print(f"  {name:<44} {seconds * 1e3:>9.2f}{extra}")
    print("\nA busy machine moves single timings by 10-20%: read ratios near 1.0x as parity.")


if __name__ == "__main__":
    main()
