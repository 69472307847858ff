"""From documents to training batches: packing, the train/validation split, and a resumable loader.

**Packing.** Pre-training does not pad documents to a common length. It concatenates them into one
token stream with an end-of-text id after every document, and cuts the stream into rows of exactly
``seq_len`` tokens (:func:`pack_sequences`). A row may start in the middle of one document and end in
the middle of another; the separator tells the model where one text stops. Only the last row can be
short: it is padded on the right, and its padding gets the label ``-100`` (ignored by the loss).
Because attention is causal, right padding needs no attention mask -- no real token can see it.

**Order.** :class:`StepBatchSampler` makes the data order a pure function of ``(seed, step)``:
epoch ``e`` visits the rows in the order ``randperm(n, seed + e)``, and optimizer step ``s`` takes the
next ``batch_size`` rows of that endless stream. Each micro-batch of each rank is a fixed slice of
that step's rows. So resuming at step ``s`` is simply "start the sampler at ``s``" -- no iterator
state to save -- and 1 process with 4 accumulation steps sees exactly the rows that 2 processes
with 2 accumulation steps see.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "IGNORE_INDEX",
    "PackedSequences",
    "pack_sequences",
    "split_documents",
    "PackedDataset",
    "StepBatchSampler",
    "make_dataloader",
    "tokenize_documents",
]

IGNORE_INDEX = -100


@dataclass
class PackedSequences:
    """``input_ids [N, seq_len]`` and ``labels [N, seq_len]`` (``-100`` on padding); unshifted."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.labels != IGNORE_INDEX).sum())


def pack_sequences(documents: Iterable[Sequence[int]], seq_len: int, eos_id: int, *,
                   pad_id: int | None = None, drop_last: bool = False) -> PackedSequences:
    """Concatenate ``doc + [eos_id]`` for every document and cut the stream into rows of ``seq_len``.

    The last, shorter row is kept and right-padded with ``pad_id`` (default ``eos_id``) whose labels
    are ``IGNORE_INDEX``, so no token is lost; ``drop_last=True`` drops it instead. Raises
    ``ValueError`` when there is not enough text for one full row -- training on a corpus shorter
    than a single sequence is almost always a mistake (an empty file, a wrong path).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one input and one target), got {seq_len}")
    stream: list[int] = []
    n_docs = 0
    for doc in documents:
        stream.extend(int(t) for t in doc)
        stream.append(eos_id)
        n_docs += 1
    if len(stream) < seq_len:
        raise ValueError(
            f"the corpus has {len(stream)} tokens ({n_docs} documents incl. separators), fewer than one "
            f"sequence of seq_len={seq_len}; generate more text or lower seq_len"
        )
    n_full, rest = divmod(len(stream), seq_len)
    tokens = torch.tensor(stream, dtype=torch.long)
    ids = tokens[: n_full * seq_len].view(n_full, seq_len)
    labels = ids.clone()
    if rest and not drop_last:
        pad = eos_id if pad_id is None else pad_id
        last = torch.full((1, seq_len), pad, dtype=torch.long)
        last[0, :rest] = tokens[n_full * seq_len:]
        last_labels = torch.full((1, seq_len), IGNORE_INDEX, dtype=torch.long)
        last_labels[0, :rest] = tokens[n_full * seq_len:]
        ids, labels = torch.cat([ids, last]), torch.cat([labels, last_labels])
    return PackedSequences(ids, labels)


def split_documents(documents: Sequence[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """``(train, validation)``: the last ``val_fraction`` of the documents is held out.

    The split is by document, before packing, so no validation text leaks into a training row.
    The generated corpus is already in random order, so "the last 5%" is a random 5%.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(len(documents) * val_fraction))
    if n_val >= len(documents):
        raise ValueError(f"{len(documents)} documents are too few to hold out {val_fraction:.0%} for validation")
    return list(documents[:-n_val]), list(documents[-n_val:])


