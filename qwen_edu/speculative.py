"""Self-speculative decoding with a multi-token-prediction (MTP) head (Qwen3-Next).

A decoder produces one token per forward pass, and for small batches that pass is bound by reading
the weights, not by arithmetic: checking 2-4 tokens in one pass costs about as much as producing one.
Speculative decoding exploits that. A cheap *drafter* guesses the next ``k`` tokens; one forward pass
of the full model over ``[pending, d_1, ..., d_k]`` *verifies* them all; the longest prefix of drafts
that equals the model's own greedy choices is accepted, plus one more token from the model itself.
Every round therefore emits between 1 and ``k + 1`` tokens, and the output is *exactly* the greedy
output of the full model (tests): only the speed changes.

Here the drafter is the model's own MTP head (``mtp.*``), trained to predict token t+2 from the main
model's hidden state at t and token t+1: no second model to load. Drafting ``k > 1`` tokens chains
the head on its own output (as vLLM does). Rejected drafts must be forgotten: full-attention layers
drop their KV rows; Gated DeltaNet layers, whose state cannot be "un-added", restore the state saved
after the last accepted token (:meth:`~qwen_edu.models.qwen3_next.HybridCache.crop`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen_edu.models.layers import KVCache
from qwen_edu.models.qwen3_next import Qwen3NextForCausalLM

__all__ = ["SpeculativeResult", "mtp_speculative_generate", "compare_speed"]


@dataclass
class SpeculativeResult:
    """Tokens ``[1, prompt + new]`` plus what the drafter achieved."""

    tokens: torch.Tensor
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # verification passes of the full model (its prefill not counted)
    accepted_per_round: list[int] = field(default_factory=list)
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verification pass (1.0 = no gain; at most k + 1); the prefill's token aside."""
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0


@torch.inference_mode()
def mtp_speculative_generate(model: Qwen3NextForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = 32,
                             num_draft: int = 1, eos_token_id: int | Iterable[int] | None = None,
                             ) -> SpeculativeResult:
    """Greedy decoding of one prompt ``[1, L]`` with ``num_draft`` MTP drafts verified per pass.

    Equals ``qwen_edu.generate(model, input_ids, max_new_tokens, eos_token_id=...)`` token for token.
    ``eos_token_id=None`` uses the config's eos ids (``[]`` disables stopping).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding here takes one prompt [1, L], got shape {tuple(input_ids.shape)}")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    if model.mtp is None:
        raise ValueError("the model has no MTP head (config.mtp_num_hidden_layers == 0)")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_ids
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    result = SpeculativeResult(tokens=input_ids)
    if max_new_tokens <= 0:
        return result

    cache = model.model.new_cache()
    mtp_cache = cache.mtp = KVCache(len(model.mtp.layers))
    out = model(input_ids, cache=cache)                              # prefill
    hidden = out.last_hidden_state                                   # [1, L, H]: positions 0..L-1
    pending = out.logits[:, -1].argmax(-1, keepdim=True)             # x_L, chosen by the full model
    new: list[int] = [int(pending)]
    pair_tokens = torch.cat([input_ids[:, 1:], pending], dim=1)      # MTP pairs (h_p, x_{p+1})
    while len(new) < max_new_tokens and new[-1] not in eos:
        # Draft: the MTP head reads the true pairs not yet given to it, then chains on its own guesses.
        drafts: list[torch.Tensor] = []
        mtp_hidden = model.mtp_hidden_states(hidden, pair_tokens, mtp_cache)[:, -1:]
        true_len = mtp_cache.get_seq_length()
        for step in range(num_draft):
            drafts.append(model.lm_head(mtp_hidden).argmax(-1))
            if step + 1 < num_draft:
                mtp_hidden = model.mtp_hidden_states(mtp_hidden, drafts[-1], mtp_cache)
        draft = torch.cat(drafts, dim=1)                             # [1, k]
        # Verify all drafts in one pass of the full model (keeping DeltaNet states for a rollback).
        past = cache.get_seq_length()
        cache.keep_history(True)
        verify = model(torch.cat([pending, draft], dim=1), cache=cache)
        choice = verify.logits.argmax(-1)                            # [1, k + 1]: the model's own picks
        matches = (choice[:, :-1] == draft)[0].tolist() + [False]
        accepted = matches.index(False)
        cache.crop(past + 1 + accepted)
        cache.keep_history(False)
        mtp_cache.crop(true_len)                                     # forget the chained draft entries
        result.drafted += num_draft
        result.accepted += accepted
        result.rounds += 1
        result.accepted_per_round.append(accepted)
        emitted = [*draft[0, :accepted].tolist(), int(choice[0, accepted])]
        pair_tokens = torch.tensor([emitted], device=input_ids.device)
        hidden = verify.last_hidden_state[:, :accepted + 1]
        pending = pair_tokens[:, -1:]
        for token in emitted:
            new.append(token)
            if token in eos or len(new) == max_new_tokens:
                break
    result.new_tokens = len(new)
    result.tokens = torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)],
                              dim=1)
    return result


def compare_speed(model: Qwen3NextForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = 64,
                  num_draft: int = 1, repeats: int = 3) -> dict[str, float]:
    """Median CPU time of plain greedy :func:`qwen_edu.generate` and of MTP speculative decoding.

    CPU time of this process (all its threads), so that other programs on a shared machine do not
    slow one side more than the other; the runs alternate for the same reason. Both run with eos
    disabled so they produce the same number of tokens; returns tokens/s of each, the speed-up, and
    the acceptance rate.
    """
    from qwen_edu.generation import generate

    runs = {"plain": lambda: generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=[]),
            "spec": lambda: mtp_speculative_generate(model, input_ids, max_new_tokens, num_draft, eos_token_id=[])}
    times: dict[str, list[float]] = {name: [] for name in runs}
    values: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.process_time()
            values[name] = fn()
            times[name].append(time.process_time() - start)
    plain_s, spec_s = (sorted(times[name])[len(times[name]) // 2] for name in runs)
    plain, spec = values["plain"], values["spec"]
    if not torch.equal(plain, spec.tokens):
        raise AssertionError("speculative decoding changed the greedy output")
    return {"plain_tok_s": max_new_tokens / plain_s, "speculative_tok_s": max_new_tokens / spec_s,
            "speedup": plain_s / spec_s, "acceptance_rate": spec.acceptance_rate,
            "tokens_per_round": spec.tokens_per_round}
