#!/usr/bin/env python3
"""Corpora of any size: token-cache throughput, peak memory and warm start at 0.5 M and 5 M pairs.

    python benchmarks/bench_cache.py [--sizes 500000,5000000] [--workdir /tmp/nmt-bench-cache] [--whole]

For each size, a synthetic corpus repeats the embedded training data with each copy's lines
numbered (so de-duplication keeps them). It prints:
- encode-and-cache throughput (pairs/s) beside the raw tokenizer on the same lines in the same
  run (the ratio is the cache's overhead). The raw figure is `Tokenizer.encode_batch_fast`, the
  call the cache makes, which skips character offsets: a stricter baseline than `encode_batch`;
- peak RSS of the process that builds the cache, and of `nmt train` (tiny preset) over its first
  200 steps on the warm cache; "anon": the anonymous part of the peak (the process's own memory).
  The rest of a training process's RSS is file pages of the memory-mapped cache that its batches
  touched, which grow with the cache (up to its size) and which the kernel reclaims when memory
  is short;
- peak RSS of the whole `nmt train` command from nothing (tiny preset, default
  `--tokenizer-sample`): tokenizer training on the sample, the cache build, 20 steps. Measured
  with `--whole` only, as it trains a tokenizer on up to 2 M pairs (minutes on a small CPU);
- seconds from `nmt train` start to its first step on the warm cache;
- the cache's size on disk.
Each measured phase runs in its own process; its peak RSS comes from the kernel (wait4), the
anonymous peak from /proc/PID/status sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bible-es-en"

CACHE_CHILD = r"""
import json, sys, time
from pathlib import Path
from nmt.cache import Filters, load_or_build
from nmt.corpus import ParallelCorpus
from nmt.tokenizer import Vocabs
corpus = ParallelCorpus.from_prefix(sys.argv[1], "es", "en")
vocabs = Vocabs.load(Path(sys.argv[2]))
t0 = time.perf_counter()
cache = load_or_build([corpus], vocabs, Filters(), Path(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t0, "pairs": cache.report.read, "kept": len(cache)}))
"""

RAW_CHILD = r"""
import json, sys, time, itertools
from pathlib import Path
from nmt.tokenizer import Vocabs
vocabs = Vocabs.load(Path(sys.argv[2]))
n = int(sys.argv[3])
seconds = 0.0
with open(sys.argv[1] + ".es", encoding="utf-8") as fs, open(sys.argv[1] + ".en", encoding="utf-8") as ft:
    while True:
        src = [l.rstrip("\n") for l in itertools.islice(fs, 20000)]
        tgt = [l.rstrip("\n") for l in itertools.islice(ft, 20000)]
        if not src or n <= 0:
            break
        n -= len(src)
        t0 = time.perf_counter()
        vocabs.src.encode_batch_fast(src, add_special_tokens=False)
        vocabs.tgt.encode_batch_fast(tgt, add_special_tokens=False)
        seconds += time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "pairs": int(sys.argv[3]) - max(n, 0)}))
