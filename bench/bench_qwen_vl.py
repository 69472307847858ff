"""Qwen-VL vision side (ViT + resampler + ln_post/proj): images/s of qwen_edu vs a plain PyTorch reference.

The reference is ``tests/_qwen_vl_reference.visual_forward``: a line-by-line rendering of Qwen-VL's
``visual.py`` (sequence-first blocks, ``bmm`` attention with the softmax in the input dtype, the resampler
through ``torch.nn.MultiheadAttention``). Both run the same weights on the same batch in this process; the
outputs are checked to agree before timing. Rounds alternate between the two (a noisy, shared machine
hurts both alike) and the median images/s over rounds is reported with the ratio ours / reference.

    python bench/bench_qwen_vl.py                         # the book's small shape, fp32 and bf16
    python bench/bench_qwen_vl.py --shape qwen-vl --layers 2 --batch 1   # Qwen-VL's widths, 448 px
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

SHAPES = {
    # The chapter-7 model's tower (qwen_edu.training.qwen_vl): 96 px, 8 px patches -> 144 patches, 36 queries.
    "small": dict(width=96, layers=3, heads=4, mlp_ratio=4.0, image_size=96, patch_size=8, output_dim=192,
                  n_queries=36, positional_grid=6),
    # Qwen-VL's ViT-bigG widths and 448 px input (48 layers in the real model; --layers picks how many).
    "qwen-vl": dict(width=1664, layers=48, heads=16, mlp_ratio=4.9231, image_size=448, patch_size=14,
                    output_dim=4096),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--layers", type=int, default=None, help="override the number of ViT blocks")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from qwen_edu.vision.qwen_vl_vit import QwenVLVisionConfig, QwenVLVisionTransformer
    from qwen_edu.vision.resampler import sincos_2d_table
    from tests import _qwen_vl_reference as ref

    shape = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))
    config = QwenVLVisionConfig(**shape)
    torch.manual_seed(0)
    tower = QwenVLVisionTransformer(config).eval()
    with torch.no_grad():
        for name, param in tower.named_parameters():  # non-trivial norms and biases, like a trained model
            if param.dim() == 1:
                param.normal_(1.0 if "ln" in name and name.endswith("weight") else 0.0, 0.1)
        tower.attn_pool.pos_embed.copy_(sincos_2d_table(config.output_dim, config.query_grid))
    visual = {**config.to_dict(), "n_queries": config.n_queries}
    pixels = torch.randn(args.batch, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    params = sum(t.numel() for t in tower.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s); shape {args.shape}: width {config.width}, "
          f"{config.layers} blocks, {config.image_size} px -> {config.grid}x{config.grid} patches -> "
          f"{config.n_queries} queries of width {config.output_dim}; {params / 1e6:.1f}M parameters; "
          f"batch {args.batch}, {args.rounds} rounds")

    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        model = tower.to(dtype)
        sd = {"transformer.visual." + k: v for k, v in model.state_dict().items()}
        x = pixels.to(dtype)
        runs = {"qwen_edu": lambda m=model, x=x: m(x),
                "reference": lambda sd=sd, x=x: ref.visual_forward(x, sd, visual)}
        with torch.inference_mode():
            outs = {name: fn() for name, fn in runs.items()}  # warm-up and correctness
            err = (outs["qwen_edu"].float() - outs["reference"].float()).abs().max().item()
            scale = outs["reference"].float().abs().max().item()
            limit = 1e-4 if dtype == torch.float32 else 0.1  # fp32: reduction order only; bf16: ~3 digits
            assert err <= limit * max(1.0, scale), f"{dtype_name}: outputs differ by {err:.3g} (scale {scale:.3g})"
            speeds: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    speeds[name].append(args.batch / (time.perf_counter() - start))
        ours, theirs = statistics.median(speeds["qwen_edu"]), statistics.median(speeds["reference"])
        print(f"{dtype_name:>9}: qwen_edu {ours:8.2f} images/s | reference {theirs:8.2f} images/s | "
              f"ratio {ours / theirs:.2f}x | max |diff| {err:.2e} (outputs up to {scale:.1f})")


if __name__ == "__main__":
    main()
