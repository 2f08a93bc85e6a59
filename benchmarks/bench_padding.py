#!/usr/bin/env python3
"""Training on CPU in float32 with batches cut to their exact lengths against batches padded to
multiples of 8 (what `nmt train` did before, and still does in bf16 and on GPUs).

    python benchmarks/bench_padding.py [--preset small] [--rounds 10] [--steps 8] [--threads 0]

The same model trains on the same batches of one epoch's plan (the plan counts lengths padded to
8 either way), alternating rounds of `--steps` steps between the two paddings, so the machine's
drift hits both alike; the first round of each is not counted. Prints the share of real tokens in
the tensors of each padding, target tokens/s per round, the medians, and the ratio of each round's
pair (exact ÷ padded).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nmt import config as cfg
from nmt.batching import PAD_MULTIPLE, padded_to, plan_epoch
from nmt.runtime import cpu_description, setup
from nmt.train import Distributed, Trainer, prepare


def real_share(src_len: np.ndarray, tgt_len: np.ndarray, batches, multiple: int) -> tuple[float, float]:
    """Real tokens (EOS/BOS included) ÷ tensor positions, source and target, over the batches."""
    real_s = real_t = pos_s = pos_t = 0
    for b in batches:
        s, t = src_len[b].astype(np.int64) + 1, tgt_len[b].astype(np.int64) + 1
        real_s, real_t = real_s + s.sum(), real_t + t.sum()
        pos_s += len(b) * padded_to(int(s.max()), multiple)
        pos_t += len(b) * padded_to(int(t.max()), multiple)
    return real_s / pos_s, real_t / pos_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="steps per round")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    model_config, tok_config, train_preset = cfg.preset(args.preset)
    config = cfg.TrainConfig(preset=args.preset, dev=None, dtype="float32", device="cpu", **train_preset)
    runtime = setup("cpu", "float32", args.threads)
    print(f"machine: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"python {platform.python_version()}; preset {args.preset}, float32, batches of {config.batch_tokens} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        p = prepare(config, model_config, tok_config, Path(tmp) / "tok")
        trainer = Trainer(p, config, runtime, Distributed("cpu"))
        batches = plan_epoch(p.cache.src_len, p.cache.tgt_len, config.batch_tokens, config.seed, 0)
        ways = {"exact": 1, f"padded to {PAD_MULTIPLE}": PAD_MULTIPLE}
        for name, multiple in ways.items():
            src, tgt = real_share(p.cache.src_len, p.cache.tgt_len, batches, multiple)
            print(f"{name:>12}: real tokens {100 * src:.1f}% of the source tensors, {100 * tgt:.1f}% of the target ones")
        rates: dict[str, list[float]] = {name: [] for name in ways}
        at = 0  # both ways train on the same batches: round r takes batches [r·steps, (r+1)·steps)
        for r in range(args.rounds + 1):
            order = list(ways) if r % 2 == 0 else list(ways)[::-1]
            for name in order:
                trainer._pad_multiple = ways[name]
                tokens, t0 = 0, time.perf_counter()
                for i in range(at, at + args.steps):
                    tokens += trainer.train_step([batches[i % len(batches)]])[1]
                if r:
                    rates[name].append(tokens / (time.perf_counter() - t0))
            at += args.steps
    exact, padded = rates.values()
    for name, xs in rates.items():
        print(f"{name:>12}: target tokens/s per round {', '.join(f'{x:,.0f}' for x in xs)}; median {np.median(xs):,.0f}")
    pairs = [a / b for a, b in zip(exact, padded)]
    print(f"exact ÷ padded, per round: {', '.join(f'{x:.2f}' for x in pairs)}; median {np.median(pairs):.3f}; "
          f"ratio of medians {np.median(exact) / np.median(padded):.3f}")


if __name__ == "__main__":
    main()
