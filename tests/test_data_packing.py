"""Packing, the train/val split and the step-indexed sampler."""

from __future__ import annotations

import pytest
import torch

from qwen_edu.training import (
    IGNORE_INDEX,
    PackedDataset,
    StepBatchSampler,
    check_batch_geometry,
    make_dataloader,
    pack_sequences,
    split_documents,
)

EOS = 99


def test_packing_keeps_every_token_and_separates_documents():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    packed = pack_sequences(docs, seq_len=4, eos_id=EOS)
    stream = [t for d in docs for t in (*d, EOS)]  # 14 tokens -> 3 full rows + 2 left over
    assert packed.input_ids.shape == (4, 4) and packed.labels.shape == (4, 4)
    real = packed.labels != IGNORE_INDEX
    assert packed.input_ids[real].tolist() == stream  # nothing lost, order kept
    assert packed.labels[real].tolist() == stream
    assert (packed.input_ids == EOS).sum() >= len(docs)
    assert packed.labels[-1].tolist() == [10, EOS, IGNORE_INDEX, IGNORE_INDEX]  # right-padded tail
    assert packed.num_tokens == len(stream)


def test_packing_drop_last_and_exact_fit():
    docs = [[1, 2, 3], [4, 5, 6]]  # 8 tokens with separators
    exact = pack_sequences(docs, seq_len=4, eos_id=EOS)
    assert exact.input_ids.tolist() == [[1, 2, 3, EOS], [4, 5, 6, EOS]]
    assert (exact.labels != IGNORE_INDEX).all()
    dropped = pack_sequences(docs, seq_len=3, eos_id=EOS, drop_last=True)
    assert dropped.input_ids.tolist() == [[1, 2, 3], [EOS, 4, 5]]


def test_corpus_shorter_than_one_sequence_is_an_error():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_sequences([[1, 2], [3]], seq_len=64, eos_id=EOS)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_sequences([], seq_len=8, eos_id=EOS)
    with pytest.raises(ValueError, match="seq_len"):
        pack_sequences([[1, 2, 3]], seq_len=1, eos_id=EOS)


def test_split_documents():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1)
    assert len(train) == 90 and len(val) == 10 and not set(train) & set(val)
    with pytest.raises(ValueError):
        split_documents(["only one"], 0.5)


def test_sampler_is_a_function_of_the_step():
    a = StepBatchSampler(50, batch_size=8, micro_batch_size=2, seed=3)
    b = StepBatchSampler(50, batch_size=8, micro_batch_size=2, seed=3, start_step=5)
    it_a, it_b = iter(a), iter(b)
    from_start = [next(it_a) for _ in range(4 * 9)]
    assert [next(it_b) for _ in range(4 * 4)] == from_start[4 * 5:]  # resume = start at the step
    # each epoch is a permutation: the first 50 positions cover every row once
    flat = [i for mb in from_start for i in mb]
    assert sorted(flat[:50]) == list(range(50))


def test_ranks_split_the_global_batch():
    single = StepBatchSampler(40, batch_size=8, micro_batch_size=2, seed=1)
    ranks = [StepBatchSampler(40, batch_size=8, micro_batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert single.accumulation_steps == 4 and ranks[0].accumulation_steps == 2
    for step in range(12):
        whole = sorted(i for m in range(4) for i in single.micro_batch(step, m))
        split = sorted(i for r in ranks for m in range(2) for i in r.micro_batch(step, m))
        assert whole == split


def test_impossible_batch_geometry_is_explained():
    assert check_batch_geometry(32, 4, 2) == 4
    with pytest.raises(ValueError, match="not divisible by micro_batch_size \\* world_size"):
        check_batch_geometry(30, 4, 2)
    with pytest.raises(ValueError, match="positive"):
        check_batch_geometry(8, 0, 1)


def test_dataloader_yields_batches():
    packed = pack_sequences([list(range(1, 40))] * 5, seq_len=8, eos_id=EOS)
    loader = make_dataloader(PackedDataset(packed), batch_size=4, micro_batch_size=2, seed=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].dtype == torch.long
