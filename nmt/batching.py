"""Token-budget batches of length-sorted pairs, planned with numpy, and the one builder of
padded id tensors (BOS/EOS, padding, the source-length limit) that every path uses: training,
the dev loss, translation, autobatch's worst case, attention maps and the benchmarks.

An epoch's plan is a pure function of (lengths, seed, epoch): pairs sorted by length with a
random tie-break, cut into batches whose padded size fits the token budget, then the batches
shuffled. Resuming therefore needs only (epoch, batch index). Under torch.distributed each rank
takes every world_size-th batch of the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nmt.cache import TokenCache
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID


# Epoch plans count sequence lengths padded to a multiple of 8, and so do the training batches'
# tensors, except on CPU in float32 (`training_pad_multiple`). On CPU with bf16, every new matrix
# shape makes oneDNN build and keep a new kernel: with exact lengths, 300 training steps of the
# tiny preset grew to 1,186 MB resident, with lengths padded to 8 to 941 MB (and 618 MB with the
# output layer's rows padded too, now in loss.py's blocks), at the same speed. GPUs prefer
# multiples of 8.
PAD_MULTIPLE = 8


def training_pad_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """What a training batch's lengths are padded to: PAD_MULTIPLE, except on CPU in float32, where
    padding is only work thrown away: on the Bible corpus the plan's batches of `small` are 89.5%
    real source tokens and 84.2% real target ones padded to 8, and 99.3% and 84.6% at their exact
    lengths (the same batches). Memory does not grow with the many shapes there as it did in bf16:
    300 float32 steps of `tiny` peaked at 446-449 MB exact and 449-459 MB padded (two runs each)."""
    return 1 if device.type == "cpu" and dtype == torch.float32 else PAD_MULTIPLE


def padded(length):
    """`length` (an int or an array) rounded up to a multiple of PAD_MULTIPLE."""
    return padded_to(length, PAD_MULTIPLE)


def plan_epoch(src_len: np.ndarray, tgt_len: np.ndarray, batch_tokens: int, seed: int, epoch: int,
               rank: int = 0, world_size: int = 1, curriculum: float = 0.0) -> "Plan":
    """Batches (arrays of pair indices) for one epoch on one rank.

    Pairs are sorted by padded length (the longer side + 1 for BOS/EOS, then the source length,
    random tie-break) and cut greedily into runs of consecutive pairs whose count × longest stays
    within `batch_tokens`; the batches are then shuffled. Vectorised: 5 million pairs take about
    a second.

    With `curriculum` w > 0, the first epoch serves short batches first: batch b, whose length
    rank is r_b in [0, 1), comes in order of r_b + w·u_b with u_b uniform in [0, 1), so the
    early batches are mostly short ones and the mix widens as the epoch goes on (a soft
    "shortest first" curriculum; later epochs are shuffled as usual).
    """
    rng = np.random.default_rng([seed, epoch])
    cost = padded(np.maximum(_uint16(src_len), _uint16(tgt_len)) + 1)  # padded tokens per pair
    # then by source length: on the Bible corpus 86.8% of the padded tokens are real, 85.5%
    # with the shorter side as the second key, 85.5% with none
    order = _sort_with_random_ties(cost, _uint16(src_len), rng)
    starts, ends = _cut(cost[order], batch_tokens)
    shuffled = rng.permutation(len(starts))
    if curriculum > 0 and epoch == 0:
        rank_of = np.arange(len(starts)) / max(len(starts), 1)  # batches are cut in ascending length
        shuffled = np.argsort(rank_of + curriculum * rng.random(len(starts)), kind="stable")
    if world_size > 1:  # equal counts on every rank, so collective operations stay in step
        shuffled = shuffled[: len(shuffled) // world_size * world_size][rank::world_size]
    return Plan(order, starts[shuffled], ends[shuffled])


class Plan(Sequence):
    """An epoch's batches in serving order, as three flat arrays rather than a list of a million
    small arrays: batch b is `order[starts[b] : ends[b]]`."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.order, self.starts, self.ends = order, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        return self.order[self.starts[b] : self.ends[b]]


def _uint16(lengths: np.ndarray) -> np.ndarray:
    """Lengths as 16-bit sort keys (2 bytes a pair; no filter lets 65,535-token lines through)."""
    return np.minimum(lengths, np.iinfo(np.uint16).max - PAD_MULTIPLE).astype(np.uint16)


