#!/usr/bin/env python3
"""Seconds to plan one epoch's batches (`batching.plan_epoch`) of a large corpus.

    python benchmarks/bench_plan.py [--pairs 5000000] [--batch-tokens 4096] [--rounds 3]

Lengths are drawn uniformly from 1 to 200 tokens on each side (a seeded stand-in for a corpus of
that size: planning reads only the lengths). Prints each round's time and the fastest.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from nmt.batching import plan_epoch
from nmt.runtime import cpu_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5_000_000)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    src_len, tgt_len = (rng.integers(1, 201, args.pairs, dtype=np.uint16) for _ in range(2))
    print(f"machine: {cpu_description()}, python {platform.python_version()}; {args.pairs:,} pairs, "
          f"batches of {args.batch_tokens} tokens")
    times = []
    for epoch in range(args.rounds):
        t0 = time.perf_counter()
        batches = plan_epoch(src_len, tgt_len, args.batch_tokens, seed=1, epoch=epoch)
        times.append(time.perf_counter() - t0)
        print(f"epoch {epoch}: {len(batches):,} batches in {times[-1]:.2f} s")
    print(f"fastest {min(times):.2f} s ({args.pairs / min(times) / 1e6:.2f} M pairs/s)")


if __name__ == "__main__":
    main()
