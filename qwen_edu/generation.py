"""Autoregressive text generation: one prefill pass over the prompt, then one cached step per token.

Greedy decoding picks the arg-max; sampling applies temperature, then top-k, then top-p (the order
Hugging Face uses) and draws from the rest with an explicit ``torch.Generator`` for reproducibility.
Left-padded batches get the positions ``cumsum(mask) - 1`` (padding slots set to 1), as HF
``generate`` does, so each row is decoded exactly as if it were alone. Finished rows (that produced
an eos token) keep emitting ``pad_token_id`` until every row has finished or the budget is spent.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["generate", "stream_generate", "sample_next_token", "StreamChunk", "left_padded_positions"]


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class StreamChunk:
    """One generated token and the text it completed (``""`` while a multi-byte character is pending)."""

    token_id: int
    text: str


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: real tokens count from 0, padding slots get 1 (like HF)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def sample_next_token(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``logits [B, V]`` -> next token ids ``[B]``: arg-max, or a draw after temperature/top-k/top-p."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (keeps >= 1).
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _eos_ids(model: nn.Module, eos_token_id: int | Iterable[int] | None) -> list[int]:
    if eos_token_id is None:
        config = getattr(model, "config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _token_steps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int, eos_ids: list[int], pad_token_id: int | None,
                 sample: Callable[[torch.Tensor], torch.Tensor],
                 prefill_inputs: dict[str, Any] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ``[B]``, step by step (the engine behind both public APIs).

    ``prefill_inputs`` (images, grids, ...) go to the first forward pass only: a vision-language
    model encodes its images once, and every later step reads them from the cache like any token.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    batch = input_ids.shape[0]
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = attention_mask.to(device).long() if padded else None  # type: ignore[union-attr]
    # A model that derives its own position ids (M-RoPE) gets none from here, only the padding mask.
    own_positions = getattr(model, "computes_position_ids", False)
    positions = left_padded_positions(mask) if mask is not None and not own_positions else None
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}

    cache = None
    tokens = input_ids
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            extra = {**keep, **(prefill_inputs or {})} if cache is None else {}
            out = model(tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, **extra)
            cache = out.past_key_values
            next_tokens = sample(out.logits[:, -1, :])
            if eos is not None:
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
                finished = finished | torch.isin(next_tokens, eos)
        yield next_tokens
        if eos is not None and bool(finished.all()):
            return
        tokens = next_tokens[:, None]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1 if positions is not None else None


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None,
             streamer: Callable[[torch.Tensor], Any] | None = None,
             **model_inputs: Any) -> torch.Tensor:
    """Continue ``input_ids [B, L]`` by up to ``max_new_tokens``; return ``[B, L + new]``.

    ``attention_mask`` marks real tokens (1) in a left-padded batch. ``eos_token_id=None`` uses the
    model config's eos ids (``[]`` disables stopping). ``streamer`` is called with each new ``[B]``
    tensor of token ids as soon as it is chosen. With ``do_sample=False`` this is greedy decoding.
    Any other keyword (``pixel_values=``, ``image_grid_thw=``, ...) is passed to the model's first
    forward pass only, so the same function generates with text and vision-language models.
    """
    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                 top_p=top_p, generator=generator)

    new: list[torch.Tensor] = []
    for tokens in _token_steps(model, input_ids, attention_mask, max_new_tokens,
                               _eos_ids(model, eos_token_id), pad_token_id, sample, model_inputs):
        new.append(tokens)
        if streamer is not None:
            streamer(tokens)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)


def stream_generate(model: nn.Module, input_ids: torch.Tensor, tokenizer: Decoder | None = None, *,
                    max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    eos_token_id: int | Iterable[int] | None = None,
                    generator: torch.Generator | None = None) -> Iterator[StreamChunk]:
    """Yield :class:`StreamChunk` s for a single prompt (``[1, L]`` or ``[L]``) as tokens are generated.

    With a ``tokenizer`` (anything with ``decode(ids) -> str``) each chunk carries the newly completed
    text. The whole continuation is re-decoded every step and only the new suffix is emitted, because
    one character may span several byte-level tokens; a trailing U+FFFD (an incomplete UTF-8
    sequence) is held back until the next token completes it.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError("stream_generate handles one prompt at a time; use generate(streamer=...) for batches")

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                 top_p=top_p, generator=generator)

    ids: list[int] = []
    shown = ""
    for tokens in _token_steps(model, input_ids, None, max_new_tokens, _eos_ids(model, eos_token_id), None, sample):
        ids.append(int(tokens[0]))
        text = ""
        if tokenizer is not None:
            full = tokenizer.decode(ids)
            if not full.endswith("\ufffd") and full.startswith(shown):
                text, shown = full[len(shown):], full
        yield StreamChunk(ids[-1], text)
