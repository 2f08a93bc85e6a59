"""Attention maps: softmax(Q·Kᵀ/√Dh + mask) for every layer and head of one pair (pictures), and
the cross-attention of a batch of hypotheses that word alignments are read from.

The model computes attention through the fused `scaled_dot_product_attention`, which never
materialises the weights. Here the same forward pass is walked layer by layer with the model's
own modules, and at each attention the weights are computed with the model's own explicit
formula (`model.attention_weights`) from the same Q and K, so they are exactly what the fused
kernel applies. The pair's tensors come from the one batch builder, so a source longer than the
model's positions is cut as `nmt translate` cuts it. Drawing the maps is `plots`' job; turning
cross-attention into word alignments is `alignment`'s.

The cross-attention of a finished hypothesis, recomputed here by teacher forcing, is what the
search computed along that hypothesis' path (the decoder cache equals full recomputation), so
alignments cost one parallel decoder pass per batch, only when asked for, and no change to the
search loop.

Shapes: L layers, H heads, S source tokens, T target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nmt.batching import pad_batch
from nmt.model import Transformer, attention_weights, eval_mode, split_heads


@dataclass
class AttentionMaps:
    src_tokens: list[str]
    tgt_tokens: list[str]  # the decoder's inputs: <s> then the translation
    encoder: Tensor  # [L, H, S, S]
    decoder: Tensor  # [L, H, T, T]
    cross: Tensor  # [L, H, T, S]


def _normed(residual, x: Tensor) -> Tensor:
    """What the sublayer sees: the normalised input (pre-norm) or the input itself (post-norm)."""
    return residual.norm(x) if residual.pre_norm else x


@torch.inference_mode()
def attention_maps(model: Transformer, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Encoder self-, decoder self- and cross-attention weights for one pair (batch of 1)."""
    with eval_mode(model):
        h = model.config.n_heads
        mask = model.src_mask(src)
        x = model.embed(model.src_embed, src)
        enc = []
        for layer in model.encoder:
            q, k, _ = (split_heads(t, h) for t in layer.attn.qkv(_normed(layer.res1, x)).chunk(3, dim=-1))
            enc.append(attention_weights(q, k, mask)[0])
            x = layer(x, mask)
        dec, cross = decoder_maps(model, model.encoder_norm(x), mask, tgt_in, with_self=True)
    return torch.stack(enc), dec[:, 0], cross[:, 0]


def decoder_maps(model: Transformer, memory: Tensor, mask: Tensor, tgt_in: Tensor, with_self: bool = False
                 ) -> tuple[Tensor | None, Tensor]:
    """Teacher forcing over tgt_in [B, T]: decoder self-attention [L, B, H, T, T] (with_self) and
    cross-attention [L, B, H, T, S] weights of every layer."""
    h = model.config.n_heads
    y = model.embed(model.tgt_embed, tgt_in)
    dec, cross = [], []
    for layer in model.decoder:
        if with_self:
            q, k, _ = (split_heads(t, h) for t in layer.self_attn.qkv(_normed(layer.res1, y)).chunk(3, dim=-1))
            dec.append(attention_weights(q, k, causal=True))
        mem_k, mem_v = layer.cross_attn.memory_kv(memory)
        after_self = layer.res1(y, lambda z: layer.self_attn(z, causal=True))
        q = split_heads(layer.cross_attn.q(_normed(layer.res2, after_self)), h)
        cross.append(attention_weights(q, mem_k, mask))
        y = layer(y, mem_k, mem_v, mask)
    return (torch.stack(dec) if with_self else None), torch.stack(cross)


def alignment_layer(n_layers: int) -> int:
    """The decoder layer whose cross-attention, averaged over its heads, word alignments are read
    from: the last one of a decoder of 1 or 2 layers, the penultimate one of a deeper decoder.
    Measured with `benchmarks/measure_alignment_heads.py` on tiny models trained on copy and
    reversal tasks (README, `--alignment`): the head average beat every single head; with 2
    layers the first layer failed on reversal (52% of tokens right against 99%); with 3 the
    penultimate was best (99% against 98% for the last), as Garg et al. (2019) found for 6."""
    return n_layers - 2 if n_layers >= 3 else n_layers - 1


@torch.inference_mode()
def alignment_attention(model: Transformer, sources: list[list[int]], targets: list[list[int]]) -> list[Tensor]:
    """For each (source ids, hypothesis ids) pair, without specials: the cross-attention
    [len(target), len(source)] of the step that predicted each target token (query from the
    token before it, BOS first) over the source tokens (the source EOS column dropped), from
    `alignment_layer`, averaged over its heads; float32 on the CPU."""
    batch = pad_batch(sources, [t or [model.config.eos_id] for t in targets],  # one row, unused, for an empty one
                      max_positions=model.config.max_positions).to(model.positions.device)
    with eval_mode(model):
        memory, mask = model.encode(batch.src)
        _, cross = decoder_maps(model, memory, mask, batch.tgt_in)
    weights = cross[alignment_layer(len(model.decoder))].float().mean(1).cpu()  # [B, T, S]
    return [weights[i, : len(t), : len(s)] for i, (s, t) in enumerate(zip(sources, targets))]


def maps_for_sentence(model: Transformer, vocabs, sentence: str, translation_ids: list[int],
                      src_prefix: tuple[int, ...] = ()) -> AttentionMaps:
    """Maps for a source sentence and the ids of its translation (without BOS/EOS); `src_prefix`:
    the ids put before the source (a multi-direction model's target-language tag)."""
    from nmt.tokenizer import encode_batch

    source = [*src_prefix, *encode_batch(vocabs.src, [sentence])[0]]
    batch = pad_batch([source], [translation_ids], max_positions=model.config.max_positions)
    enc, dec, cross = attention_maps(model, batch.src, batch.tgt_in)
    return AttentionMaps([vocabs.src.id_to_token(i) for i in batch.src[0].tolist()],
                         [vocabs.tgt.id_to_token(i) for i in batch.tgt_in[0].tolist()],
                         enc.float(), dec.float(), cross.float())
