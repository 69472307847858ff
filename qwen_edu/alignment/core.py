"""Building blocks shared by SFT, reward modelling, PPO and DPO.

* :func:`token_logprobs` -- ``log p(token_t | tokens_<t)`` from logits, by ``log_softmax`` + ``gather``;
* :func:`sequence_logprobs` -- one forward pass of a causal LM over ``prompt + response`` and the
  log-probabilities of the response tokens only (padding and prompt masked out);
* :func:`masked_mean`, :func:`masked_whiten` -- statistics over the real tokens of a padded batch;
* :func:`entropy_from_logits` -- per-position entropy of the next-token distribution;
* :func:`kl_from_logits`, :func:`reply_kl` -- the exact per-token ``KL(pi || pi_ref)`` over the whole
  vocabulary, and its sum along each reply (how far a policy has moved from its reference);
* :func:`check_same_architecture` -- refuses a reference model that is not a copy of the policy's shape;
* :func:`frozen_copy` -- a deep copy in eval mode with gradients switched off (the reference model).

Position convention: for a sequence of ``L`` tokens, next-token quantities have ``L - 1`` entries;
entry ``t`` is about token ``t + 1`` (predicted at position ``t``). Masks are given per *token*
(``[B, L]``, like ``input_ids``) and shifted here, so that callers never have to think about it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.generation import left_padded_positions

__all__ = [
    "token_logprobs",
    "entropy_from_logits",
    "kl_from_logits",
    "forward_logits",
    "reply_kl",
    "sequence_logprobs",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "check_same_architecture",
    "frozen_copy",
    "Responses",
    "generate_responses",
    "pad_id_of",
]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` and ``tokens [...]`` -> ``log softmax(logits)[token]`` (fp32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H = logsumexp(z) - sum softmax(z) z`` per position (fp32)."""
    logits = logits.float()
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per position, ``p = softmax(logits)``,
    ``q = softmax(ref_logits)`` (fp32; ``[..., V]`` -> ``[...]``).

    Unlike the sampled estimators of :func:`~qwen_edu.alignment.ppo.kl_penalty`, which look at one
    token, this sums over the whole vocabulary, so it is the KL of the next-token distributions
    themselves: never negative, and 0 only where the two distributions agree.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits of a (possibly left- and right-padded) batch; positions count real tokens only."""
    if attention_mask is None:
        return model(input_ids).logits
    positions = left_padded_positions(attention_mask)
    return model(input_ids, attention_mask=attention_mask, position_ids=positions).logits


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      response_mask: torch.Tensor, *, reduce: str = "sum", return_entropy: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens of ``input_ids [B, L]`` under ``model``.

    ``response_mask [B, L]`` is 1 on the tokens to score (the reply and its ``<|im_end|>``).
    ``reduce="sum"`` returns ``[B]`` (the log-probability of the whole reply: what DPO compares);
    ``reduce="none"`` returns ``[B, L - 1]`` per-token values, 0 outside the mask (what PPO needs).
    With ``return_entropy`` the per-position entropies ``[B, L - 1]`` come too (masked the same way).
    """
    if reduce not in ("sum", "none", "mean"):
        raise ValueError(f"reduce must be 'sum', 'mean' or 'none', got {reduce!r}")
    if response_mask.shape != input_ids.shape:
        raise ValueError(f"response_mask {tuple(response_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    logits = forward_logits(model, input_ids, attention_mask)[:, :-1]
    mask = response_mask[:, 1:].float()
    logp = token_logprobs(logits, input_ids[:, 1:]) * mask
    if reduce == "sum":
        out = logp.sum(-1)
    elif reduce == "mean":
        out = logp.sum(-1) / mask.sum(-1).clamp_min(1)
    else:
        out = logp
    if return_entropy:
        return out, entropy_from_logits(logits) * mask
    return out


@torch.no_grad()
def reply_kl(model: nn.Module, ref_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: the exact per-token KL of ``model`` from ``ref_model``, summed along each reply.

    Entry ``b`` is ``sum_t KL(pi(. | y_<t) || pi_ref(. | y_<t))`` over the reply tokens of row ``b``
    (``response_mask``, as in :func:`sequence_logprobs`). When the replies are *sampled from*
    ``model``, its mean is an unbiased estimate of the sequence-level ``KL(pi || pi_ref)`` (the chain
    rule of KL: the sequence KL is the expected sum of the per-token KLs along the policy's own
    samples), with less variance than the one-token estimates ``k1``/``k3``. Along a greedy reply it
    is only the per-token KL at the states that one reply visits, not an estimate of the KL.
    """
    if response_mask.shape != input_ids.shape:
        raise ValueError(f"response_mask {tuple(response_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    logits = forward_logits(model, input_ids, attention_mask)[:, :-1]
    ref_logits = forward_logits(ref_model, input_ids, attention_mask)[:, :-1]
    return (kl_from_logits(logits, ref_logits) * response_mask[:, 1:].float()).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (``shift_mean=False`` keeps the mean); 0 outside."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_same_architecture(policy: nn.Module, reference: nn.Module, what: str = "reference model") -> None:
    """Raise ``ValueError`` unless ``reference`` has the policy's config shape and parameter shapes.

    A KL penalty or a DPO log-ratio between models with different vocabularies compares
    probabilities of different tokens: the error names the first fields that differ.
    """
    pc, rc = getattr(policy, "config", None), getattr(reference, "config", None)
    if pc is not None and rc is not None:
        diffs = [f"{f}: policy {getattr(pc, f, None)!r} vs {what} {getattr(rc, f, None)!r}"
                 for f in _SHAPE_FIELDS if getattr(pc, f, None) != getattr(rc, f, None)]
        if diffs:
            raise ValueError(f"the {what} has another shape than the policy ({'; '.join(diffs)}); "
                             "it must be a copy of the policy's starting point")
    ps = {n: tuple(p.shape) for n, p in policy.named_parameters()}
    rs = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    if ps != rs:
        names = sorted(set(ps) ^ set(rs)) or [n for n in ps if ps[n] != rs.get(n)]
        detail = ", ".join(f"{n}: {ps.get(n)} vs {rs.get(n)}" for n in names[:4])
        raise ValueError(f"the {what} has other parameters than the policy ({detail})")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` everywhere (a reference model)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pad_id_of(tokenizer: Any) -> int:
    """The padding id: ``<|endoftext|>`` if the tokenizer has it, else ``<|im_end|>`` (never a target)."""
    specials = tokenizer.special_tokens
    for name in ("<|endoftext|>", "<|im_end|>"):
        if name in specials:
            return int(specials[name])
    raise ValueError("tokenizer has neither <|endoftext|> nor <|im_end|> to pad with")


@dataclass
class Responses:
    """A generated batch laid out as ``[left-padded prompt | response, right-padded after the stop token]``.

    ``input_ids``, ``attention_mask`` and ``response_mask`` are ``[B, P + R]``; the response tokens
    are ``input_ids[:, P:]`` (``P = prompt_length``). ``response_mask`` is 1 on the generated tokens
    up to and including the stop token; ``finished`` says which rows produced the stop token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int
    finished: torch.Tensor

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def texts(self, tokenizer: Any) -> list[str]:
        """The replies as text, without the stop token."""
        out = []
        for ids, mask in zip(self.response_ids.tolist(), self.response_mask[:, self.prompt_length:].tolist()):
            kept = [t for t, m in zip(ids, mask) if m]
            out.append(tokenizer.decode(kept, skip_special_tokens=True))
        return out


@torch.no_grad()
def generate_responses(model: nn.Module, prompts: list[list[int]], *, pad_id: int, stop_id: int,
                       max_new_tokens: int = 24, do_sample: bool = False, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None) -> Responses:
    """Left-pad ``prompts``, decode with the KV cache (:func:`qwen_edu.generate`), mark the responses.

    Rows stop at ``stop_id`` (``<|im_end|>``); what follows it is padding, outside every mask.
    """
    from qwen_edu.alignment.data import pad_batch
    from qwen_edu.generation import generate

    device = next(model.parameters()).device
    batch = pad_batch(prompts, pad_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    was_training = model.training
    model.eval()
    try:
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=[stop_id],
                       pad_token_id=pad_id, generator=generator)
    finally:
        model.train(was_training)
    prompt_length = ids.shape[1]
    response = out[:, prompt_length:]
    is_stop = response == stop_id
    # 1 up to and including the first stop token: "no stop token strictly before this position".
    before = is_stop.long().cumsum(-1) - is_stop.long()
    resp_mask = (before == 0).long()
    full_mask = torch.cat([mask, resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(mask), resp_mask], dim=1)
    return Responses(out, full_mask, response_mask, prompt_length, is_stop.any(-1))
