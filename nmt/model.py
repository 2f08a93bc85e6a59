"""The Transformer encoder–decoder of Vaswani et al. (2017), written to be read beside the paper.

`encode()` turns source ids into memory; `decode()` turns target ids (and memory) into
next-token logits, either over a whole prefix at once (training, with a causal mask) or one
step at a time with an explicit `DecoderCache` (search). No file, device or CLI code here.

Shapes: B batch, K beam, S source length, T target length, D d_model, H heads, Dh = D / H,
V vocabulary.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.config import ModelConfig
from nmt.cpu_kernels import dropout, dropout_add, linear_cross_entropy


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block with dropout off (`model.eval()`), then give the model back in the mode it
    came in (a trainer's dev evaluation, or maps drawn half-way through training), errors included."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(…)  (section 3.5). Computed on CPU
    whatever the default device (`Transformer.to` moves it)."""
    pos = torch.arange(n_positions, dtype=torch.float32, device="cpu")[:, None]  # [P, 1]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device="cpu") * (-math.log(10000.0) / d_model))
    pe = torch.zeros(n_positions, d_model, device="cpu")
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe  # [P, D]


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)  # [B, H, T, Dh]


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)  # [B, T, D]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
              dropout_p: float = 0.0, explicit: bool = False) -> Tensor:
    """softmax(Q Kᵀ / √Dh + mask) V (section 3.2.1): q [B, H, Tq, Dh], k, v [B, H, Tk, Dh],
    mask broadcastable to [B, H, Tq, Tk] with True = attend → [B, H, Tq, Dh].

    The fused kernel (`scaled_dot_product_attention`) never builds the [Tq, Tk] weights; the
    explicit branch writes the formula out and is what it computes (tests check the two agree).
    The scale keeps the logits' variance near 1 as Dh grows, so the softmax does not saturate."""
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    return F.dropout(attention_weights(q, k, mask, causal), dropout_p) @ v


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """softmax(Q Kᵀ / √Dh) with a padding mask (True = attend) and/or a causal one: [B, H, Tq, Tk]."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:  # position i sees positions ≤ i (Tq == Tk during teacher forcing)
        t_q, t_k = scores.shape[-2:]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(t_k - t_q + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention: Q, K, V are projections of the same sequence (section 3.2.2)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.explicit = False  # True: the written-out formula instead of the fused kernel

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))  # [B, H, T, Dh]
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, causal, p, self.explicit)  # [B, H, T, Dh]
        return self.out(merge_heads(y))

    def step(self, x: Tensor, cache: "LayerCache", t: int) -> Tensor:
        """One decoding step: x [N, 1, D]; appends this position's K, V to the cache at index t."""
        q, k, v = (split_heads(z, self.n_heads) for z in self.qkv(x).chunk(3, dim=-1))  # [N, H, 1, Dh]
        cache.k[:, :, t : t + 1] = k
        cache.v[:, :, t : t + 1] = v
        # Every cached position is ≤ t, so no mask is needed: causality comes from the cache length.
        y = attention(q, cache.k[:, :, : t + 1], cache.v[:, :, : t + 1], explicit=self.explicit)
        return self.out(merge_heads(y))


