#!/usr/bin/env python3
"""A trained model's second life, measured: domain adaptation by fine-tuning, and one model for
both directions against two one-direction models, each pair of arms at the same total time.

    python benchmarks/bench_second_life.py --minutes 30 [--preset auto|tiny|small] [--threads 0]
                                           [--beam 5] [--out runs/second-life] [--only a,b]

(a) Domain adaptation. `train` is split by book (`train.ids` names each verse's book): the Old
    Testament (Genesis … Malachi) and the New (Matthew … Revelation of John). A base model trains
    on the Old Testament for 3/4 of the budget, then is fine-tuned (`--init-from`) on the New
    Testament for the remaining 1/4; a third model trains on everything for the whole budget.
    BLEU (es→en, reference test.en) on the test set's New Testament books (Mark, Galatians,
    James, I Peter: the new domain) and on its Old Testament books (Esther, Lamentations, Joel:
    what the fine-tune forgets), for the base before and after fine-tuning and for the mixed model.
(b) Directions. One es↔en model (`--pairs es-en,en-es`) for the whole budget against an es→en and
    an en→es model for half of it each: BLEU es→en (reference test.en) and en→es (reference test.es).

Each run is its own `nmt train` process in its own directory under --out (a run already there
resumes, so its budget is not spent twice: delete --out to start over). Dev BLEU follows the
default dev set. Test BLEU is by `nmt evaluate` (sacreBLEU) on `nmt translate --beam-size B`.
`--preset auto` lets the budget recipe choose each from-scratch model (a fine-tune keeps its
parent's); a fixed preset makes all arms the same shape. Prints one table per measurement.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bible-es-en"
NT_BOOKS = {"Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians", "II Corinthians", "Galatians",
            "Ephesians", "Philippians", "Colossians", "I Thessalonians", "II Thessalonians", "I Timothy",
            "II Timothy", "Titus", "Philemon", "Hebrews", "James", "I Peter", "II Peter", "I John", "II John",
            "III John", "Jude", "Revelation of John"}


def book(verse_id: str) -> str:
    return verse_id.rsplit(" ", 1)[0]  # "I Peter 1:1" → "I Peter"


def nmt(*args: str, stdin: bytes | None = None, threads: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, "-m", "nmt", *args], input=stdin, capture_output=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"nmt {' '.join(args[:3])} … failed:\n{r.stderr.decode()[-2000:]}")
    return r


def split_by_testament(split: str, out: Path) -> dict[str, Path]:
    """OUT/SPLIT-ot.{es,en} and OUT/SPLIT-nt.{es,en}; returns the prefixes."""
    ids = (DATA / f"{split}.ids").read_text(encoding="utf-8").splitlines()
    sides = {lang: (DATA / f"{split}.{lang}").read_text(encoding="utf-8").splitlines() for lang in ("es", "en")}
    prefixes = {}
    for part in ("ot", "nt"):
        keep = [i for i, v in enumerate(ids) if (book(v) in NT_BOOKS) == (part == "nt")]
        prefixes[part] = out / f"{split}-{part}"
        for lang, lines in sides.items():
            Path(f"{prefixes[part]}.{lang}").write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return prefixes


def train(out: Path, minutes: float, args, *options: str) -> float:
    """Train (or resume) a run; returns its wall-clock seconds."""
    preset = [] if args.preset == "auto" else ["--preset", args.preset]
    t0 = time.monotonic()
    has_init = "--init-from" in options
    nmt("train", *([] if has_init else preset), "--max-time", f"{minutes * 60:.0f}s", "--out", str(out),
        "--threads", str(args.threads), *options, threads=args.threads)
    return time.monotonic() - t0


def bleu(model: Path, src: Path, ref: Path, args, *options: str) -> float:
    hyp = nmt("translate", "-m", str(model), "--beam-size", str(args.beam), "--threads", str(args.threads),
              *options, stdin=src.read_bytes(), threads=args.threads).stdout
    hyp_file = model / f"bench-{src.name}-{'-'.join(o.strip('-') for o in options) or 'hyp'}.txt"
    hyp_file.write_bytes(hyp)
    r = nmt("evaluate", "-r", str(ref), "-i", str(hyp_file), "--score-only", "--metrics", "bleu")
    return float(r.stdout.decode().split()[0])


def domain_adaptation(args, out: Path) -> None:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_parts, test_parts = split_by_testament("train", data), split_by_testament("test", data)
    m = args.minutes
    runs = {"base (OT)": out / "a-base-ot", "fine-tuned (OT → NT)": out / "a-finetuned-nt",
            "mixed (all train)": out / "a-mixed"}
    seconds = {
        "base (OT)": train(runs["base (OT)"], 0.75 * m, args, "--train", str(train_parts["ot"])),
        "fine-tuned (OT → NT)": train(runs["fine-tuned (OT → NT)"], 0.25 * m, args, "--init-from",
                                      str(runs["base (OT)"]), "--train", str(train_parts["nt"])),
        "mixed (all train)": train(runs["mixed (all train)"], m, args, "--train", str(DATA / "train")),
    }
    budget = {"base (OT)": 0.75 * m, "fine-tuned (OT → NT)": m, "mixed (all train)": m}
    print(f"\n(a) domain adaptation, es→en, test BLEU (beam {args.beam}); budgets in minutes of training")
    print("| model | training budget | NT test books (Mark, Galatians, James, I Peter) | OT test books (Esther, Lamentations, Joel) | wall s (this run) |")
    print("| --- | --- | --- | --- | --- |")
    for name, run in runs.items():
        nt = bleu(run, Path(f"{test_parts['nt']}.es"), Path(f"{test_parts['nt']}.en"), args)
        ot = bleu(run, Path(f"{test_parts['ot']}.es"), Path(f"{test_parts['ot']}.en"), args)
        total = f"{budget[name]:g}" + (f" ({0.75 * m:g} + {0.25 * m:g})" if "fine" in name else "")
        print(f"| {name} | {total} | {nt:.2f} | {ot:.2f} | {seconds[name]:.0f} |")


def directions(args, out: Path) -> None:
    m = args.minutes
    both = out / "b-es-en-both"
    t_both = train(both, m, args, "--pairs", "es-en,en-es")
    one = {("es", "en"): out / "b-es-en", ("en", "es"): out / "b-en-es"}
    t_one = sum(train(run, m / 2, args, "--src", s, "--tgt", t) for (s, t), run in one.items())
    print(f"\n(b) one model for both directions against two one-direction models, test BLEU (beam {args.beam})")
    print("| system | training budget (min) | es→en (ref test.en) | en→es (ref test.es) | wall s |")
    print("| --- | --- | --- | --- | --- |")
    row = [bleu(both, DATA / "test.es", DATA / "test.en", args, "--tgt-lang", "en"),
           bleu(both, DATA / "test.en", DATA / "test.es", args, "--tgt-lang", "es")]
    print(f"| one es↔en model (--pairs es-en,en-es) | {m:g} | {row[0]:.2f} | {row[1]:.2f} | {t_both:.0f} |")
    row = [bleu(one[("es", "en")], DATA / "test.es", DATA / "test.en", args),
           bleu(one[("en", "es")], DATA / "test.en", DATA / "test.es", args)]
    print(f"| two one-direction models | {m / 2:g} + {m / 2:g} | {row[0]:.2f} | {row[1]:.2f} | {t_one:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="total training budget of each arm")
    p.add_argument("--preset", default="auto", help="auto (the budget recipe), tiny, small, base, big")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "second-life")
    p.add_argument("--only", default="a,b", help="which measurements: a (domain adaptation), b (directions)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# nmt second life: {args.minutes:g} min per arm, preset {args.preset}, threads {args.threads or 'all'}, "
          f"{os.cpu_count()} CPUs")
    if "a" in args.only:
        domain_adaptation(args, args.out)
    if "b" in args.only:
        directions(args, args.out)


if __name__ == "__main__":
    main()
