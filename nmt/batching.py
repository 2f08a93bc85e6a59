"""Token-budget batches of length-sorted pairs, planned with numpy, and their tensors.

An epoch's plan is a pure function of (lengths, seed, epoch): pairs sorted by length with a
random tie-break, cut into batches whose padded size fits the token budget, then the batches
shuffled. Resuming therefore needs only (epoch, batch index). Under torch.distributed each rank
takes every world_size-th batch of the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nmt.cache import TokenCache
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def plan_epoch(src_len: np.ndarray, tgt_len: np.ndarray, batch_tokens: int, seed: int, epoch: int,
               rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Batches (arrays of pair indices) for one epoch on one rank.

    Pairs are sorted by padded length (the longer side + 1 for BOS/EOS, random tie-break) and
    cut greedily into runs of consecutive pairs whose count × longest stays within
    `batch_tokens`; the batches are then shuffled. The only Python loop is over batches.
    """
    rng = np.random.default_rng([seed, epoch])
    cost = np.maximum(src_len, tgt_len).astype(np.int64) + 1  # padded tokens per pair
    order = np.lexsort((rng.random(len(cost)), np.minimum(src_len, tgt_len), cost))
    starts, ends = _cut(cost[order], batch_tokens)
    shuffled = rng.permutation(len(starts))
    if world_size > 1:  # equal counts on every rank, so collective operations stay in step
        shuffled = shuffled[: len(shuffled) // world_size * world_size][rank::world_size]
    return [order[starts[b] : ends[b]] for b in shuffled]


def _cut(sorted_cost: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy cut of ascending costs into [start, end) runs with (end - start) × cost[end-1] ≤ budget
    (a single pair over budget gets a batch of its own)."""
    starts, ends = [], []
    i, n = 0, len(sorted_cost)
    while i < n:
        most = max(1, budget // int(sorted_cost[i]))  # no more pairs than the cheapest allows
        window = sorted_cost[i : i + most]
        fits = np.arange(1, len(window) + 1) * window <= budget  # True…True False…False (costs ascend)
        count = max(1, int(fits.sum()))
        starts.append(i)
        ends.append(i + count)
        i += count
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


@dataclass
class Batch:
    src: torch.Tensor  # [B, S] source ids + EOS, padded
    tgt_in: torch.Tensor  # [B, T] BOS + target ids, padded
    tgt_out: torch.Tensor  # [B, T] target ids + EOS, padded
    n_tgt_tokens: int  # real (non-pad) target tokens, EOS included

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.src.to(device, non_blocking=nb), self.tgt_in.to(device, non_blocking=nb),
                     self.tgt_out.to(device, non_blocking=nb), self.n_tgt_tokens)


def target_tokens(cache: TokenCache, indices: np.ndarray) -> int:
    """Real target tokens of these pairs, EOS included (the unit of loss normalisation and tokens/s)."""
    return int(cache.tgt_len[indices].sum()) + len(indices)


def collate(cache: TokenCache, indices: np.ndarray, pin: bool = False) -> Batch:
    """Gather pairs from the memory-mapped cache into padded tensors."""
    pairs = [cache.pair(int(i)) for i in indices]
    s_max = max(len(s) for s, _ in pairs) + 1
    t_max = max(len(t) for _, t in pairs) + 1
    src = np.full((len(pairs), s_max), PAD_ID, dtype=np.int64)
    tgt = np.full((len(pairs), t_max + 1), PAD_ID, dtype=np.int64)  # BOS ids EOS
    for row, (s, t) in enumerate(pairs):
        src[row, : len(s)] = s
        src[row, len(s)] = EOS_ID
        tgt[row, 0] = BOS_ID
        tgt[row, 1 : len(t) + 1] = t
        tgt[row, len(t) + 1] = EOS_ID
    tgt_in = tgt[:, :-1].copy()
    tgt_in[tgt_in == EOS_ID] = PAD_ID  # EOS is never an input
    tensors = [torch.from_numpy(a) for a in (src, tgt_in, tgt[:, 1:].copy())]
    if pin:
        tensors = [t.pin_memory() for t in tensors]
    return Batch(*tensors, n_tgt_tokens=target_tokens(cache, indices))