"""


def run_child(args: list[str]) -> tuple[str, float, float, float]:
    """(stdout, wall seconds, peak RSS in MiB, peak anonymous RSS in MiB) of one child process: the
    peak RSS from wait4's rusage; the anonymous part (RssAnon: the process's own memory, without the
    file pages of the memory-mapped token cache, which the kernel can drop at any time) sampled
    from /proc every 50 ms (0 where there is no /proc)."""
    import tempfile
    import threading

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT)
        peak_anon = [0]
        done = threading.Event()

        def sample() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while not done.wait(0.05):
                try:
                    kb = next(int(x.split()[1]) for x in status.read_text().splitlines() if x.startswith("RssAnon:"))
                except (OSError, StopIteration, ValueError):
                    continue
                peak_anon[0] = max(peak_anon[0], kb)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"child failed: {' '.join(args[:4])}…\n{err.read().decode()[-2000:]}")
        return out.read().decode(), wall, usage.ru_maxrss / 1024, peak_anon[0] / 1024


def make_corpus(prefix: Path, pairs: int) -> None:
    if prefix.with_suffix(".es").exists():
        return
    src = (DATA / "train.es").read_text(encoding="utf-8").splitlines()
    tgt = (DATA / "train.en").read_text(encoding="utf-8").splitlines()
    with open(f"{prefix}.es.tmp", "w", encoding="utf-8") as fs, open(f"{prefix}.en.tmp", "w", encoding="utf-8") as ft:
        written, copy = 0, 0
        while written < pairs:
            n = min(len(src), pairs - written)
            fs.writelines(f"{copy}. {s}\n" for s in src[:n])
            ft.writelines(f"{copy}. {t}\n" for t in tgt[:n])
            written += n
            copy += 1
    os.replace(f"{prefix}.es.tmp", f"{prefix}.es")
    os.replace(f"{prefix}.en.tmp", f"{prefix}.en")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500000,5000000")
    ap.add_argument("--workdir", default="/tmp/nmt-bench-cache")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--whole", action="store_true", help="Also the whole `nmt train` command's peak RSS.")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        run_child([py, "-m", "nmt", "train-tokenizer", "--train", str(DATA / "train"), "--out", str(tok_dir),
                   "--preset", "tiny"])
    print(f"{'pairs':>10} {'cache pairs/s':>14} {'raw pairs/s':>12} {'ratio':>6} {'RSS cache MiB':>14} "
          f"{'RSS train MiB':>14} {'anon train':>11} {'first step s':>13} {'cache MiB':>10}"
          + (f" {'RSS whole MiB':>14} {'anon whole':>11}" * args.whole))
    for size in (int(s) for s in args.sizes.split(",")):
        prefix = work / f"corpus{size}"
        make_corpus(prefix, size)
        cache_root = work / f"cache{size}"
        shutil.rmtree(cache_root, ignore_errors=True)  # measure a build, not a reuse
        out, wall, rss_cache, _ = run_child([py, "-c", CACHE_CHILD, str(prefix), str(tok_dir), str(cache_root)])
        built = json.loads(out)
        raw_out, _, _, _ = run_child([py, "-c", RAW_CHILD, str(prefix), str(tok_dir), str(min(size, 500_000))])
        raw = json.loads(raw_out)
        run = work / f"run{size}"  # a fresh run each time (an old one would resume), same tokenizer
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        (run / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
        t_start = time.time()
        _, _, rss_train, anon_train = run_child([py, "-m", "nmt", "train", "--train", str(prefix), "--dev", "none", "--preset", "tiny", "--out",
                   str(run), "--cache-dir", str(cache_root), "--max-steps", str(args.steps), "--log-every", "1",
                   "--eval-every", "100000"])
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        print(f"{size:>10,} {built['pairs'] / built['seconds']:>14,.0f} {raw['pairs'] / raw['seconds']:>12,.0f} "
              f"{(built['pairs'] / built['seconds']) / (raw['pairs'] / raw['seconds']):>6.2f} {rss_cache:>14,.0f} "
              f"{rss_train:>14,.0f} {anon_train:>11,.0f} {first['time'] - t_start:>13.1f} {du(cache_root) / 2**20:>10,.0f}"
              + (" {:>14,.0f} {:>11,.0f}".format(*whole_train_rss(work, prefix)) if args.whole else ""), flush=True)


def whole_train_rss(work: Path, prefix: Path) -> tuple[float, float]:
    """Peak RSS and peak anonymous RSS (MiB) of `nmt train` from nothing: a new run directory and cache, so the tokenizer is
    trained on its sample and the cache built, then 20 steps."""
    run, cache = work / "run-whole", work / "cache-whole"
    for p in (run, cache):
        shutil.rmtree(p, ignore_errors=True)
    _, _, rss, anon = run_child([sys.executable, "-m", "nmt", "train", "--train", str(prefix), "--dev", "none",
                           "--preset", "tiny", "--out", str(run), "--cache-dir", str(cache), "--max-steps", "20",
                           "--eval-every", "100000"])
    for p in (run, cache):
        shutil.rmtree(p, ignore_errors=True)
    return rss, anon


if __name__ == "__main__":
    main()
