"""Benchmark qwen_edu's decoder against transformers on one random checkpoint with Qwen2-0.5B's shape.

Measures, on the CPU:
* prefill throughput (one 512-token prompt) and cached decode throughput (tokens/s), FP32 and BF16,
  both through a bare forward loop and through each library's ``generate``;
* peak resident memory while loading, as a multiple of the checkpoint's bytes, and load time --
  each load in a fresh subprocess (growth of ``VmHWM``, the peak RSS, from after the imports).

Run:  python bench/bench_model.py [--decode-tokens 32] [--prefill 512] [--keep DIR]
The checkpoint (~2 GB fp32) is written with ``save_pretrained`` into a temp dir and deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

MEASURE_LOAD = r"""
import json, sys, time, torch, transformers, qwen_edu, qwen_edu.checkpoint
which, folder, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
def peak():  # VmHWM: peak RSS of this process image (ru_maxrss would inherit the parent's peak at fork)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = peak()
t = time.perf_counter()
if which == "qwen_edu":
    model = qwen_edu.load_model(folder, dtype=dtype)
else:
    model = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype)
seconds = time.perf_counter() - t
loaded = peak() - before
weights = sum(p.numel() * p.element_size() for p in model.parameters())
with torch.inference_mode():  # touches every weight: lazily mapped pages become resident here
    model(torch.arange(8)[None])
print(json.dumps({"seconds": seconds, "seconds_to_first_forward": time.perf_counter() - t,
                  "peak_delta": loaded, "peak_after_forward": peak() - before, "weights": weights}))
"""


def make_checkpoint(folder: Path) -> int:
    """Qwen2-0.5B-shaped random checkpoint in fp32, saved by transformers. Returns its bytes."""
    import transformers

    sys.path.insert(0, str(ROOT))
    from qwen_edu.models.presets import preset

    config = transformers.Qwen2Config(**preset("Qwen2-0.5B").to_hf_config())
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    del model
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure_load(which: str, folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, which, str(folder), dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hf_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@torch.inference_mode()
def prefill_seconds(model, prompt: torch.Tensor) -> float:
    t = time.perf_counter()
    model(prompt)
    return time.perf_counter() - t


@torch.inference_mode()
def decode_seconds(model, is_hf: bool, prompt: torch.Tensor, tokens: int) -> float:
    """Time ``tokens`` single-token cached forward passes after a prefill (the prefill is not timed)."""
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache = _hf_cache(out) if is_hf else out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(tokens):
        out = model(token, cache=cache) if is_hf else model(token, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def generate_seconds(model, is_hf: bool, prompt: torch.Tensor, tokens: int) -> float:
    import qwen_edu

    t = time.perf_counter()
    if is_hf:
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    else:
        qwen_edu.generate(model, prompt, max_new_tokens=tokens, eos_token_id=[])
    return time.perf_counter() - t


def bench_speed(models: dict, prompt: torch.Tensor, decode_tokens: int, repeats: int) -> dict:
    """Interleave the two libraries run by run (the machine's speed drifts) and keep the best run."""
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(prompt[:, :16])  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            is_hf = name == "transformers"
            runs = {"prefill_tok_s": prompt.shape[1] / prefill_seconds(model, prompt),
                    "decode_tok_s": decode_tokens / decode_seconds(model, is_hf, prompt, decode_tokens)}
            for key, value in runs.items():
                best[name][key] = max(best[name].get(key, 0.0), value)
    for name, model in models.items():
        best[name]["generate_tok_s"] = decode_tokens / generate_seconds(model, name == "transformers", prompt,
                                                                         decode_tokens)
    return best


def _ratio(a: float, b: float) -> str:
    return f"{a / b:>6.2f}x" if b else "    n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="reuse / keep the checkpoint in this folder")
    args = parser.parse_args()

    import transformers

    import qwen_edu

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_qwen2_05b_"))
    try:
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            make_checkpoint(folder)
            print(f"wrote checkpoint in {time.perf_counter() - t:.0f}s")
        ckpt_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"checkpoint: {folder} ({ckpt_bytes / 2**30:.2f} GiB fp32), torch {torch.__version__}, "
              f"transformers {transformers.__version__}, {torch.get_num_threads()} threads")

        rows = []
        for dtype in ("float32", "bfloat16"):
            loads = {w: measure_load(w, folder, dtype) for w in ("qwen_edu", "transformers")}
            prompt = torch.randint(0, 151643, (1, args.prefill), generator=torch.Generator().manual_seed(0))
            models = {
                "qwen_edu": qwen_edu.load_model(folder, dtype=dtype),
                "transformers": transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval(),
            }
            speeds = bench_speed(models, prompt, args.decode_tokens, args.repeats)
            del models
            rows.append((dtype, loads, speeds))

        print()
        header = f"{'metric':<34} {'dtype':<9} {'qwen_edu':>12} {'transformers':>13} {'ratio':>7}"
        print(header)
        print("-" * len(header))
        for dtype, loads, speeds in rows:
            for key, label in [("prefill_tok_s", f"prefill {args.prefill} tok (tok/s)"),
                               ("decode_tok_s", f"cached decode {args.decode_tokens} tok (tok/s)"),
                               ("generate_tok_s", "generate() end to end (tok/s)")]:
                a, b = speeds["qwen_edu"][key], speeds["transformers"][key]
                print(f"{label:<34} {dtype:<9} {a:>12.2f} {b:>13.2f} {_ratio(a, b)}")
            a, b = (loads[w]["peak_delta"] / ckpt_bytes for w in ("qwen_edu", "transformers"))
            print(f"{'load peak RSS / checkpoint bytes':<34} {dtype:<9} {a:>12.2f} {b:>13.2f} {_ratio(a, b)}")
            a, b = (loads[w]["peak_after_forward"] / ckpt_bytes for w in ("qwen_edu", "transformers"))
            print(f"{'  ... after a first forward pass':<34} {dtype:<9} {a:>12.2f} {b:>13.2f} {_ratio(a, b)}")
            a, b = (loads[w]["peak_delta"] / loads[w]["weights"] for w in ("qwen_edu", "transformers"))
            print(f"{'load peak RSS / loaded weights':<34} {dtype:<9} {a:>12.2f} {b:>13.2f} {_ratio(a, b)}")
            a, b = (loads[w]["seconds"] for w in ("qwen_edu", "transformers"))
            print(f"{'load time (s)':<34} {dtype:<9} {a:>12.2f} {b:>13.2f} {_ratio(a, b)}")
            a, b = (loads[w]["seconds_to_first_forward"] for w in ("qwen_edu", "transformers"))
            print(f"{'load + first forward (s)':<34} {dtype:<9} {a:>12.2f} {b:>13.2f} {_ratio(a, b)}")
        for dtype, loads, _ in rows:
            print(f"raw load figures {dtype}: {json.dumps(loads)}")
        print("\nratio = qwen_edu / transformers (higher is better for tok/s, lower for memory and time).")
        print("tok/s: best of the interleaved runs. Load memory: peak-RSS growth in a fresh process; transformers")
        print("maps fp32 weights lazily, so its pages only become resident on first use (second memory row).")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
