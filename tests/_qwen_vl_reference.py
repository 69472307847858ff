"""A second, deliberately naive Qwen-VL, written from the reference code (``visual.py`` + ``modeling_qwen.py``).

transformers has no Qwen-VL class, so the tests compare ``qwen_edu`` against this rendering instead. It
shares no code with ``qwen_edu``: it reads a raw state dict in the *original* key layout
(``transformer.visual.*``, ``transformer.h.N.*``), runs the ViT sequence-first with ``bmm`` like the
reference, the resampler through ``torch.nn.MultiheadAttention`` itself, resizes position tables with the
reference's ``sqrt``-based ``get_abs_pos``, builds the sin-cos table with numpy's ``meshgrid(w, h)``, loads
pictures from the path bytes in the ids, and runs the Qwen-1 decoder op by op (fp32 RoPE, explicit causal
mask). :func:`make_tiny_qwen_vl_checkpoint` writes a random checkpoint in that layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

Tensor = torch.Tensor
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

TINY_VISUAL: dict[str, Any] = {"heads": 4, "image_size": 64, "layers": 2, "mlp_ratio": 2.5, "output_dim": 256,
                               "patch_size": 2, "width": 48, "image_start_id": 300}
TINY_TEXT: dict[str, Any] = {"vocab_size": 320, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "kv_channels": 64, "intermediate_size": 2 * 96, "layer_norm_epsilon": 1e-6,
                             "rotary_emb_base": 10000.0, "rotary_pct": 1.0, "seq_length": 2048,
                             "max_position_embeddings": 8192, "use_dynamic_ntk": True, "use_logn_attn": True,
                             "no_bias": True, "tie_word_embeddings": False}


# --- the checkpoint ---------------------------------------------------------------------------------
def tiny_qwen_vl_config(visual: dict[str, Any] | None = None, **text: Any) -> dict[str, Any]:
    """A Qwen-VL ``config.json`` dict as the remote code writes it (``model_type: "qwen"`` + ``visual``)."""
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", **TINY_TEXT, **text,
            "visual": {**TINY_VISUAL, **(visual or {})}}


def original_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of a Qwen-VL with this config and its shape (reference §5.2 and §11.3)."""
    v, h = config["visual"], config["hidden_size"]
    w, out, q = v["width"], v["output_dim"], v.get("n_queries", 256)
    mlp = int(w * v["mlp_ratio"])
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config["vocab_size"], h), "transformer.ln_f.weight": (h,),
        "lm_head.weight": (config["vocab_size"], h),
    }
    proj = config["num_attention_heads"] * config["kv_channels"]
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes |= {p + "ln_1.weight": (h,), p + "ln_2.weight": (h,), p + "attn.c_attn.weight": (3 * proj, h),
                   p + "attn.c_attn.bias": (3 * proj,), p + "attn.c_proj.weight": (h, proj),
                   p + "mlp.w1.weight": (config["intermediate_size"] // 2, h),
                   p + "mlp.w2.weight": (config["intermediate_size"] // 2, h),
                   p + "mlp.c_proj.weight": (h, config["intermediate_size"] // 2)}
    p = "transformer.visual."
    shapes |= {p + "conv1.weight": (w, 3, v["patch_size"], v["patch_size"]), p + "positional_embedding": (256, w),
               p + "ln_pre.weight": (w,), p + "ln_pre.bias": (w,), p + "ln_post.weight": (out,),
               p + "ln_post.bias": (out,), p + "proj": (out, out)}
    for i in range(v["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        shapes |= {b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                   b + "attn.in_proj.weight": (3 * w, w), b + "attn.in_proj.bias": (3 * w,),
                   b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                   b + "mlp.c_fc.weight": (mlp, w), b + "mlp.c_fc.bias": (mlp,),
                   b + "mlp.c_proj.weight": (w, mlp), b + "mlp.c_proj.bias": (w,)}
    a = p + "attn_pool."
    shapes |= {a + "query": (q, out), a + "pos_embed": (q, out), a + "attn.in_proj_weight": (3 * out, out),
               a + "attn.in_proj_bias": (3 * out,), a + "attn.out_proj.weight": (out, out),
               a + "attn.out_proj.bias": (out,), a + "ln_q.weight": (out,), a + "ln_q.bias": (out,),
               a + "ln_kv.weight": (out,), a + "ln_kv.bias": (out,)}
    if w != out:
        shapes[a + "kv_proj.weight"] = (out, w)
    return shapes


def random_original_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """Every tensor random (norm gains ``1 + N(0, 0.2)``, biases ``N(0, 0.2)``, matrices ``N(0, 1/fan_in)``).

    ``attn_pool.pos_embed`` gets the reference's sin-cos table: it is frozen in the reference, so a
    checkpoint always carries that exact table.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(original_shapes(config).items()):
        if key.endswith("attn_pool.pos_embed"):
            out[key] = torch.from_numpy(sincos_table_numpy(shape[1], int(math.isqrt(shape[0])))).float()
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif "ln" in key.rsplit(".", 2)[-2] and key.endswith("weight"):
            out[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.2 * torch.randn(shape, generator=gen)
    return out


def make_tiny_qwen_vl_checkpoint(folder: str | Path, *, seed: int = 0, visual: dict[str, Any] | None = None,
                                 **text: Any) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of a random Qwen-VL in the original layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen_vl_config(visual, **text)
    save_file(random_original_state_dict(config, seed), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# --- the vision tower ---------------------------------------------------------------------------------
def image_transform(path_or_image: Any, size: int) -> Tensor:
    """``Resize((S, S), BICUBIC)`` on the PIL image, ``ToTensor``, ``Normalize(CLIP)``, with numpy."""
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def sincos_table_numpy(embed_dim: int, grid_size: int) -> np.ndarray:
    """The MAE/Qwen-VL ``get_2d_sincos_pos_embed`` (float32 numpy, ``meshgrid(w, h)``)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def get_abs_pos(abs_pos: Tensor, tgt_size: int) -> Tensor:
    """The reference: infer both grids with ``sqrt``, bicubic in fp32, cast back; unchanged if equal."""
    src, tgt = int(math.sqrt(abs_pos.size(0))), int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    image = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    return F.interpolate(image, size=(tgt, tgt), mode="bicubic", align_corners=False).permute(
        0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


def layer_norm(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-6)


def visual_attention(x: Tensor, sd: dict[str, Tensor], prefix: str, heads: int) -> Tensor:
    """``VisualAttention.forward`` on ``x [L, B, C]``: head-interleaved in_proj, bmm, softmax in x's dtype."""
    sq, b, width = x.shape
    hn = width // heads
    mixed = F.linear(x, sd[prefix + "in_proj.weight"], sd[prefix + "in_proj.bias"])
    mixed = mixed.view(sq, b, heads, 3 * hn)
    q, k, v = mixed.split(hn, dim=-1)
    q = q.reshape(sq, b * heads, hn).transpose(0, 1)
    k = k.reshape(sq, b * heads, hn).transpose(0, 1)
    v = v.reshape(sq, b * heads, hn).transpose(0, 1)
    probs = torch.bmm(q / math.sqrt(hn), k.transpose(-2, -1)).softmax(dim=-1)
    ctx = torch.bmm(probs, v).view(b, heads, sq, hn).permute(2, 0, 1, 3).contiguous().view(sq, b, width)
    return F.linear(ctx, sd[prefix + "out_proj.weight"], sd[prefix + "out_proj.bias"])


def vit_block(x: Tensor, sd: dict[str, Tensor], prefix: str, heads: int) -> Tensor:
    """``VisualAttentionBlock.forward`` on ``x [L, B, C]``."""
    x = x + visual_attention(layer_norm(x, sd, prefix + "ln_1"), sd, prefix + "attn.", heads)
    h = F.linear(layer_norm(x, sd, prefix + "ln_2"), sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])
    return x + F.linear(F.gelu(h), sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])


def resampler(x: Tensor, sd: dict[str, Tensor], prefix: str, num_heads: int) -> Tensor:
    """``Resampler.forward`` on ``x [B, L, width]`` with a real ``nn.MultiheadAttention`` (packed layout)."""
    embed_dim = sd[prefix + "query"].shape[1]
    with torch.device("meta"):  # shapes only: the weights come from sd (no costly random init)
        attn = torch.nn.MultiheadAttention(embed_dim, num_heads)
    attn.load_state_dict({k.removeprefix(prefix + "attn."): t for k, t in sd.items() if k.startswith(prefix + "attn.")},
                         assign=True)
    pos = sd[prefix + "pos_embed"]
    key_pos = get_abs_pos(pos, x.size(1))
    if prefix + "kv_proj.weight" in sd:
        x = F.linear(x, sd[prefix + "kv_proj.weight"])
    x = layer_norm(x, sd, prefix + "ln_kv").permute(1, 0, 2)
    n = x.shape[1]
    q = layer_norm(sd[prefix + "query"], sd, prefix + "ln_q")
    out = attn(q.unsqueeze(1).repeat(1, n, 1) + pos.unsqueeze(1), x + key_pos.unsqueeze(1), x)[0]
    return out.permute(1, 0, 2)


def visual_forward(pixels: Tensor, sd: dict[str, Tensor], visual: dict[str, Any],
                   prefix: str = "transformer.visual.") -> Tensor:
    """``VisionTransformer.forward``: pixels ``[N, 3, S, S]`` -> ``[N, n_queries, output_dim]``."""
    x = F.conv2d(pixels, sd[prefix + "conv1.weight"], stride=visual["patch_size"])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = x + get_abs_pos(sd[prefix + "positional_embedding"], x.size(1))
    x = layer_norm(x, sd, prefix + "ln_pre").permute(1, 0, 2)
    for i in range(visual["layers"]):
        x = vit_block(x, sd, f"{prefix}transformer.resblocks.{i}.", visual["heads"])
    x = resampler(x.permute(1, 0, 2), sd, prefix + "attn_pool.", visual["output_dim"] // 128)
    return layer_norm(x, sd, prefix + "ln_post") @ sd[prefix + "proj"]


# --- the language model ---------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rotate(t: Tensor, base: float) -> Tensor:
    """Qwen-1 RoPE on ``t [B, L, heads, d]`` at positions 0..L-1: fp32 table and rotation, half split."""
    d, length = t.shape[-1], t.shape[1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    t32 = t.float()
    half = torch.cat([-t32[..., d // 2:], t32[..., :d // 2]], dim=-1)
    return (t32 * emb.cos() + half * emb.sin()).type_as(t)


def splice_images(input_ids: Tensor, embeds: Tensor, sd: dict[str, Tensor], config: dict[str, Any]) -> Tensor:
    """The reference's first-pass image step: read paths from the ids, encode, overwrite slots a+1 .. b-1."""
    start = config["visual"]["image_start_id"]
    if not torch.any(input_ids == start):
        return embeds
    bos, eos = torch.where(input_ids == start), torch.where(input_ids == start + 1)
    assert (bos[0] == eos[0]).all()
    spans = torch.stack((bos[0], bos[1], eos[1]), dim=1)
    paths = []
    for i, a, b in spans.tolist():
        span = input_ids[i][a + 1:b - 1].tolist()
        paths.append(bytes(span[:span.index(start + 2)]).decode("utf-8"))
    size = config["visual"]["image_size"]
    images = visual_forward(torch.stack([image_transform(p, size) for p in paths]), sd, config["visual"])
    embeds = embeds.clone()
    for k, (i, a, b) in enumerate(spans.tolist()):
        embeds[i][a + 1:b] = images[k]
    return embeds


def qwen_vl_logits(input_ids: Tensor, sd: dict[str, Tensor], config: dict[str, Any]) -> Tensor:
    """Logits ``[B, L, vocab]`` of ``QWenLMHeadModel.forward`` (no cache, L <= seq_length so no NTK/logN)."""
    assert input_ids.shape[1] <= config["seq_length"]
    eps, heads, d = config["layer_norm_epsilon"], config["num_attention_heads"], config["kv_channels"]
    x = splice_images(input_ids, F.embedding(input_ids, sd["transformer.wte.weight"]), sd, config)
    b, length, _ = x.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, sd[p + "ln_1.weight"], eps)
        q, k, v = F.linear(h, sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]).split(heads * d, dim=-1)
        q, k, v = (t.view(b, length, heads, d) for t in (q, k, v))
        q, k = rotate(q, config["rotary_emb_base"]), rotate(k, config["rotary_emb_base"])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, length, heads * d)
        x = x + F.linear(attn, sd[p + "attn.c_proj.weight"])
        h = rms_norm(x, sd[p + "ln_2.weight"], eps)
        gated = F.linear(h, sd[p + "mlp.w1.weight"]) * F.silu(F.linear(h, sd[p + "mlp.w2.weight"]))
        x = x + F.linear(gated, sd[p + "mlp.c_proj.weight"])
    return F.linear(rms_norm(x, sd["transformer.ln_f.weight"], eps), sd["lm_head.weight"])


def greedy(input_ids: Tensor, sd: dict[str, Tensor], config: dict[str, Any], steps: int) -> Tensor:
    """Greedy decoding by recomputing the whole sequence each step (no cache at all)."""
    ids = input_ids
    for _ in range(steps):
        ids = torch.cat([ids, qwen_vl_logits(ids, sd, config)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
