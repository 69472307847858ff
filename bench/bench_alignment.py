"""End-to-end alignment run on the book's base model: SFT -> reward model -> PPO, DPO, and the specialists.

    python bench/bench_alignment.py                      # qwen_edu/assets/base_model, preset "quick"
    python bench/bench_alignment.py --base PATH --preset smoke --skip-specialists

Prints every stage's held-out metrics and wall time, and writes them as JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qwen_edu.alignment import SpecialistConfig, run_alignment_pipeline, train_specialist
from qwen_edu.checkpoint import load_model
from qwen_edu.tokenizer import load_tokenizer

DEFAULT_BASE = Path(__file__).resolve().parents[1] / "qwen_edu" / "assets" / "base_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base model folder (HF layout + tokenizer.json)")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-specialists", action="store_true")
    parser.add_argument("--specialist-steps", type=int, default=150, help="continued pre-training and SFT steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_model(args.base, dtype="float32").eval()
    tokenizer = load_tokenizer(args.base)
    print(f"base model: {base.num_parameters() / 1e6:.2f}M parameters, vocabulary {tokenizer.vocab_size}")

    report: dict = {}
    started = time.perf_counter()
    result = run_alignment_pipeline(base, tokenizer, args.preset, progress=False,
                                    on_stage=lambda name, m: print(f"[{name}] " + ", ".join(
                                        f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float))))
    report["pipeline"] = {"metrics": result["metrics"], "timings": result["timings"],
                          "total_s": time.perf_counter() - started}
    for name, seconds in result["timings"].items():
        print(f"  {name:>7}: {seconds:6.1f} s")

    if not args.skip_specialists:
        for domain in ("math", "code"):
            t = time.perf_counter()
            config = SpecialistConfig(steps=args.specialist_steps, sft_steps=args.specialist_steps)
            _, metrics = train_specialist(base, tokenizer, domain, config, progress=False)
            by_stage = metrics["by_stage"]
            report[f"{domain}_specialist"] = {"recipe": list(metrics["recipe"]), "by_stage": by_stage,
                                              "seconds": time.perf_counter() - t}
            for stage, measures in by_stage.items():
                print(f"[{domain} specialist, {stage}] " + ", ".join(f"{k}={v:.3f}" for k, v in measures.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
