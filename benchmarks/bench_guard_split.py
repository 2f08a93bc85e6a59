"""What the loop guard and --split-sentences do to a model's output on the embedded test set:

(a) the share of lines the guard retries and BLEU with and without it, greedy and beam 5;
(b) paragraphs of three consecutive test verses, translated as they are and with
    --split-sentences, BLEU against the three references joined with a space.

    python benchmarks/bench_guard_split.py -m runs/bible-es-en [--lines 1434] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "bible-es-en"


def bleu(hyps: list[str], refs: list[str]) -> float:
    from nmt import metrics

    scorer = metrics.build_metrics(metrics.MetricOptions(metrics=("bleu",)), [refs])
    return metrics.corpus_scores(hyps, scorer)["bleu"]["score"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--lines", type=int, default=0, help="first N test lines (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import nmt

    src = (DATA / "test.es").read_text(encoding="utf-8").splitlines()
    ref = (DATA / "test.en").read_text(encoding="utf-8").splitlines()
    if args.lines:
        src, ref = src[: args.lines], ref[: args.lines]
    model = nmt.load(args.model, threads=args.threads)
    print(f"model {args.model}, {len(src)} test lines, {args.threads} thread(s)")
    print("(a) loop guard")
    print(f"{'search':8} {'retried':>9} {'BLEU guard':>11} {'BLEU no guard':>14} {'s guard':>8} {'s no guard':>11}")
    for beam in (1, 5):
        start = time.perf_counter()
        guarded = list(model.translations(src, beam_size=beam))
        t_guard = time.perf_counter() - start
        start = time.perf_counter()
        plain = model.translate(src, beam_size=beam, guard=False)
        t_plain = time.perf_counter() - start
        retried = sum(t.retried for t in guarded) / len(guarded)
        print(f"{'greedy' if beam == 1 else f'beam {beam}':8} {100 * retried:8.1f}% "
              f"{bleu([t.text for t in guarded], ref):11.2f} {bleu(plain, ref):14.2f} {t_guard:8.1f} {t_plain:11.1f}")
    n = len(src) // 3 * 3
    paragraphs = [" ".join(src[i : i + 3]) for i in range(0, n, 3)]
    joined = [" ".join(ref[i : i + 3]) for i in range(0, n, 3)]
    print(f"(b) {len(paragraphs)} paragraphs of 3 verses, beam 5")
    print(f"{'':20} {'BLEU':>6} {'seconds':>8}")
    for split in (False, True):
        start = time.perf_counter()
        hyps = model.translate(paragraphs, split_sentences=split)
        print(f"{'--split-sentences' if split else 'whole paragraphs':20} {bleu(hyps, joined):6.2f} "
              f"{time.perf_counter() - start:8.1f}")


if __name__ == "__main__":
    main()
