"""Token-budget batches from length buckets, planned with vectorised numpy, and their tensors.

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

    Sorting by the longer side (+1 for BOS/EOS) groups pairs of equal padded length; each run of
    one length is cut into batches of floor(batch_tokens / length) pairs, so a batch never
    exceeds the budget in padded tokens on either side. No Python loop over pairs.
    """
    rng = np.random.default_rng([seed, epoch])
    cost = np.maximum(src_len, tgt_len).astype(np.int64) + 1  # padded tokens per pair
    order = np.lexsort((rng.random(len(cost)), np.minimum(src_len, tgt_len), cost))
    cost_sorted = cost[order]
    values, run_starts, run_counts = np.unique(cost_sorted, return_index=True, return_counts=True)
    per_batch = np.maximum(1, batch_tokens // values)  # pairs per batch in each run
    n_batches = -(-run_counts // per_batch)  # ceil
    # Batch b of run r covers sorted positions [run_start + b·per_batch, min(…+per_batch, run_end)).
    run_of_batch = np.repeat(np.arange(len(values)), n_batches)
    index_in_run = np.arange(n_batches.sum()) - np.repeat(np.cumsum(n_batches) - n_batches, n_batches)
    starts = run_starts[run_of_batch] + index_in_run * per_batch[run_of_batch]
    ends = np.minimum(starts + per_batch[run_of_batch], run_starts[run_of_batch] + run_counts[run_of_batch])
    shuffled = rng.permutation(len(starts))
    if world_size > 1:  # equal counts on every rank, so collective operations stay in step
        shuffled = shuffled[: len(shuffled) // world_size * world_size][rank::world_size]
    return [order[starts[b] : ends[b]] for b in shuffled]


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
    n_tgt = int(sum(len(t) + 1 for _, t in pairs))
    tgt_in = tgt[:, :-1].copy()
    tgt_in[tgt_in == EOS_ID] = PAD_ID  # EOS is never an input
    tensors = [torch.from_numpy(a) for a in (src, tgt_in, tgt[:, 1:].copy())]
    if pin:
        tensors = [t.pin_memory() for t in tensors]
    return Batch(*tensors, n_tgt_tokens=n_tgt)
