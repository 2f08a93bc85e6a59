#!/usr/bin/env python3
"""Translation speed and BLEU on the embedded test set: nmt's Translator (fp32, bf16, int8), the
naive decoder without a cache, and the same model exported to CTranslate2 (fp32, int8), side by
side, at each thread count, greedy and beam search.

    python benchmarks/bench_translate.py -m RUN_DIR [--lines N] [--threads 1,2] [--beams 1,5] [--no-guard]

For each system: sentences/s and target tokens/s (EOS counted, as `nmt translate` reports
them) over the whole set, timed with perf_counter around one full pass after a short warm-up;
corpus BLEU (sacreBLEU, default settings) against test.en; and how many lines are identical
to nmt fp32 with the same search. Every system gets the same decoding options (length cap
a·|source| + b, batches of --batch-tokens source tokens, windows of 256 lines sorted by
length). The length penalty is normalised by |Y|^α ("average", which CTranslate2 computes
too) unless --length-norm gnmt is given, for which CTranslate2 has no equivalent; see
nmt.engines.CTranslate2 for the remaining differences (the cap, beam stopping).

    nmt fp32 / bf16   Translator, runtime dtype float32 / bfloat16 (autocast)
    nmt int8          torch dynamic quantisation of every nn.Linear (as `nmt translate --dtype int8`)
    naive greedy      engines.NaiveGreedy (search.greedy_no_cache): recomputes the whole prefix every step (on the
                      first --naive-lines lines only, it is slow; compare with "nmt fp32 (same lines)")
    ct2 fp32 / int8   the export, compute_type float32 / int8, intra_threads = the thread count

Runs for minutes on the full set with a small model on 2 cores: use --lines to cut it.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch

from nmt import checkpoint, engines, runtime
from nmt.config import DEFAULT_DATA, DecodeConfig
from nmt.export import export_ctranslate2
from nmt.model import count_parameters
from nmt.tokenizer import Vocabs
from nmt.translate import Translator

WARMUP_LINES = 8
NAIVE = "naive greedy, no cache"


@dataclass
class Row:
    system: str
    threads: int
    beam: int
    lines: int
    seconds: float
    target_tokens: int
    bleu: float
    texts: list[str]
    same: str = ""  # lines identical to nmt fp32 with the same search

    @property
    def sentences_per_s(self) -> float:
        return self.lines / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.target_tokens / self.seconds


def timed(run, lines: list[str]) -> tuple[float, list[str], int]:
    """(seconds, texts, target tokens incl. EOS) of run(lines), after a warm-up on a few lines."""
    run(lines[:WARMUP_LINES])
    t0 = time.perf_counter()
    texts, tokens = run(lines)
    return time.perf_counter() - t0, texts, tokens


def translator_runner(translator_of):
    """Every system behind the same Translator (sorting, truncation, token-budget batching)."""
    def run(lines):
        results = list(translator_of().translate(lines))
        return [r.text for r in results], sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
    return run


def nmt_runner(model, vocabs, rt, config: DecodeConfig):
    return translator_runner(lambda: Translator.from_model(model, vocabs, rt, config))


def naive_runner(model, vocabs, rt, config: DecodeConfig):
    """nmt.search.greedy_no_cache as an engine."""
    return translator_runner(lambda: Translator(engines.NaiveGreedy(model, rt, config), vocabs, config))


def ct2_runner(ct2_dir: Path, compute_type: str, threads: int, config: DecodeConfig):
    engine = engines.CTranslate2.load(ct2_dir, config, compute_type=compute_type, threads=threads)
    vocabs: Vocabs = engine.vocabs
    return translator_runner(lambda: Translator(engine, vocabs, config))


def bleu(texts: list[str], refs: list[str]) -> float:
    return sacrebleu.corpus_bleu(texts, [refs]).score


def bench_nmt(args, threads: int, src: list[str], ref: list[str]) -> list[Row]:
    rows = []
    n_naive = min(args.naive_lines, len(src))
    for dtype in ("float32", "bfloat16", "int8"):
        rt = runtime.setup("cpu", "float32" if dtype == "int8" else dtype, threads)
        model, vocabs, _ = checkpoint.load_for_inference(args.model)
        if dtype == "int8":
            with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        name = {"float32": "nmt fp32", "bfloat16": "nmt bf16", "int8": "nmt int8"}[dtype]
        for beam in args.beams:
            config = decode_config(args, beam)
            secs, texts, toks = timed(nmt_runner(model, vocabs, rt, config), src)
            rows.append(Row(name, threads, beam, len(src), secs, toks, bleu(texts, ref), texts))
            if dtype == "float32" and beam == 1 and n_naive:
                sub, sub_ref = src[:n_naive], ref[:n_naive]
                for label, runner in (("nmt fp32 (same lines)", nmt_runner(model, vocabs, rt, config)),
                                      (NAIVE, naive_runner(model, vocabs, rt, config))):
                    secs, texts, toks = timed(runner, sub)
                    rows.append(Row(label, threads, 1, n_naive, secs, toks, bleu(texts, sub_ref), texts))
    return rows


def bench_ct2(args, threads: int, ct2_dir: Path, src: list[str], ref: list[str]) -> list[Row]:
    rows = []
    for compute_type in ("float32", "int8"):
        for beam in args.beams:
            config = decode_config(args, beam)
            secs, texts, toks = timed(ct2_runner(ct2_dir, compute_type, threads, config), src)
            name = "ct2 fp32" if compute_type == "float32" else "ct2 int8"
            rows.append(Row(name, threads, beam, len(src), secs, toks, bleu(texts, ref), texts))
    return rows


def run_isolated(args, family: str, threads: int, ct2_dir: Path) -> list[Row]:
    """Each (family, thread count) in a process of its own: torch's and CTranslate2's OpenMP
    thread pools spin after each parallel region and, sharing a process, slow each other down."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "-m", str(args.model), "--lines", str(args.lines), "--beams",
           ",".join(map(str, args.beams)), "--naive-lines", str(args.naive_lines), "--length-norm", args.length_norm,
           "--batch-tokens", str(args.batch_tokens), "--data", str(args.data), "--worker", family,
           "--worker-threads", str(threads), "--ct2-dir", str(ct2_dir), *(["--no-guard"] if args.no_guard else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [Row(**r) for r in json.loads(out)]


def decode_config(args, beam: int) -> DecodeConfig:
    return DecodeConfig(beam_size=beam, length_norm=args.length_norm, batch_tokens=args.batch_tokens,
                        guard=not args.no_guard)


def mark_same(rows: list[Row]) -> None:
    references = ("nmt fp32", "nmt fp32 (same lines)")
    reference = {(r.beam, r.lines): r.texts for r in rows if r.system in references}
    for r in rows:
        ref = reference.get((r.beam, r.lines))
        if ref is not None and r.system not in references:
            r.same = f"{sum(a == b for a, b in zip(r.texts, ref))}/{r.lines}"


def print_machine(args, model_dir: Path, n_lines: int) -> None:
    import ctranslate2

    model, _, _ = checkpoint.load_for_inference(model_dir)
    c = model.config
    print(f"machine: {runtime.cpu_description()}, {os.cpu_count()} logical CPUs "
          f"({platform.machine()}, Python {platform.python_version()})")
    print(f"versions: torch {torch.__version__}, ctranslate2 {ctranslate2.__version__}, "
          f"sacrebleu {sacrebleu.__version__}")
    print(f"model: {model_dir} ({count_parameters(model):,} parameters, {c.encoder_layers}+{c.decoder_layers} layers, "
          f"d_model {c.d_model}, vocabulary {c.tgt_vocab_size:,}, {'pre' if c.pre_norm else 'post'}-norm)")
    d = decode_config(args, 1)
    print(f"data: {n_lines} lines of {args.data}/test.es → test.en; cap {d.max_length_a}·|source| + "
          f"{d.max_length_b}, length penalty α={d.length_penalty} ({args.length_norm}), batches of "
          f"{args.batch_tokens} source tokens; CTranslate2 caps: exact (one call per distinct cap)")
    print()


def print_table(rows: list[Row]) -> None:
    header = (f"{'system':<24}{'threads':>8}{'search':>9}{'lines':>7}{'sent/s':>9}{'tok/s':>9}{'BLEU':>7}"
              f"{'= nmt fp32':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        search = "greedy" if r.beam == 1 else f"beam {r.beam}"
        print(f"{r.system:<24}{r.threads:>8}{search:>9}{r.lines:>7}{r.sentences_per_s:>9.1f}{r.tokens_per_s:>9.0f}"
              f"{r.bleu:>7.2f}{r.same:>12}")
    print()


def print_ratios(rows: list[Row]) -> None:
    """nmt ÷ CTranslate2 speed (sentences/s) at equal precision, threads and search."""
    by = {(r.system, r.threads, r.beam): r for r in rows}
    print("speed ratio nmt ÷ CTranslate2 (sentences/s; < 1: CTranslate2 is faster)")
    print(f"{'threads':>8}{'search':>9}{'nmt fp32':>10}{'ct2 fp32':>10}{'ratio':>7}{'nmt int8':>10}{'ct2 int8':>10}"
          f"{'ratio':>7}{'naive÷nmt':>11}")
    for (system, threads, beam), r in by.items():
        if system != "nmt fp32":
            continue
        cells = []
        for precision in ("fp32", "int8"):
            ours, theirs = by.get((f"nmt {precision}", threads, beam)), by.get((f"ct2 {precision}", threads, beam))
            cells.append(f"{ours.sentences_per_s:>10.1f}{theirs.sentences_per_s:>10.1f}"
                         f"{ours.sentences_per_s / theirs.sentences_per_s:>7.2f}")
        naive, same = by.get((NAIVE, threads, beam)), by.get(("nmt fp32 (same lines)", threads, beam))
        ratio = f"{naive.sentences_per_s / same.sentences_per_s:>11.2f}" if naive and same else f"{'':>11}"
        search = "greedy" if beam == 1 else f"beam {beam}"
        print(f"{threads:>8}{search:>9}{''.join(cells)}{ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", type=Path, required=True, help="model directory written by `nmt train`")
    p.add_argument("--lines", type=int, default=0, help="first N lines of the test set (0: all)")
    p.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    p.add_argument("--beams", default="1,5", help="comma-separated beam sizes (1 = greedy)")
    p.add_argument("--naive-lines", type=int, default=50, help="lines for the naive no-cache decoder (0: skip it)")
    p.add_argument("--length-norm", choices=("average", "gnmt"), default="average")
    p.add_argument("--batch-tokens", type=int, default=DecodeConfig.batch_tokens)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with test.es and test.en")
    p.add_argument("--no-guard", action="store_true",
                   help="decode without the loop guard's retries (as before the guard existed: for side-by-side runs with older code)")
    p.add_argument("--worker", choices=("nmt", "ct2"), help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ct2-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.beams = [int(b) for b in args.beams.split(",")]
    src = (args.data / "test.es").read_text(encoding="utf-8").splitlines()
    ref = (args.data / "test.en").read_text(encoding="utf-8").splitlines()
    if args.lines:
        src, ref = src[: args.lines], ref[: args.lines]
    if args.worker:
        import dataclasses
        import json

        rows = (bench_nmt(args, args.worker_threads, src, ref) if args.worker == "nmt"
                else bench_ct2(args, args.worker_threads, args.ct2_dir, src, ref))
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    print_machine(args, args.model, len(src))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ct2_dir = export_ctranslate2(args.model, Path(tmp) / "ct2")
        for threads in (int(t) for t in args.threads.split(",")):
            group = run_isolated(args, "nmt", threads, ct2_dir) + run_isolated(args, "ct2", threads, ct2_dir)
            mark_same(group)
            rows += group
    print_table(rows)
    print_ratios(rows)


if __name__ == "__main__":
    main()
