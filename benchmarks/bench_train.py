#!/usr/bin/env python3
"""Training throughput per preset on the embedded corpus: target tokens/s, and the share of the
device's peak (MFU).

    python benchmarks/bench_train.py [--presets tiny,small] [--steps 30] [--dtypes auto,float32,bfloat16]
                                     [--profile]

Model FLOPs per target token (forward + backward = 3 × forward, counted like fairseq's ntokens,
i.e. per real target token, EOS included):

    F = 6 · (P_enc · r + P_dec + P_out) + 6 · d · (L_enc · S · r + L_dec · (T + S))

with P_enc/P_dec the encoder/decoder layer parameters, P_out = d·V the output layer, r the
source/target token ratio, S and T the mean source and target lengths, d = d_model; the second
term is attention (Q·Kᵀ and A·V: 2·2·d multiply-adds per query–key pair, ×3 for backward; the
causal decoder self-attention counted over T/2 keys on average, the cross-attention over S).
MFU = F × target tokens/s ÷ peak FLOP/s, where the peak is the datasheet's dense bf16 figure on
GPU and, on CPU, the best matrix-product rate measured here in the same dtype (so CPU MFU
says how close the loop gets to this machine's own matmul speed).

`--profile` then runs a few more steps under `torch.profiler` and splits MFU into two factors:
the share of the step spent in matrix products (aten::mm, addmm, bmm, baddbmm: self time), and
their efficiency (F × target tokens ÷ their time ÷ peak), so MFU = share × efficiency; it prints
the operations that take the rest, largest first. The profiler adds a little time per
operation, so its MFU reads a few points lower than the timed one.
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
from nmt.batching import plan_epoch
from nmt.model import count_parameters
from nmt.runtime import cpu_description, setup
from nmt.train import Distributed, Trainer, prepare

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def flops_per_target_token(model, src_len: np.ndarray, tgt_len: np.ndarray) -> float:
    c = model.config
    p_enc = sum(p.numel() for p in model.encoder.parameters())
    p_dec = sum(p.numel() for p in model.decoder.parameters())
    p_out = c.d_model * c.tgt_vocab_size
    s, t = float(src_len.mean() + 1), float(tgt_len.mean() + 1)
    r = s / t
    dense = 6 * (p_enc * r + p_dec + p_out)
    attention = 6 * c.d_model * (c.encoder_layers * s * r + c.decoder_layers * (t / 2 + s))
    return dense + attention


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The best matrix-product rate seen here in `dtype`: square products of 1,024 and 2,048, each
    timed in rounds of four for about `seconds`, the fastest round kept. Short trials under-read
    some CPUs badly: on a 2-vCPU Intel Xeon with AMX the same 1,024 bf16 product ran at
    0.26-0.46 TFLOP/s in some rounds and 1.03-1.22 in others (most likely the matrix unit waking
    up, or shared with a neighbour), and the former 20-product trial read 0.54 against a 1.15 peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_BF16.items() if k in name), float("nan"))
    best = 0.0
    for n in (1024, 2048):
        a, b, c = (torch.randn(n, n, dtype=dtype) for _ in range(3))
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            for _ in range(4):
                torch.matmul(a, b, out=c)
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def profile_split(trainer: Trainer, batches: list, first: int, steps: int, flops: float, peak: float) -> str:
    """MFU as (share of self time in matrix products) × (their efficiency), and the other top ops."""
    from torch.profiler import ProfilerActivity, profile

    tokens = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(first, first + steps):
            tokens += trainer.train_step([batches[i % len(batches)]])[1]
    ops = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    total = sum(t for _, t in ops)
    matmul = sum(t for k, t in ops if k in MATMULS)
    efficiency = flops * tokens / matmul / peak
    rest = sorted(((t, k) for k, t in ops if k not in MATMULS), reverse=True)[:8]
    return (f"  profile of {steps} steps: MFU {100 * flops * tokens / total / peak:.1f}% = matrix products "
            f"{100 * matmul / total:.0f}% of the time × {100 * efficiency:.0f}% of peak while they run; the rest: "
            + ", ".join(f"{k.removeprefix('aten::')} {100 * t / total:.1f}%" for t, k in rest))


def bench(preset: str, dtype: str, steps: int, warmup: int, workdir: Path, device: str,
          profile_steps: int = 0) -> dict:
    model_config, tok_config, train_preset = cfg.preset(preset)
    train_config = cfg.TrainConfig(preset=preset, dev=None, dtype=dtype, device=device, **train_preset)
    runtime = setup(device, dtype, 0)
    p = prepare(train_config, model_config, tok_config, workdir / f"tok-{preset}")
    trainer = Trainer(p, train_config, runtime, Distributed(device))
    batches = plan_epoch(p.cache.src_len, p.cache.tgt_len, train_config.batch_tokens, 1, 0)
    for i in range(warmup):
        trainer.train_step([batches[i]])
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    tokens, t0 = 0, time.perf_counter()
    for i in range(warmup, warmup + steps):
        tokens += trainer.train_step([batches[i % len(batches)]])[1]
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rate = tokens / seconds
    flops = flops_per_target_token(trainer.model, p.cache.src_len, p.cache.tgt_len)
    peak = matmul_peak(runtime.device, runtime.dtype)
    split = profile_split(trainer, batches, warmup + steps, profile_steps, flops, peak) if profile_steps else ""
    return {"split": split, "preset": preset, "runtime": runtime.describe(), "params": count_parameters(trainer.model),
            "tok_s": rate, "flops_tok": flops, "peak": peak, "mfu": flops * rate / peak,
            "batch_tokens": train_config.batch_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--dtypes", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", action="store_true", help="split MFU into matmul share × matmul efficiency")
    args = ap.parse_args()
    print(f"machine: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"python {platform.python_version()}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print(f"{'preset':<7} {'params':>11} {'runtime':<45} {'batch':>6} {'tgt tok/s':>10} {'GFLOP/tok':>9} "
          f"{'peak TFLOP/s':>12} {'MFU':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            for dtype in args.dtypes.split(","):
                r = bench(preset, dtype, args.steps, args.warmup, Path(tmp), args.device, 10 if args.profile else 0)
                print(f"{r['preset']:<7} {r['params']:>11,} {r['runtime']:<45} {r['batch_tokens']:>6} "
                      f"{r['tok_s']:>10,.0f} {r['flops_tok'] / 1e9:>9.3f} {r['peak'] / 1e12:>12.2f} "
                      f"{100 * r['mfu']:>5.1f}%", flush=True)
                if r["split"]:
                    print(r["split"], flush=True)


if __name__ == "__main__":
    main()
