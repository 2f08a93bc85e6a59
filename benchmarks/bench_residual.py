#!/usr/bin/env python3
"""The residual sum x + Dropout(y) on CPU, forward and backward: dropout then `+` (three passes
over the elements forward, two backward) against `cpu_kernels.dropout_add` (one `addcmul`).

    python benchmarks/bench_residual.py [--rows 3000] [--width 256] [--p 0.1] [--threads 2] [--rounds 400]

x in fp32 and y in bf16, as under autocast (y is a matrix product's output, x the residual
stream); the two are timed alternately in one process, so the machine's drift hits both.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from alternate import setup_cpu, time_alternately
from nmt.cpu_kernels import dropout, dropout_add
from nmt.runtime import cpu_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    setup_cpu(args.threads)
    x = torch.randn(args.rows, args.width, requires_grad=True)
    y = torch.randn(args.rows, args.width, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.rows, args.width)
    ways = {"dropout, then +": lambda: x + dropout(y, args.p), "dropout_add": lambda: dropout_add(x, y, args.p)}

    def clear() -> None:
        x.grad = y.grad = None

    times = time_alternately({name: lambda way=way: way().backward(grad) for name, way in ways.items()}, args.rounds, clear)
    print(f"machine: {cpu_description()}, {args.threads} threads; [{args.rows}, {args.width}], p {args.p}")
    for name, t in times.items():
        print(f"{name:<16} min {1e3 * min(t):.3f} ms  median {1e3 * statistics.median(t):.3f} ms")


if __name__ == "__main__":
    main()
