"""Benchmark qwen_edu's tokenizer against the compiled references (a script, not a test).

1. Encoding throughput (MB/s of UTF-8 input) of ``qwen_edu.load_tokenizer()`` vs tiktoken built
   from the same ``qwen.tiktoken`` ranks and regex, on a few hundred KB of mixed text (the
   shipped samples plus deterministic generated text). The ids are checked to be identical.
2. BPE training time of ``qwen_edu.tokenizer.train_bpe`` vs the ``tokenizers`` library's
   ``BpeTrainer`` (byte-level, same regex pre-tokeniser, same vocab size and min frequency).

Run: ``python bench/bench_tokenizer.py [--size-kb 400] [--vocab-size 2000] [--naive]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from qwen_edu.tokenizer import (
    QWEN_PATTERN,
    SAMPLE_NAMES,
    load_qwen_ranks,
    load_sample_text,
    load_tokenizer,
    train_bpe,
    train_bpe_naive,
)

SYLLABLES = ["ka", "lo", "mi", "tor", "an", "ve", "qu", "sh", "ren", "dal", "po", "ix", "el", "ou", "th"]


def mixed_text(size_bytes: int, seed: int = 0) -> str:
    """Shipped sample lines shuffled with generated words, numbers, identifiers and Chinese."""
    rng = random.Random(seed)
    lines = [line for name in SAMPLE_NAMES for line in load_sample_text(name).splitlines() if line.strip()]
    hanzi = [c for c in load_sample_text("chinese") if "\u4e00" <= c <= "\u9fff"]
    parts: list[str] = []
    size = 0
    while size < size_bytes:
        kind = rng.random()
        if kind < 0.5:
            part = rng.choice(lines)
        elif kind < 0.75:
            words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(rng.randint(5, 15))]
            part = " ".join(words).capitalize() + rng.choice([".", "!", "?", ","])
        elif kind < 0.85:
            part = "".join(rng.choices(hanzi, k=rng.randint(8, 40))) + "。"
        else:
            name = "_".join(rng.choices(SYLLABLES, k=3))
            part = f"    {name} = compute({rng.randint(0, 10**6)}, {rng.random():.4f})  # {rng.choice(SYLLABLES)}"
        parts.append(part)
        size += len(part.encode("utf-8")) + 1
    return "\n".join(parts)


def best_of(repeats: int, function: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_encode(text: str, repeats: int) -> list[tuple[str, float]]:
    import tiktoken

    megabytes = len(text.encode("utf-8")) / 1e6
    qwen = load_tokenizer()
    reference = tiktoken.Encoding(
        "qwen-bench",
        pat_str=QWEN_PATTERN,
        mergeable_ranks=load_qwen_ranks(),
        special_tokens=qwen.special_tokens,
    )
    cold_tokenizer = load_tokenizer()
    cold_time, ours = best_of(1, lambda: cold_tokenizer.encode(text))  # empty chunk cache
    warm_time, _ = best_of(repeats, lambda: qwen.encode(text))  # cache filled by the first run
    tiktoken_time, theirs = best_of(repeats, lambda: reference.encode(text, allowed_special="all"))
    assert ours == theirs, "qwen_edu and tiktoken disagree"
    print(
        f"encoded {megabytes * 1000:.0f} KB into {len(ours):,} tokens ({megabytes * 1e6 / len(ours):.2f} bytes/token)"
    )
    return [
        ("qwen_edu (cold cache)", megabytes / cold_time),
        ("qwen_edu (warm cache)", megabytes / warm_time),
        ("tiktoken", megabytes / tiktoken_time),
    ]


def hf_train(text: str, vocab_size: int, min_frequency: int) -> int:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer.get_vocab_size()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-kb", type=int, default=400, help="size of the mixed text")
    parser.add_argument("--vocab-size", type=int, default=2000, help="vocabulary size for training")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive", action="store_true", help="also time the recount-per-merge trainer")
    args = parser.parse_args()

    text = mixed_text(args.size_kb * 1000)
    encode_rows = bench_encode(text, args.repeats)
    tiktoken_speed = encode_rows[-1][1]
    print("\nEncoding throughput")
    print(f"{'tokenizer':<24}{'MB/s':>10}{'vs tiktoken':>14}")
    for name, speed in encode_rows:
        print(f"{name:<24}{speed:>10.2f}{speed / tiktoken_speed:>13.2f}x")

    training_text = text[: 200_000 if args.naive else len(text)]
    ours_time, merges = best_of(args.repeats, lambda: train_bpe(training_text, args.vocab_size))
    hf_time, hf_size = best_of(args.repeats, lambda: hf_train(training_text, args.vocab_size, 2))
    rows = [("qwen_edu train_bpe", ours_time, 256 + len(merges)), ("tokenizers BpeTrainer", hf_time, hf_size)]
    if args.naive:
        naive_time, naive_merges = best_of(1, lambda: train_bpe_naive(training_text, args.vocab_size))
        assert naive_merges == merges
        rows.append(("qwen_edu train_bpe_naive", naive_time, 256 + len(naive_merges)))
    kb = len(training_text.encode("utf-8")) / 1000
    print(f"\nBPE training on {kb:.0f} KB, vocab_size={args.vocab_size}, min_frequency=2")
    print(f"{'trainer':<28}{'seconds':>10}{'vocab':>8}{'vs tokenizers':>16}")
    for name, seconds, size in rows:
        print(f"{name:<28}{seconds:>10.3f}{size:>8}{seconds / hf_time:>15.2f}x")


if __name__ == "__main__":
    main()
