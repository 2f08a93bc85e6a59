"""Attention weights made visible: softmax(Q·Kᵀ/√Dh + mask) for every layer and head.

The model computes attention through the fused `scaled_dot_product_attention`, which never
materialises the weights. Here the same forward pass is walked layer by layer with the model's
own modules, and at each attention the weights are computed explicitly from the same Q and K
(so they are exactly what the fused kernel applies). Drawing them is `plots`' job.

Shapes: L layers, H heads, S source tokens, T target tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nmt.model import Transformer, split_heads


@dataclass
class AttentionMaps:
    src_tokens: list[str]
    tgt_tokens: list[str]  # the decoder's inputs: <s> then the translation
    encoder: Tensor  # [L, H, S, S]
    decoder: Tensor  # [L, H, T, T]
    cross: Tensor  # [L, H, T, S]


def weights(q: Tensor, k: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """softmax(Q Kᵀ / √Dh) with padding mask (True = attend) or causal mask: [B, H, Tq, Tk]."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        t_q, t_k = scores.shape[-2:]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1)


def _normed(residual, x: Tensor) -> Tensor:
    """What the sublayer sees: the normalised input (pre-norm) or the input itself (post-norm)."""
    return residual.norm(x) if residual.pre_norm else x


@torch.inference_mode()
def attention_maps(model: Transformer, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Encoder self-, decoder self- and cross-attention weights for one pair (batch of 1)."""
    model.eval()
    h = model.config.n_heads
    mask = model.src_mask(src)
    x = model.embed(model.src_embed, src)
    enc = []
    for layer in model.encoder:
        q, k, _ = (split_heads(t, h) for t in layer.attn.qkv(_normed(layer.res1, x)).chunk(3, dim=-1))
        enc.append(weights(q, k, mask)[0])
        x = layer(x, mask)
    memory = model.encoder_norm(x)
    y = model.embed(model.tgt_embed, tgt_in)
    dec, cross = [], []
    for layer in model.decoder:
        q, k, _ = (split_heads(t, h) for t in layer.self_attn.qkv(_normed(layer.res1, y)).chunk(3, dim=-1))
        dec.append(weights(q, k, causal=True)[0])
        mem_k, mem_v = layer.cross_attn.memory_kv(memory)
        after_self = layer.res1(y, lambda z: layer.self_attn(z, causal=True))
        q = split_heads(layer.cross_attn.q(_normed(layer.res2, after_self)), h)
        cross.append(weights(q, mem_k, mask)[0])
        y = layer(y, mem_k, mem_v, mask)
    return torch.stack(enc), torch.stack(dec), torch.stack(cross)


def maps_for_sentence(model: Transformer, vocabs, sentence: str, translation_ids: list[int]) -> AttentionMaps:
    """Maps for a source sentence and the ids of its translation (without BOS/EOS)."""
    from nmt.tokenizer import BOS_ID, EOS_ID

    src_ids = vocabs.src.encode(sentence, add_special_tokens=False).ids + [EOS_ID]
    tgt_ids = [BOS_ID] + translation_ids
    enc, dec, cross = attention_maps(model, torch.tensor([src_ids]), torch.tensor([tgt_ids]))
    return AttentionMaps([vocabs.src.id_to_token(i) for i in src_ids], [vocabs.tgt.id_to_token(i) for i in tgt_ids],
                         enc.float(), dec.float(), cross.float())
