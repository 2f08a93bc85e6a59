"""The speed cost of `nmt translate --alignment`: lines/s with and without, side by side, in one
process on the same lines (alternating runs, the best of each kept).

    python benchmarks/bench_alignment.py -m runs/bible-es-en [-i data/bible-es-en/test.es] [--lines 500]
        [--beam-size 5] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-i", "--input", default=str(ROOT / "data" / "bible-es-en" / "test.es"))
    ap.add_argument("--lines", type=int, default=500)
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import nmt

    lines = Path(args.input).read_text(encoding="utf-8").splitlines()[: args.lines]
    model = nmt.load(args.model, threads=args.threads, beam_size=args.beam_size)
    best = {False: float("inf"), True: float("inf")}
    model.translate(lines[:8])  # warm-up
    for _ in range(args.repeats):
        for aligned in (False, True):
            start = time.perf_counter()
            model.translate(lines, alignment=aligned)
            best[aligned] = min(best[aligned], time.perf_counter() - start)
    print(f"{platform.processor() or platform.machine()}, {args.threads} thread(s), beam {args.beam_size}, "
          f"{len(lines)} lines of {args.input}, best of {args.repeats}")
    print(f"{'':18} {'lines/s':>9}")
    for aligned in (False, True):
        print(f"{'--alignment' if aligned else 'no alignment':18} {len(lines) / best[aligned]:9.1f}")
    print(f"cost of --alignment: {100 * (best[True] / best[False] - 1):+.1f}% time")


if __name__ == "__main__":
    main()
