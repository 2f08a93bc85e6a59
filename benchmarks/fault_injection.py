#!/usr/bin/env python3
"""Fault injection: kill -9 at random points, a full disk, closed and full standard streams.

    python benchmarks/fault_injection.py [--seed 1] [--kills 2] [--workdir DIR]

Each case runs the real `nmt` command in a child process and checks what a user would see:
- kill -9 at random moments while the token cache is built, then a re-run: it succeeds, the
  cache verifies, and no temporary (`*.tmp-PID`) is left;
- kill -9 at random moments of a short tiny-preset training (tokenizer, cache, steps,
  checkpoint writes and pruning), then a re-run: it finishes, every checkpoint is whole and
  nothing temporary is left;
- a full disk: a small tmpfs (where `mount -t tmpfs` is allowed, e.g. as root) under the run
  directory, at sizes that fail in different writers: one `nmt: error:` line, exit 1, no
  traceback, no temporary left;
- stdout on a full device (/dev/full, or one made with mknod), stdout closed (`>&-`), stdin
  closed (`<&-`): one error line and exit 1, never exit 0 with the results lost.
Cases that the machine cannot stage (no mount, no /dev/full) are reported as skipped.
It exits 1 if any case fails. CI runs it after the tests (.ci/run); it took 150–200 s on one
shared core here (most of it the kill-and-rerun trainings; `--only streams,disk` takes 40 s).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bible-es-en"
PY = sys.executable

results: list[tuple[str, str, str]] = []  # (case, PASS/FAIL/SKIP, detail)


def record(case: str, ok: bool | None, detail: str = "") -> None:
    status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    results.append((case, status, detail))
    print(f"{status}  {case}{': ' + detail if detail else ''}", flush=True)


def nmt(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "nmt", *args], cwd=ROOT, capture_output=True, timeout=600, **kwargs)


def shell(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, timeout=600)


def one_error_line(r: subprocess.CompletedProcess, code: int = 1) -> str | None:
    """None if stderr ends in exactly one `nmt: error:` line, exit `code`, no traceback; else what is wrong."""
    err = r.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("nmt: error: ")]
    if r.returncode != code:
        return f"exit {r.returncode}, expected {code}: {err[-300:]!r}"
    if "Traceback" in err or "internal error" in err or "Exception ignored" in err:
        return f"not one line: {err[-300:]!r}"
    if len(errors) != 1 or lines[-1] != errors[0]:
        return f"expected one error line at the end: {err[-300:]!r}"
    return None


def temporaries(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if ".tmp-" in p.name)


def write_corpus(prefix: Path, pairs: int, numbered: bool = False) -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for lang in ("es", "en"):
        lines = (DATA / f"train.{lang}").read_text(encoding="utf-8").splitlines()
        out = [f"{i // len(lines)}. {lines[i % len(lines)]}" if numbered else lines[i % len(lines)]
               for i in range(pairs)]
        (prefix.parent / f"{prefix.name}.{lang}").write_text("\n".join(out) + "\n", encoding="utf-8")
    return prefix


def kill_at_random(args: list[str], rng: random.Random, took: float) -> float:
    """Start a child, SIGKILL it after a random share (15–95%) of the `took` seconds an uninterrupted
    run took (the first second is imports); the delay, or -1 if it ended first."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.15, 0.95) * took
    try:
        proc.wait(timeout=delay)
        return -1.0
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return delay


CACHE_CHILD = r"""
import sys
from pathlib import Path
from nmt.cache import Filters, load_or_build, verify
from nmt.corpus import ParallelCorpus
from nmt.tokenizer import Vocabs
cache = load_or_build([ParallelCorpus.from_prefix(sys.argv[1], "es", "en")], Vocabs.load(Path(sys.argv[2])),
                      Filters(), Path(sys.argv[3]))
assert verify(cache.directory, cache.directory.name) is None
print(len(cache))
"""


def kills_during_caching(work: Path, rng: random.Random, kills: int) -> None:
    corpus = write_corpus(work / "cache-data" / "c", 15_000, numbered=True)
    tok = work / "tok"
    r = nmt("train-tokenizer", "--train", str(DATA / "train"), "--out", str(tok), "--vocab-size", "600")
    if r.returncode:
        return record("kill -9 while caching", False, f"train-tokenizer failed: {r.stderr.decode()[-300:]}")
    root = work / "cache"
    t0 = time.perf_counter()
    first = subprocess.run([PY, "-c", CACHE_CHILD, str(corpus), str(tok), str(work / "cache-timing")], cwd=ROOT,
                           capture_output=True)
    took = time.perf_counter() - t0
    shutil.rmtree(work / "cache-timing", ignore_errors=True)
    if first.returncode:
        return record("kill -9 while caching", False, first.stderr.decode()[-300:])
    delays = []
    for _ in range(kills):
        delays.append(kill_at_random([PY, "-c", CACHE_CHILD, str(corpus), str(tok), str(root)], rng, took))
        for built in root.glob("[!.]*"):  # a build that finished first would make the next kill a reuse
            if built.is_dir() and delays[-1] < 0:
                shutil.rmtree(built)
    left = temporaries(root) if root.exists() else []
    r = subprocess.run([PY, "-c", CACHE_CHILD, str(corpus), str(tok), str(root)], cwd=ROOT, capture_output=True)
    after = temporaries(root)
    ok = r.returncode == 0 and not after and r.stdout.strip() == first.stdout.strip()
    record("kill -9 while caching, then a re-run", ok,
           f"killed at {', '.join(f'{d:.1f}s' for d in delays)} of {took:.1f}s; {len(left)} temporaries "
           f"before the re-run, {after or 'none'} after" + ("" if r.returncode == 0 else f"; {r.stderr.decode()[-300:]}"))


