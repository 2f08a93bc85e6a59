#!/usr/bin/env python3
"""What a time budget buys: the recipe `nmt train` chooses against today's `small` preset.

    python benchmarks/bench_budget.py [--budgets 10m,30m,90m] [--dtypes auto,float32] [--threads 0]
                                      [--systems recipe,small,recipe:compact] [--seed N] [--out runs/budget]

For each budget and dtype, trains on the embedded corpus with `nmt train --max-time B` (the
recipe chosen from the budget) and with `nmt train --preset small --max-time B` (the fixed
preset); `recipe:NAME` is the recipe with the shape NAME of `nmt.recipe.SHAPES` set by hand (a
`--config` file with its five shape options: the recipe then times that shape alone and fits the
rest to it), to check the recipe's choice of shape against another. Each runs in its own process
and run directory, then translates the test set greedily and with beam 5 and scores it with
`nmt evaluate` (reference test.en). Prints one row per run: the recipe chosen, target tokens/s,
steps, best dev BLEU, test BLEU greedy and beam 5, and the share of greedy lines `nmt evaluate`
flags as repetition loops. Dev BLEU is what the recipe rules were tuned on; test BLEU is only
reported.

A dtype that `auto` resolves to on this machine is run once (float32 on a CPU without bf16
units). `--threads 1` slows the machine predictably, to check the rules at another speed; `--seed N`
trains with another seed (weights, batches, dropout, tokenizer sample), to see one run's spread.
Runs that exist already in --out are scored again, not retrained (delete them to retrain).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nmt.recipe import SHAPES  # noqa: E402  (light: no torch)
SHAPE_BY_NAME = {s.name: s for s in SHAPES}
DATA = ROOT / "data" / "bible-es-en"


def nmt(*args: str, stdin: bytes | None = None, threads: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "nmt", *args], input=stdin, capture_output=True, env=env, cwd=ROOT)


def resolved_dtype() -> str:
    code = "from nmt.runtime import setup; print(str(setup('cpu', 'auto').dtype).removeprefix('torch.'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def train(system: str, budget: str, dtype: str, threads: int, out: Path, seed: int | None = None) -> None:
    if (out / "training.json").exists():
        return
    args = ["train", "--max-time", budget, "--out", str(out), "--threads", str(threads)]
    if seed is not None:
        args += ["--seed", str(seed)]
    if dtype != "auto":
        args += ["--dtype", dtype]
    if system == "small":
        args += ["--preset", "small"]
    elif system.startswith("recipe:"):
        out.parent.mkdir(parents=True, exist_ok=True)
        shape = SHAPE_BY_NAME[system.removeprefix("recipe:")]
        (out.parent / f"{out.name}.json").write_text(json.dumps({"model": shape.model_fields()}))
        args += ["--config", str(out.parent / f"{out.name}.json")]
    r = nmt(*args, threads=threads)
    (out / "train.log").write_bytes(r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{out}: nmt train failed:\n{r.stderr.decode()[-2000:]}")


def score(out: Path, beam: int, threads: int) -> tuple[float, float]:
    hyp = out / f"test.beam{beam}.en"
    if not hyp.exists():
        r = nmt("translate", "-m", str(out), "-i", str(DATA / "test.es"), "-o", str(hyp), "--beam-size", str(beam),
                "--threads", str(threads), threads=threads)
        if r.returncode != 0:
            raise SystemExit(f"{out}: nmt translate failed:\n{r.stderr.decode()[-2000:]}")
    r = nmt("evaluate", "-i", str(hyp), "-r", str(DATA / "test.en"), "--src", str(DATA / "test.es"), "--format", "json")
    system = json.loads(r.stdout)["systems"][0]
    return system["scores"]["bleu"]["score"], system["diagnostics"]["repetition_loops"]["share"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="10m,30m,90m")
    ap.add_argument("--dtypes", default="auto,float32")
    ap.add_argument("--systems", default="recipe,small")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "budget")
    args = ap.parse_args()
    for system in args.systems.split(","):
        if system not in ("recipe", "small") and not (system.startswith("recipe:") and
                                                      system.removeprefix("recipe:") in SHAPE_BY_NAME):
            ap.error(f"--systems: {system!r} is not recipe, small or recipe:NAME with NAME one of "
                     f"{', '.join(SHAPE_BY_NAME)}")
    own = resolved_dtype()
    dtypes = []
    for d in args.dtypes.split(","):
        d = own if d == "auto" else d
        if d not in dtypes:
            dtypes.append(d)
    cpu = subprocess.run([sys.executable, "-c", "from nmt.runtime import cpu_description; print(cpu_description())"],
                         capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"machine: {cpu}, {args.threads or os.cpu_count()} threads; auto dtype here: {own}", flush=True)
    print(f"{'budget':>6} {'dtype':<8} {'system':<14} {'recipe':<60} {'tok/s':>6} {'steps':>6} {'dev':>5} "
          f"{'greedy':>6} {'beam5':>6} {'loops':>6}", flush=True)
    for budget in args.budgets.split(","):
        for dtype in dtypes:
            for system in args.systems.split(","):
                seed = "" if args.seed is None else f"-seed{args.seed}"
                out = args.out / f"{budget}-{dtype}-{system.replace(':', '-')}-t{args.threads}{seed}"
                train(system, budget, dtype, args.threads, out, args.seed)
                summary = json.loads((out / "training.json").read_text())
                config = json.loads((out / "config.json").read_text())
                recipe = config.get("recipe", {}).get("reason", "") if system != "small" else "preset small"
                greedy, loops = score(out, 1, args.threads)
                beam, _ = score(out, 5, args.threads)
                print(f"{budget:>6} {dtype:<8} {system:<14} {recipe[:60]:<60} {summary['target_tokens_per_s']:>6,.0f} "
                      f"{summary['steps']:>6} {summary['best_dev_bleu']:>5.1f} {greedy:>6.1f} {beam:>6.1f} "
                      f"{100 * loops:>5.1f}%", flush=True)


if __name__ == "__main__":
    main()
