"""Benchmark Qwen2-VL's vision tower and M-RoPE position ids against transformers, in the same process.

Measures, on the CPU, in fp32:

* **vision tower throughput** (images/s) on a packed batch of images of different sizes, qwen_edu vs
  ``transformers``' ``Qwen2VisionTransformerPretrainedModel`` with the same weights, SDPA attention on both
  sides (and eager with ``--eager``). Default shape: Qwen2-VL's head size (80) and MLP ratio, width 640,
  2 blocks (``--width 1280 --depth 32`` is the real 2B/7B tower, far too slow for a laptop CPU);
* **get_rope_index** time on a left-padded batch of prompts with two images and a video each, vs
  ``Qwen2VLModel.get_rope_index`` (which 5.24 computes from ``mm_token_type_ids``);
* **peak memory** of the packed ViT vs the same images zero-padded to the largest grid (the way a fixed-shape
  batch would hold them), each in a fresh subprocess (growth of ``VmHWM``, the peak RSS, over the forward).

Ratios > 1 mean qwen_edu is faster (or uses less memory). Timings are medians of interleaved repeats; on a
shared machine they are noisy, so read the ratios, not the absolute numbers.

Run:  python bench/bench_qwen2_vl.py [--width 640] [--depth 2] [--repeats 5] [--eager]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_edu.vision.dynamic_resolution import patchify  # noqa: E402
from qwen_edu.vision.mrope import get_rope_index  # noqa: E402
from qwen_edu.vision.qwen2_vl_vit import Qwen2VisionTransformer, VisionConfig  # noqa: E402

#: (height, width) in pixels, multiples of 28: a mix of sizes and aspect ratios.
SIZES = [(224, 224), (336, 224), (112, 448), (448, 336), (56, 84), (168, 168), (280, 140), (84, 392)]
IMAGE, VIDEO, V_START, V_END = 151655, 151656, 151652, 151653

MEASURE_MEMORY = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from qwen_edu.vision.qwen2_vl_vit import Qwen2VisionTransformer, VisionConfig
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
args = json.loads(sys.argv[2])
torch.manual_seed(0)
tower = Qwen2VisionTransformer(VisionConfig(**args["config"])).eval()
grid = torch.tensor(args["grid"])
pixels = torch.randn(int(grid.prod(-1).sum()), tower.config.patch_dim)
before = peak()
with torch.inference_mode():
    tower(pixels, grid)
print(json.dumps({"peak_delta": peak() - before, "patches": pixels.shape[0]}))
"""


def tower_config(width: int, depth: int, attn: str) -> dict:
    return dict(depth=depth, embed_dim=width, num_heads=width // 80, out_hidden_size=1536, mlp_ratio=4.0,
                attn_implementation=attn)


