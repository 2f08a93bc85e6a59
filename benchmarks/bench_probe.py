#!/usr/bin/env python3
"""How the recipe's speed probe reads each shape: target tokens/s on new batches, on the same
batches again, and on further new batches (what a long run meets after its kernels are made).

    python benchmarks/bench_probe.py [--shapes micro,compact,small] [--dtype auto] [--batches 15]

Uses the recipe's own trial step (`nmt.train._shape_trial`: one optimizer step on real batch i of
the embedded corpus's token cache, BPE 4k, batches of 1,500 tokens), each shape in turn in one
process, as `nmt train --max-time` times them. The first column is what the probe timed before
it replayed its batches; the second is what it times now; the third is the check. On CPUs where
oneDNN makes a kernel for each new matrix shape (bf16 above all), the first column charges those
kernels to whichever shape meets a width first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from nmt import config as cfg
from nmt import recipe
from nmt.runtime import cpu_description, setup
from nmt.train import _shape_trial, prepare


def rate(run, indices) -> float:
    t0, tokens = time.perf_counter(), 0
    for i in indices:
        tokens += run(i)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="micro,compact,small")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batches", type=int, default=15)
    args = ap.parse_args()
    runtime = setup("cpu", args.dtype, 0)
    model_config, tok_config, _ = cfg.preset("small")
    config = cfg.TrainConfig(preset="small", dev=None, dtype=args.dtype, device="cpu", batch_tokens=1500)
    print(f"machine: {cpu_description()}, {runtime.describe()}")
    print(f"{'shape':<8} {'new batches':>12} {'same again':>11} {'further new':>12}  (target tokens/s)")
    with tempfile.TemporaryDirectory() as tmp:
        p = prepare(config, model_config, replace(tok_config, vocab_size=4000), Path(tmp))
        build = _shape_trial(p, config, runtime, 1500)
        n = args.batches
        for shape in (s for s in recipe.SHAPES if s.name in args.shapes.split(",")):
            run = build(shape)
            run(0)  # the probe's untimed first step before (allocation, thread start)
            first = rate(run, range(1, n + 1))
            again = rate(run, range(1, n + 1))
            further = rate(run, range(100, 100 + 4 * n))
            print(f"{shape.name:<8} {first:>12,.0f} {again:>11,.0f} {further:>12,.0f}", flush=True)


if __name__ == "__main__":
    main()