def train_args(data: Path, dev: Path, out: Path, steps: int = 30) -> list[str]:
    return ["train", "--train", str(data), "--dev", str(dev), "--out", str(out), "--preset", "tiny",
            "--max-steps", str(steps), "--eval-every", "10", "--keep-last", "2", "--vocab-size", "600",
            "--dtype", "float32"]


def kills_during_training(work: Path, rng: random.Random, kills: int) -> None:
    data = write_corpus(work / "train-data" / "train", 1500)
    dev = write_corpus(work / "train-data" / "dev", 20)
    out = work / "run"
    t0 = time.perf_counter()
    timing = nmt(*train_args(data, dev, work / "run-timing"))
    took = time.perf_counter() - t0
    shutil.rmtree(work / "run-timing", ignore_errors=True)
    if timing.returncode:
        return record("kill -9 while training", False, timing.stderr.decode()[-300:])
    delays = [kill_at_random([PY, "-m", "nmt", *train_args(data, dev, out)], rng, took) for _ in range(kills)]
    left = temporaries(out) if out.exists() else []
    r = nmt(*train_args(data, dev, out))
    after = temporaries(out)
    steps = sorted((out / "checkpoints").glob("step-*"))
    whole = all((p / "model.safetensors").exists() and (p / "state.pt").exists() for p in steps)
    ok = r.returncode == 0 and not after and whole and (out / "model.safetensors").exists()
    record("kill -9 while training, then a re-run", ok,
           f"killed at {', '.join(f'{d:.1f}s' for d in delays)} of {took:.1f}s; {len(left)} temporaries before "
           f"the re-run, {after or 'none'} after; checkpoints {[p.name for p in steps]}"
           + ("" if r.returncode == 0 else f"; {r.stderr.decode()[-300:]}"))


def full_disk(work: Path) -> None:
    data = write_corpus(work / "full-data" / "train", 1500)
    dev = write_corpus(work / "full-data" / "dev", 20)
    for size in ("12k", "100k", "1200k", "2500k"):  # full in the cache (memo, ids), the weights, a checkpoint
        mnt = work / f"tmpfs-{size}"
        mnt.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                 capture_output=True)
        if mounted.returncode:
            return record("full disk (tmpfs)", None, f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        try:
            r = nmt(*train_args(data, dev, mnt / "run", steps=10))
            problem = one_error_line(r)
            left = temporaries(mnt)
            said = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            record(f"full disk ({size} tmpfs under nmt train)", problem is None and not left and "disk full" in said[0],
                   problem or (f"temporaries left: {left}" if left else said[0][:160]))
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def standard_streams(work: Path) -> None:
    ref = work / "ref.en"
    shutil.copy(DATA / "dev.en", ref)
    full = Path("/dev/full")
    if not full.is_char_device():
        full = work / "full"
        try:
            os.mknod(full, 0o666 | 0o020000, os.makedev(1, 7))
        except OSError:
            full = None  # type: ignore[assignment]
    evaluate = f"{PY} -m nmt evaluate -r {ref}"
    cases = [("stdin closed (nmt evaluate <&-)", f"{evaluate} <&-"),
             ("stdout closed (nmt evaluate >&-)", f"{evaluate} -i {ref} >&-")]
    if full is not None:
        cases += [("stdout on a full device (nmt evaluate > full)", f"{evaluate} -i {ref} > {full}"),
                  ("stdout on a full device, per-line scores", f"{evaluate} -i {ref} --sentence-level > {full}")]
    else:
        record("stdout on a full device", None, "no /dev/full and no permission to make one")
    for case, command in cases:
        problem = one_error_line(shell(command))
        record(case, problem is None, problem or "")
    r = shell(f"{evaluate} -i {ref} --sentence-level | head -1")
    record("stdout a pipe closed early (nmt evaluate | head -1)", r.returncode == 0 and not r.stderr.strip(),
           r.stderr.decode()[-200:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=int(time.time()) % 10_000, help="Kill times (printed).")
    ap.add_argument("--kills", type=int, default=2, help="Kills per scenario.")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--only", default="streams,disk,cache,train", help="Comma-separated scenarios to run.")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nmt-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"fault injection, seed {args.seed}, in {work}", flush=True)
    t0 = time.perf_counter()
    try:
        only = set(args.only.split(","))
        for name, scenario in (("streams", standard_streams), ("disk", full_disk),
                               ("cache", lambda w: kills_during_caching(w, rng, args.kills)),
                               ("train", lambda w: kills_during_training(w, rng, args.kills))):
            if name in only:
                scenario(work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [case for case, status, _ in results if status == "FAIL"]
    print(f"{len(results) - len(failed)} of {len(results)} cases clean ({sum(s == 'SKIP' for _, s, _ in results)} "
          f"skipped) in {time.perf_counter() - t0:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