def packed_images(sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised pixels for images of these sizes, patchified and packed like the processor does."""
    g = torch.Generator().manual_seed(0)
    parts = [patchify(torch.randn(1, 3, h, w, generator=g)) for h, w in sizes]
    return torch.cat([p for p, _ in parts]), torch.tensor([grid for _, grid in parts])


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_tower(width: int, depth: int, repeats: int, attn: str) -> dict:
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = tower_config(width, depth, attn)
    torch.manual_seed(0)
    ours = Qwen2VisionTransformer(VisionConfig(**config)).eval()
    hf_config = Qwen2VLVisionConfig(depth=depth, embed_dim=width, num_heads=width // 80, hidden_size=1536,
                                    mlp_ratio=4)
    hf_config._attn_implementation = attn
    reference = Qwen2VisionTransformerPretrainedModel(hf_config).eval()
    reference.load_state_dict(ours.state_dict())
    pixels, grid = packed_images(SIZES)
    with torch.inference_mode():
        ours(pixels, grid), reference(pixels, grid_thw=grid)  # warm-up
        torch.testing.assert_close(ours(pixels, grid), reference(pixels, grid_thw=grid).pooler_output,
                                   rtol=1e-4, atol=1e-4)
        ours_t, ref_t = [], []
        for _ in range(repeats):  # interleaved, so that load changes hit both sides alike
            ours_t += timed(lambda: ours(pixels, grid), 1)
            ref_t += timed(lambda: reference(pixels, grid_thw=grid), 1)
    n = len(SIZES)
    return {"attn": attn, "images": n, "patches": int(pixels.shape[0]),
            "qwen_edu_images_per_s": n / statistics.median(ours_t),
            "transformers_images_per_s": n / statistics.median(ref_t),
            "speedup": statistics.median(ref_t) / statistics.median(ours_t)}


def rope_batch(rows: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts, each: text, image, text, image, text, video, text."""
    g = torch.Generator().manual_seed(1)
    seqs, images, videos = [], [], []
    for r in range(rows):
        grids = [[1, 2 * int(torch.randint(2, 16, (1,), generator=g)), 2 * int(torch.randint(2, 16, (1,), generator=g))]
                 for _ in range(2)]
        video = [int(torch.randint(1, 5, (1,), generator=g)), 8, 12]
        images += grids
        videos.append(video)
        seq = list(range(10, 30 + r))
        for kind, grid in [(IMAGE, grids[0]), (IMAGE, grids[1]), (VIDEO, video)]:
            seq += [V_START] + [kind] * (grid[0] * grid[1] * grid[2] // 4) + [V_END] + list(range(40, 60))
        seqs.append(seq)
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask, torch.tensor(images), torch.tensor(videos)


def bench_rope_index(repeats: int) -> dict:
    import transformers

    config = transformers.Qwen2VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                                         intermediate_size=64, vocab_size=151936),
                                        vision_config=dict(depth=1, embed_dim=32, num_heads=4, hidden_size=64))
    with torch.device("meta"):
        reference = transformers.Qwen2VLModel(config)
    ids, mask, images, videos = rope_batch()
    types = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    ours = lambda: get_rope_index(ids, images, videos, mask)
    theirs = lambda: reference.get_rope_index(ids, types, images, videos, mask)
    ours(), theirs()
    ours_t, ref_t = [], []
    for _ in range(repeats * 4):
        ours_t += timed(ours, 1)
        ref_t += timed(theirs, 1)
    return {"batch": list(ids.shape), "qwen_edu_ms": 1e3 * statistics.median(ours_t),
            "transformers_ms": 1e3 * statistics.median(ref_t),
            "speedup": statistics.median(ref_t) / statistics.median(ours_t)}


def bench_memory(width: int, depth: int, attn: str) -> dict:
    _, grid = packed_images(SIZES)
    largest = [1, int(grid[:, 1].max()), int(grid[:, 2].max())]
    padded = [largest] * len(SIZES)
    out = {}
    for name, g in [("packed", grid.tolist()), ("padded", padded)]:
        args = json.dumps({"config": tower_config(width, depth, attn), "grid": g})
        result = subprocess.run([sys.executable, "-c", MEASURE_MEMORY, str(ROOT), args], capture_output=True,
                                text=True, check=True)
        out[name] = json.loads(result.stdout)
    out["attn"] = attn
    out["padded_over_packed"] = out["padded"]["peak_delta"] / max(out["packed"]["peak_delta"], 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="also time eager attention on both sides")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {"threads": torch.get_num_threads(), "tower": [], "memory": []}
    for attn in ["sdpa", "eager"] if args.eager else ["sdpa"]:
        tower = bench_tower(args.width, args.depth, args.repeats, attn)
        results["tower"].append(tower)
        print(f"vision tower ({attn}, {tower['images']} images, {tower['patches']:,} patches): "
              f"qwen_edu {tower['qwen_edu_images_per_s']:.2f} img/s, transformers "
              f"{tower['transformers_images_per_s']:.2f} img/s -> {tower['speedup']:.2f}x")
    rope = bench_rope_index(args.repeats)
    results["rope_index"] = rope
    print(f"get_rope_index (batch {rope['batch'][0]} x {rope['batch'][1]} tokens): qwen_edu {rope['qwen_edu_ms']:.2f} ms, "
          f"transformers {rope['transformers_ms']:.2f} ms -> {rope['speedup']:.2f}x")
    for attn in ["sdpa", "eager"]:
        memory = bench_memory(args.width, args.depth, attn)
        results["memory"].append(memory)
        print(f"peak memory ({attn}): packed {memory['packed']['patches']:,} patches "
              f"{memory['packed']['peak_delta'] / 2**20:.1f} MiB, padded to the largest grid "
              f"{memory['padded']['patches']:,} patches {memory['padded']['peak_delta'] / 2**20:.1f} MiB "
              f"-> padding costs {memory['padded_over_packed']:.2f}x")
    return results


if __name__ == "__main__":
    main()
