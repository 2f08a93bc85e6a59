"""Auto batch sizing (`--batch-tokens auto`): the largest token budget whose worst-case batch
fits in GPU memory, found by trying it.

The worst case for a budget of N tokens is a batch of the longest pairs the filters let through
(N // max_length rows of max_length tokens on both sides): every token count is at its limit
and the attention matrices, which grow with the square of the length, are at their largest.
A budget is tried with a forward and a backward pass while the optimizer's state is held in
memory; budgets double until one fails, then bisection narrows the boundary, and a margin is
taken off for the fragmentation that batches of varying shapes cause. A rare out-of-memory
later on is still handled by the trainer (the batch is split and retried).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from nmt.batching import Batch, pad_batch
from nmt.errors import NmtError

log = logging.getLogger(__name__)

FIRST_TRY = 1024
LARGEST = 1 << 20  # no search beyond a million tokens per batch
MARGIN = 0.9  # use 90% of the largest budget that fitted
PRECISION = 0.05  # stop bisecting when the boundary is known within 5%


def search_budget(fits: Callable[[int], bool], first: int = FIRST_TRY, largest: int = LARGEST,
                  smallest: int = 16) -> int:
    """The largest budget `fits` accepts (within PRECISION), times MARGIN: doubling from
    `first` (halving when even that fails), then bisection."""
    if fits(first):
        good, bad = first, None
        while good < largest:
            trial = min(2 * good, largest)
            if fits(trial):
                good = trial
            else:
                bad = trial
                break
        if bad is None:
            return int(good * MARGIN)
    else:
        bad, good = first, first // 2
        while good >= smallest and not fits(good):
            bad, good = good, good // 2
        if good < smallest:
            raise NmtError(f"out of memory even with a batch of {smallest} tokens: use a smaller model")
    while bad - good > max(1.0, PRECISION * good):
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return int(good * MARGIN)


def worst_case_batch(tokens: int, max_length: int, vocab_sizes: tuple[int, int], device: torch.device) -> Batch:
    """`tokens // max_length` pairs (at least one) of max_length real tokens on each side,
    EOS included, with random ids of each side's vocabulary (source, target): the largest padded
    batch a budget of `tokens` can hold."""
    rows = max(1, tokens // max_length)
    src, tgt = (torch.randint(4, size, (rows, max_length - 1)).numpy() for size in vocab_sizes)  # no special ids
    return pad_batch(src, tgt).to(device)


def probe(step: Callable[[Batch], None], model: torch.nn.Module, max_length: int, vocab_sizes: tuple[int, int],
          device: torch.device) -> int:
    """The token budget to train with: `step` runs forward and backward on a batch (it raises
    torch.OutOfMemoryError when the batch does not fit)."""
    # Adam keeps two moments per parameter, allocated at the first optimizer step (after this
    # probe): hold that much memory while trying.
    reserve = [torch.empty_like(p) for p in model.parameters() for _ in range(2)]

    def fits(tokens: int) -> bool:
        try:
            step(worst_case_batch(tokens, max_length, vocab_sizes, device))
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.debug("batch of %d tokens (worst case) %s", tokens, "fits" if ok else "does not fit")
        return ok

    try:
        budget = search_budget(fits)
    finally:
        del reserve
    log.info("--batch-tokens auto: %d tokens per batch (largest worst-case batch that fits, less %d%%)",
             budget, round(100 * (1 - MARGIN)))
    return budget
