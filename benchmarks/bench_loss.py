#!/usr/bin/env python3
"""The training loss with its output layer on CPU, forward and backward: the plain path (logits,
then `F.cross_entropy`) against `cpu_kernels.linear_cross_entropy` in blocks of rows, with the
weight's gradient as one product Hᵀ G per block and as one product per `GRAD_BYTES` of G.

    python benchmarks/bench_loss.py [--rows 3000] [--width 256] [--vocab 8000] [--dtype bfloat16]
                                    [--threads 2] [--rounds 40]

Hidden states and weight in fp32, with bf16 autocast around the call for `--dtype bfloat16`, as in
training; the ways are timed alternately in one process, so the machine's drift hits all of them.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import nmt.cpu_kernels as kernels
from alternate import setup_cpu, time_alternately
from nmt.runtime import cpu_description


def plain(h, w, y, eps):
    return F.cross_entropy(F.linear(h, w).float(), y, label_smoothing=eps, reduction="sum")


def blocked_per_block(h, w, y, eps):
    saved, kernels.GRAD_BYTES = kernels.GRAD_BYTES, 0  # the span falls to one block
    try:
        return kernels.linear_cross_entropy(h, w, y, eps)
    finally:
        kernels.GRAD_BYTES = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000, help="target tokens in the batch")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    setup_cpu(args.threads)
    torch.manual_seed(0)
    h = torch.randn(args.rows, args.width, requires_grad=True)
    w = (torch.randn(args.vocab, args.width) * args.width**-0.5).requires_grad_()
    y = torch.randint(0, args.vocab, (args.rows,))
    dtype = getattr(torch, args.dtype)
    ways = {"plain": plain, "blocks, Hᵀ G per block": blocked_per_block,
            "blocks, Hᵀ G per span": kernels.linear_cross_entropy}

    def forward_backward(way):
        def run() -> None:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = way(h, w, y, 0.1)
            loss.backward()
        return run

    def clear() -> None:
        h.grad = w.grad = None

    times = time_alternately({name: forward_backward(way) for name, way in ways.items()}, args.rounds, clear)
    print(f"machine: {cpu_description()}, {args.threads} threads; "
          f"[{args.rows}, {args.width}] × [{args.width}, {args.vocab}], {args.dtype}")
    base = statistics.median(times["plain"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:<24} min {1e3 * min(t):7.1f} ms  median {1e3 * med:7.1f} ms  plain ÷ this {base / med:.2f}")


if __name__ == "__main__":
    main()