def tokenize_documents(tokenizer, documents: Iterable[str]) -> list[list[int]]:
    """``tokenizer.encode`` each document as plain text (special-token strings are not parsed)."""
    encode = getattr(tokenizer, "encode_ordinary", None) or tokenizer.encode
    return [encode(doc) for doc in documents]


class PackedDataset(Dataset):
    """Rows of a :class:`PackedSequences`; item ``i`` is ``{"input_ids": [L], "labels": [L]}``."""

    def __init__(self, packed: PackedSequences) -> None:
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.packed.input_ids[i], "labels": self.packed.labels[i]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:  # one gather per batch
        index = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": self.packed.input_ids[index], "labels": self.packed.labels[index]}

    @property
    def seq_len(self) -> int:
        return self.packed.input_ids.shape[1]


def _identity(batch):  # a module-level function, so DataLoader workers can pickle it
    return batch


class StepBatchSampler(Sampler[list[int]]):
    """Yields the micro-batches (lists of row indices) of one rank, step after step, forever.

    Global step ``s`` owns positions ``[s * batch_size, (s + 1) * batch_size)`` of the stream
    ``randperm(n, seed) ++ randperm(n, seed + 1) ++ ...``. Within a step, micro-batch ``m`` of rank
    ``r`` is the slice starting at ``(m * world_size + r) * micro_batch_size``.
    """

    def __init__(self, num_rows: int, batch_size: int, micro_batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_step: int = 0) -> None:
        check_batch_geometry(batch_size, micro_batch_size, world_size)
        if num_rows < 1:
            raise ValueError("the dataset is empty")
        self.num_rows, self.batch_size, self.micro_batch_size = num_rows, batch_size, micro_batch_size
        self.seed, self.rank, self.world_size, self.start_step = seed, rank, world_size, start_step
        self.accumulation_steps = batch_size // (micro_batch_size * world_size)
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_rows, generator=gen), epoch
        return self._perm

    def _positions(self, start: int, count: int) -> list[int]:
        out: list[int] = []
        while count:
            epoch, offset = divmod(start, self.num_rows)
            take = min(count, self.num_rows - offset)
            out.extend(self._permutation(epoch)[offset:offset + take].tolist())
            start, count = start + take, count - take
        return out

    def micro_batch(self, step: int, micro: int) -> list[int]:
        """Row indices of micro-batch ``micro`` of this rank at optimizer step ``step``."""
        offset = (micro * self.world_size + self.rank) * self.micro_batch_size
        return self._positions(step * self.batch_size + offset, self.micro_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for micro in range(self.accumulation_steps):
                yield self.micro_batch(step, micro)
            step += 1

    def __len__(self) -> int:  # one epoch's worth of steps, for progress displays
        return math.ceil(self.num_rows / self.batch_size) * self.accumulation_steps


def check_batch_geometry(batch_size: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Return the gradient-accumulation steps, or explain why the batch cannot be split that way."""
    for name, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size),
                        ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    per_pass = micro_batch_size * world_size
    if batch_size % per_pass:
        raise ValueError(
            f"global batch_size={batch_size} is not divisible by micro_batch_size * world_size = "
            f"{micro_batch_size} * {world_size} = {per_pass}: every optimizer step must consist of whole "
            "micro-batches on every process. Choose batch_size as a multiple of "
            f"{per_pass} (e.g. {max(per_pass, batch_size // per_pass * per_pass)}) or change micro_batch_size."
        )
    return batch_size // per_pass


def make_dataloader(dataset: PackedDataset, batch_size: int, micro_batch_size: int, *, seed: int = 0,
                    rank: int = 0, world_size: int = 1, start_step: int = 0, num_workers: int = 0) -> DataLoader:
    """An endless DataLoader of this rank's micro-batches, starting at optimizer step ``start_step``."""
    sampler = StepBatchSampler(len(dataset), batch_size, micro_batch_size, seed=seed, rank=rank,
                               world_size=world_size, start_step=start_step)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_identity, num_workers=num_workers)