def _sort_with_random_ties(primary: np.ndarray, secondary: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorted by (primary, secondary), ties in random order: a random permutation then
    two stable sorts (least significant key first) on 16-bit keys, which numpy radix-sorts."""
    order = rng.permutation(np.arange(len(primary), dtype=np.int32 if len(primary) < 2**31 else np.int64))
    for key in (secondary, primary):
        order = order[np.argsort(key[order], kind="stable")]
    return order


def _cut(sorted_cost: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy cut of ascending costs into [start, end) runs with (end - start) × cost[end-1] ≤ budget
    (a single pair over budget gets a batch of its own).

    Same result as the pair-by-pair greedy loop, computed per block of equal cost (at most
    max-length blocks): inside a block every batch holds budget // cost pairs, and only the last,
    partial one may carry over into the next block."""
    n = len(sorted_cost)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    block_starts = np.concatenate(([0], np.flatnonzero(sorted_cost[1:] != sorted_cost[:-1]) + 1))
    values = sorted_cost[block_starts].astype(np.int64)
    block_ends = np.append(block_starts[1:], n)
    starts: list[np.ndarray] = []
    open_start = -1  # the start of a partial batch carried over from earlier blocks, or -1
    for c, lo, hi in zip(values.tolist(), block_starts.tolist(), block_ends.tolist()):
        room = budget // c  # pairs a batch may hold once it contains a pair of this cost
        s = lo
        if open_start >= 0:
            if lo - open_start < room:  # the open batch takes pairs of this block too
                s = open_start + room
                if s >= hi:
                    continue  # ... all of them, and stays open
            starts.append(np.array([open_start]))
            open_start = -1
        size = max(1, room)
        block = np.arange(s, hi, size)
        if len(block) and hi - block[-1] < size:  # a partial last batch stays open
            open_start = int(block[-1])
            block = block[:-1]
        starts.append(block)
    if open_start >= 0:
        starts.append(np.array([open_start]))
    start = np.concatenate(starts).astype(np.int64)
    return start, np.append(start[1:], n)


# -- padded tensors: the one builder -----------------------------------------------------------


def max_source_tokens(max_positions: int) -> int:
    """The source-length limit: subword tokens a source keeps (EOS not counted). With its EOS a
    source takes at most max_positions - 1 positions, the same cap as the output side
    (`search.max_lengths`); anything longer is cut here, never inside the model."""
    return max_positions - 2


def cut_source(ids: list[int], max_positions: int) -> tuple[list[int], bool]:
    """(ids within the source-length limit, whether they were cut)."""
    limit = max_source_tokens(max_positions)
    return (ids[:limit], True) if len(ids) > limit else (ids, False)


@dataclass
class Batch:
    src: torch.Tensor  # [B, S] source ids + EOS, padded
    tgt_in: torch.Tensor | None  # [B, T] BOS + target ids, padded (None: a source-only batch)
    tgt_out: torch.Tensor | None  # [B, T] target ids + EOS, padded
    n_tgt_tokens: int  # real (non-pad) target tokens, EOS included

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=nb)  # noqa: E731
        return Batch(move(self.src), move(self.tgt_in), move(self.tgt_out), self.n_tgt_tokens)


def pad_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]] | None = None, *,
              max_positions: int | None = None, multiple: int = 1, pin: bool = False) -> Batch:
    """The one place ids become padded tensors: sources get EOS, targets BOS (input) and EOS
    (output), every row is padded with PAD_ID to the longest (rounded up to `multiple`).

    With `max_positions` both sides are first cut to the source-length limit (`cut_source`),
    so no batch built here can exceed the model's positions. Rows of `src` and `tgt` are
    lists or numpy arrays of ids without specials."""
    if max_positions is not None:
        limit = max_source_tokens(max_positions)
        src = [s[:limit] for s in src]
        tgt = None if tgt is None else [t[:limit] for t in tgt]
    src_ids = _pad_rows(src, [], [EOS_ID], multiple)
    if tgt is None:
        return Batch(_tensor(src_ids, pin), None, None, 0)
    tgt_in = _pad_rows(tgt, [BOS_ID], [], multiple)
    tgt_out = _pad_rows(tgt, [], [EOS_ID], multiple)
    n_tgt = sum(len(t) for t in tgt) + len(tgt)
    return Batch(_tensor(src_ids, pin), _tensor(tgt_in, pin), _tensor(tgt_out, pin), n_tgt)


def _pad_rows(rows: Sequence[Sequence[int]], before: list[int], after: list[int], multiple: int) -> np.ndarray:
    width = len(before) + len(after)
    out = np.full((len(rows), padded_to(max(len(r) for r in rows) + width, multiple)), PAD_ID, dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r)
        if before:
            out[i, 0] = before[0]
        out[i, len(before) : len(before) + n] = r
        if after:
            out[i, len(before) + n] = after[0]
    return out


def padded_to(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _tensor(a: np.ndarray, pin: bool) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.pin_memory() if pin else t


def target_tokens(cache: TokenCache, indices: np.ndarray) -> int:
    """Real target tokens of these pairs, EOS included (the unit of loss normalisation and tokens/s)."""
    return sum(cache.target_lengths(indices)) + len(indices)


def collate(cache: TokenCache, indices: np.ndarray, pin: bool = False, multiple: int = PAD_MULTIPLE) -> Batch:
    """Gather training pairs from the cache into padded tensors (lengths padded to `multiple`:
    `training_pad_multiple`'s for the runtime that trains on them)."""
    src, tgt = cache.gather(indices)
    return pad_batch(src, tgt, multiple=multiple, pin=pin)