class CrossAttention(nn.Module):
    """Encoder–decoder attention: queries from the decoder, keys and values from the memory."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.explicit = False

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)  # [B, H, S, Dh] each

    def forward(self, x: Tensor, k: Tensor, v: Tensor, src_mask: Tensor | None) -> Tensor:
        q = split_heads(self.q(x), self.n_heads)  # [B, H, T, Dh]
        p = self.dropout if self.training else 0.0
        return self.out(merge_heads(attention(q, k, v, src_mask, dropout_p=p, explicit=self.explicit)))

    def step(self, x: Tensor, k: Tensor, v: Tensor, src_mask: Tensor | None) -> Tensor:
        """x [B·K, 1, D] against per-sentence k, v [B, H, S, Dh]: the K beams of a sentence become
        K query positions of that sentence, so the memory is never copied per beam."""
        n = x.shape[0]
        b = k.shape[0]
        q = split_heads(self.q(x).view(b, n // b, -1), self.n_heads)  # [B, H, K, Dh]
        y = attention(q, k, v, src_mask, explicit=self.explicit)  # [B, H, K, Dh]
        return self.out(merge_heads(y).reshape(n, 1, -1))  # [B·K, 1, D]


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to each position (section 3.3).

    No dropout inside (fairseq's activation_dropout defaults to 0 too): on CPU, drawing a mask
    over the d_ff-wide hidden layer cost more time than any matrix product in the layer."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.relu(self.w1(x)))


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014) with probability p while training (the mask itself is
    drawn by `cpu_kernels.dropout`, fast on CPU)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} is not in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p) if self.training else x

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """x + Dropout(y), in one pass on CPU (`cpu_kernels.dropout_add`)."""
        return dropout_add(x, y, self.p) if self.training else x + y

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Residual(nn.Module):
    """x + Dropout(f(LayerNorm(x))) (pre-norm) or LayerNorm(x + Dropout(f(x))) (post-norm, the paper's)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, f) -> Tensor:
        if self.pre_norm:
            return self.dropout.add(x, f(self.norm(x)))
        return self.norm(self.dropout.add(x, f(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(c.d_model, c.n_heads, c.attention_dropout)
        self.ffn = FeedForward(c.d_model, c.d_ff)
        self.res1 = Residual(c.d_model, c.dropout, c.pre_norm)
        self.res2 = Residual(c.d_model, c.dropout, c.pre_norm)

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        x = self.res1(x, lambda h: self.attn(h, mask=src_mask))
        return self.res2(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(c.d_model, c.n_heads, c.attention_dropout)
        self.cross_attn = CrossAttention(c.d_model, c.n_heads, c.attention_dropout)
        self.ffn = FeedForward(c.d_model, c.d_ff)
        self.res1 = Residual(c.d_model, c.dropout, c.pre_norm)
        self.res2 = Residual(c.d_model, c.dropout, c.pre_norm)
        self.res3 = Residual(c.d_model, c.dropout, c.pre_norm)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, src_mask: Tensor | None) -> Tensor:
        # No target padding mask: the causal mask already keeps every position from seeing the
        # ones after it, and padding only ever comes after a sentence's last real token. So a
        # real position never attends to padding, and what the padding positions compute
        # themselves is never used (their loss is skipped, their logits never read).
        x = self.res1(x, lambda h: self.self_attn(h, causal=True))
        x = self.res2(x, lambda h: self.cross_attn(h, k, v, src_mask))
        return self.res3(x, self.ffn)

    def step(self, x: Tensor, cache: "LayerCache", t: int, src_mask: Tensor | None) -> Tensor:
        x = self.res1(x, lambda h: self.self_attn.step(h, cache, t))
        x = self.res2(x, lambda h: self.cross_attn.step(h, cache.mem_k, cache.mem_v, src_mask))
        return self.res3(x, self.ffn)


@dataclass
class LayerCache:
    k: Tensor  # [B·K, H, T_max, Dh] self-attention keys, filled up to the current step
    v: Tensor
    mem_k: Tensor  # [B, H, S, Dh] cross-attention keys of the memory, computed once per sentence
    mem_v: Tensor
    k_spare: Tensor  # buffers of k's and v's shape that a reorder copies into (then the two swap)
    v_spare: Tensor


@dataclass
class DecoderCache:
    """Everything incremental decoding carries from one step to the next, passed in and out
    explicitly (never hidden on modules). `src_mask` is per sentence, like the memory."""

    layers: list[LayerCache]
    src_mask: Tensor | None  # [B, 1, 1, S] True where attention is allowed
    length: int = 0  # positions already decoded

    def reorder(self, beam_origin: Tensor, sentences: Tensor | None = None) -> None:
        """Self-attention state follows the surviving hypotheses: row i takes row beam_origin[i]
        (fewer rows than before when sentences have finished; `sentences` then lists the ones
        kept, indices into B, for the per-sentence memory). Only the filled positions are
        copied, into the spare buffer, whose first rows then serve."""
        t, n = self.length, len(beam_origin)
        for layer in self.layers:
            # one copy into the spare buffer (copying in place would need a temporary: two)
            torch.index_select(layer.k[:, :, :t], 0, beam_origin, out=layer.k_spare[:n, :, :t])
            torch.index_select(layer.v[:, :, :t], 0, beam_origin, out=layer.v_spare[:n, :, :t])
            layer.k, layer.k_spare = layer.k_spare[:n], layer.k
            layer.v, layer.v_spare = layer.v_spare[:n], layer.v
            if sentences is not None:
                layer.mem_k, layer.mem_v = layer.mem_k[sentences], layer.mem_v[sentences]
        if sentences is not None and self.src_mask is not None:
            self.src_mask = self.src_mask[sentences]

    def keep_sentences(self, sentences: Tensor, beam: int) -> None:
        """Drop finished sentences: keep `sentences` (indices into B) and their K rows each."""
        rows = (sentences[:, None] * beam + torch.arange(beam, device=sentences.device)).reshape(-1)
        self.reorder(rows, sentences)


def _embedding(n: int, d: int, pad_id: int) -> nn.Embedding:
    """An embedding table (`Transformer._init_weights` sets its values). nn.Embedding's own N(0, 1)
    draw is made here only off the meta device: on it, the draw runs torch's Python reference kernels,
    whose first use imports torch._dynamo, 1.3 s of every command that loads a model. Elsewhere it is
    kept, so that a seed gives the same model as before."""
    weight = torch.empty(n, d)
    if not weight.is_meta:
        weight.normal_()
    return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=pad_id)


class Transformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        if c.d_model % c.n_heads:
            raise ValueError(f"d_model {c.d_model} is not divisible by n_heads {c.n_heads}")
        self.config = c
        self.src_embed = _embedding(c.src_vocab_size, c.d_model, c.pad_id)
        if c.tie_embeddings and c.joint_vocab and c.src_vocab_size == c.tgt_vocab_size:
            self.tgt_embed = self.src_embed  # one joint vocabulary: one matrix (separate ones of equal size: two)
        else:
            self.tgt_embed = _embedding(c.tgt_vocab_size, c.d_model, c.pad_id)
        self.register_buffer("positions", sinusoidal_positions(c.max_positions, c.d_model), persistent=False)
        self.embed_dropout = Dropout(c.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        # Pre-norm stacks end un-normalised: one final LayerNorm each (post-norm needs none).
        self.encoder_norm = nn.LayerNorm(c.d_model) if c.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model) if c.pre_norm else nn.Identity()
        self.output = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
        if c.tie_embeddings:
            self.output.weight = self.tgt_embed.weight  # section 3.4: shared with the embeddings
        self._init_weights()

    def _init_weights(self) -> None:
        if self.output.weight.is_meta:  # shapes only (`checkpoint.check_weights`): no values to set
            return
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                nn.init.xavier_uniform_(p)
            elif "bias" in name:
                nn.init.zeros_(p)
        for emb in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(emb.weight, mean=0.0, std=self.config.d_model**-0.5)
            nn.init.zeros_(emb.weight[self.config.pad_id])

    def use_explicit_attention(self, explicit: bool = True) -> "Transformer":
        """Compute every attention with the written-out softmax(Q Kᵀ / √Dh) V instead of the
        fused kernel (slower; the same result up to rounding)."""
        for m in self.modules():
            if isinstance(m, (SelfAttention, CrossAttention)):
                m.explicit = explicit
        return self

    def embed(self, table: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        """Token embeddings × √D plus sinusoidal positions (section 3.4), then dropout."""
        if ids.shape[1] + offset > self.positions.shape[0]:
            raise ValueError(f"sequence of {ids.shape[1] + offset} exceeds max_positions {self.positions.shape[0]}")
        x = table(ids) * math.sqrt(self.config.d_model) + self.positions[offset : offset + ids.shape[1]]
        return self.embed_dropout(x)

    def src_mask(self, src: Tensor) -> Tensor:
        return (src != self.config.pad_id)[:, None, None, :]  # [B, 1, 1, S], True = attend

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src [B, S] → memory [B, S, D] and its mask [B, 1, 1, S]."""
        mask = self.src_mask(src)
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def decode_hidden(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher forcing: tgt_in [B, T] (starting with BOS) → final decoder states [B, T, D]."""
        x = self.embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            k, v = layer.cross_attn.memory_kv(memory)
            x = layer(x, k, v, src_mask)
        return self.decoder_norm(x)

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher forcing: tgt_in [B, T] → logits [B, T, V] for the next tokens."""
        return self.output(self.decode_hidden(tgt_in, memory, src_mask))

    def forward(self, src: Tensor, tgt_in: Tensor, keep: Tensor | None = None, targets: Tensor | None = None,
                label_smoothing: float = 0.0) -> Tensor:
        """Logits [B, T, V] for the next tokens. With `keep` [B, T] (True at real target positions)
        and `targets` [N] (the next token at each of them), the summed label-smoothed
        cross-entropy over those positions instead: the output layer, the largest matrix
        product, skips the padding, and on CPU the [N, V] logits never exist whole
        (`cpu_kernels.linear_cross_entropy`)."""
        if (keep is None) != (targets is None):
            raise ValueError("keep and targets go together")
        memory, mask = self.encode(src)
        hidden = self.decode_hidden(tgt_in, memory, mask)
        if targets is None:
            return self.output(hidden)
        return linear_cross_entropy(hidden[keep], self.output.weight, targets, label_smoothing)

    def init_cache(self, memory: Tensor, src_mask: Tensor, beam: int, max_steps: int) -> DecoderCache:
        """Pre-allocate self-attention buffers for B·K rows and max_steps positions; compute each
        layer's cross-attention keys/values once from the memory [B, S, D]."""
        c = self.config
        n = memory.shape[0] * beam
        dh = c.d_model // c.n_heads
        layers = []
        for layer in self.decoder:
            mem_k, mem_v = layer.cross_attn.memory_kv(memory)
            # uninitialised: only filled positions are ever read, and untouched pages cost nothing
            buf = memory.new_empty(4, n, c.n_heads, max_steps, dh)
            layers.append(LayerCache(buf[0], buf[1], mem_k, mem_v, buf[2], buf[3]))
        return DecoderCache(layers, src_mask)

    def decode_step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """tokens [B·K] (the newest token of each hypothesis) → logits [B·K, V] for the next one."""
        t = cache.length
        x = self.embed(self.tgt_embed, tokens[:, None], offset=t)  # [B·K, 1, D]
        for layer, layer_cache in zip(self.decoder, cache.layers):
            x = layer.step(x, layer_cache, t, cache.src_mask)
        cache.length = t + 1
        return self.output(self.decoder_norm(x))[:, 0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
