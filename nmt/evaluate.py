"""`nmt evaluate`: score hypothesis files against references with sacreBLEU, compare systems.

This module reads the files (through `nmt.textio`, so bad UTF-8 names file and line), checks
that they line up, calls `nmt.metrics` and formats the results: sacreBLEU-style score lines
with signatures, a table for several systems, JSON, bare numbers or per-line scores. All
numbers come from `nmt.metrics` (sacreBLEU); nothing here computes a score.

Lines are read as sacreBLEU's command line reads them (trailing whitespace removed), so scores
equal `sacrebleu REF… -i HYP` on the same files. Data goes to stdout, logs to stderr.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Annotated, List, Optional

import typer

from nmt.errors import NmtError, UsageError
from nmt.metrics import DEFAULT_SEED, MetricOptions, parse_metric_names
from nmt.textio import STDIN, display_name, json_line, one_line, read_lines, refuse_terminal_stdin, same_file

log = logging.getLogger(__name__)

FORMATS = ("text", "json")


@dataclass
class System:
    """One system's output: its display name, lines, and length-cap flags if known."""

    name: str
    lines: list[str]
    hit_max_length: Optional[list[bool]] = None


@dataclass(frozen=True)
class Settings:
    """The checked options that decide what is computed and how it is printed."""

    metric_options: MetricOptions
    fmt: str
    score_only: bool
    width: int
    paired: Optional[str]  # "bs", "ar" or None (decided once the systems are known)
    paired_n: int
    confidence_n: int  # bootstrap resamples for confidence intervals (single system or AR)
    confidence: bool
    seed: int
    sentence_level: bool


_opt = typer.Option

InputOpt = Annotated[
    Optional[List[str]],
    _opt("--input", "-i", metavar="FILE", help="Hypotheses (default: stdin); repeat for several systems."),
]
RefOpt = Annotated[
    Optional[List[str]], _opt("--ref", "-r", metavar="FILE", help="Reference file; repeat for multi-reference.")
]
MetricsOpt = Annotated[
    Optional[List[str]],
    _opt("--metrics", "-m", metavar="LIST", help="bleu, chrf, ter; comma-separated or repeated (default: bleu,chrf)."),
]
TokenizeOpt = Annotated[str, _opt("--tokenize", metavar="NAME", help="BLEU tokenizer, as sacreBLEU's --tokenize.")]
LowercaseOpt = Annotated[bool, _opt("--lowercase", help="Case-insensitive BLEU (sacreBLEU's --lowercase).")]
ChrfWordOrderOpt = Annotated[int, _opt("--chrf-word-order", help="chrF word n-gram order; 2 gives chrF++.")]
FormatOpt = Annotated[str, _opt("--format", "-f", metavar="text|json", help="Output format.")]
ScoreOnlyOpt = Annotated[
    bool, _opt("--score-only", "-b", help="Only the numbers: one per metric (and system) per line.")
]
WidthOpt = Annotated[int, _opt("--width", "-w", help="Decimals in text output (JSON keeps full precision).")]
SrcOpt = Annotated[
    Optional[str], _opt("--src", metavar="FILE", help="Source file: share of outputs identical to it.")
]
JsonlOpt = Annotated[
    Optional[List[str]],
    _opt(
        "--translate-jsonl",
        metavar="FILE",
        help="`nmt translate --format jsonl` output of each -i (same order): share that hit the length cap.",
    ),
]
BaselineOpt = Annotated[
    Optional[str], _opt("--baseline", metavar="FILE", help="Baseline for paired tests (default: the first -i).")
]
PairedBsOpt = Annotated[
    bool, _opt("--paired-bs", help="Paired bootstrap resampling test (the default with several systems).")
]
PairedArOpt = Annotated[bool, _opt("--paired-ar", help="Paired approximate randomisation test.")]
PairedBsNOpt = Annotated[int, _opt("--paired-bs-n", help="Bootstrap resamples (also for confidence intervals).")]
PairedArNOpt = Annotated[
    Optional[int], _opt("--paired-ar-n", help="Approximate randomisation trials (with --paired-ar; default 10000).")
]
PAIRED_AR_N = 10000  # sacreBLEU's default
ConfidenceOpt = Annotated[
    bool, _opt("--confidence", help="One system: bootstrap 95% confidence interval (--paired-bs-n resamples).")
]
SeedOpt = Annotated[int, _opt("--seed", help="Resampling seed (sacreBLEU's SACREBLEU_SEED).")]
SentenceOpt = Annotated[bool, _opt("--sentence-level", help="Per-line scores: TSV (text) or JSON lines (json).")]


def evaluate(
    input: InputOpt = None,
    ref: RefOpt = None,
    metrics: MetricsOpt = None,
    tokenize: TokenizeOpt = "13a",
    lowercase: LowercaseOpt = False,
    chrf_word_order: ChrfWordOrderOpt = 0,
    fmt: FormatOpt = "text",
    score_only: ScoreOnlyOpt = False,
    width: WidthOpt = 1,
    src: SrcOpt = None,
    translate_jsonl: JsonlOpt = None,
    baseline: BaselineOpt = None,
    paired_bs: PairedBsOpt = False,
    paired_ar: PairedArOpt = False,
    paired_bs_n: PairedBsNOpt = 1000,
    paired_ar_n: PairedArNOpt = None,
    confidence: ConfidenceOpt = False,
    seed: SeedOpt = DEFAULT_SEED,
    sentence_level: SentenceOpt = False,
) -> None:
    """Score hypotheses against references with sacreBLEU (BLEU, chrF, TER), with signatures.

    Several -i files are compared with sacreBLEU's paired significance test against the
    baseline, with 95% confidence intervals. Diagnostics (length ratio, empty lines, copies of
    the source, repetition loops, length-cap hits) are printed with the scores.
    """
    if paired_ar_n is not None and not paired_ar:
        raise UsageError("--paired-ar-n sets the trials of the approximate randomisation test: give --paired-ar too")
    settings = _check_options(
        metrics, tokenize, lowercase, chrf_word_order, fmt, score_only, width, paired_bs, paired_ar,
        paired_bs_n, PAIRED_AR_N if paired_ar_n is None else paired_ar_n, confidence, seed, sentence_level,
    )  # fmt: skip
    inputs = input or [STDIN]
    _check_paths(inputs, ref, src, baseline, translate_jsonl)
    if sentence_level and (len(inputs) > 1 or (baseline is not None and not same_file(inputs[0], baseline))):
        raise UsageError("--sentence-level scores one system: give a single -i")
    if sentence_level and (src is not None or translate_jsonl is not None):
        raise UsageError("--sentence-level prints one score per line, without the diagnostics that --src and "
                         "--translate-jsonl are read for: leave them out")
    references = [_read_text(path) for path in ref]
    systems = _read_systems(inputs, baseline, translate_jsonl)
    _check_line_counts(systems, references, ref)
    sources = _read_sources(src, len(systems[0].lines))
    if sentence_level:
        _run_sentence_level(systems[0], references, settings)
        return
    doc = _score(systems, references, sources, settings, ref, src)
    _print_results(doc, settings)


# ---------------------------------------------------------------------------------------------
# options and inputs
# ---------------------------------------------------------------------------------------------


def _check_options(
    metrics, tokenize, lowercase, chrf_word_order, fmt, score_only, width, paired_bs, paired_ar,
    paired_bs_n, paired_ar_n, confidence, seed, sentence_level,
) -> Settings:  # fmt: skip
    if fmt not in FORMATS:
        raise UsageError(f"--format: unknown value {fmt!r} (choose text or json)")
    if score_only and fmt == "json":
        raise UsageError("--score-only prints bare numbers; it cannot be combined with --format json")
    if paired_bs and paired_ar:
        raise UsageError("--paired-bs and --paired-ar exclude each other: choose one test")
    for name, value, least in (("--paired-bs-n", paired_bs_n, 40), ("--paired-ar-n", paired_ar_n, 1), ("--seed", seed, 1)):
        if value < least:  # a 95% interval leaves out the lowest and highest 2.5% of 40 resamples or more
            raise UsageError(f"{name} must be at least {least}, got {value}")
    if not 0 <= width <= 10:
        raise UsageError(f"--width must be between 0 and 10, got {width}")
    if chrf_word_order < 0:
        raise UsageError(f"--chrf-word-order must be 0 or more, got {chrf_word_order}")
    if sentence_level and (paired_bs or paired_ar or confidence):
        raise UsageError("--sentence-level gives per-line scores; statistical tests need corpus scores")
    options = MetricOptions(parse_metric_names(metrics), tokenize, lowercase, chrf_word_order)
    from nmt.metrics import bleu_tokenizers

    if tokenize not in bleu_tokenizers():
        raise UsageError(f"--tokenize: unknown value {tokenize!r} (choose from {', '.join(bleu_tokenizers())})")
    paired = "ar" if paired_ar else "bs" if paired_bs else None
    return Settings(
        options, fmt, score_only, width, paired, paired_ar_n if paired_ar else paired_bs_n, paired_bs_n,
        confidence, seed, sentence_level,
    )  # fmt: skip


def _repeated(paths: list[str]) -> str | None:
    """The first of `paths` that names a file named before it."""
    return next((b for i, b in enumerate(paths) if any(same_file(a, b) for a in paths[:i])), None)


def _check_paths(inputs, refs, src, baseline, jsonls) -> None:
    if not refs:
        raise UsageError("no references: give at least one -r/--ref FILE")
    named = [("-i", inputs), ("-r", refs), ("--src", [src]), ("--baseline", [baseline]), ("--translate-jsonl", jsonls or [])]
    every = [p for _, paths in named for p in paths]
    if sum(1 for p in every if p == STDIN) > 1:
        raise UsageError("stdin (-) can be read only once")
    for option, paths in named:
        refuse_terminal_stdin(option, paths, "no hypotheses" if option == "-i" else None)
    for option, paths in (("-i", inputs), ("-r", refs)):
        again = _repeated(paths)
        if again is not None:
            raise UsageError(f"the same {option} file was given twice ({display_name(again)})")
    if jsonls and len(jsonls) != len(inputs):
        raise UsageError(
            f"--translate-jsonl given {len(jsonls)} times for {len(inputs)} -i files: give one per -i, same order"
        )


def _read_text(path: str) -> list[str]:
    """All lines of a file or stdin, trailing whitespace removed as sacreBLEU does."""
    return [line.rstrip() for line in read_lines(path)]


def _read_systems(inputs: list[str], baseline: Optional[str], jsonls: Optional[list[str]]) -> list[System]:
    """Systems in test order: the baseline first (`--baseline`, else the first -i; a --baseline
    that is one of the -i files is that system)."""
    systems = []
    for i, path in enumerate(inputs):
        lines = _read_text(path)
        flags = _read_length_cap_flags(jsonls[i], len(lines), display_name(path)) if jsonls else None
        systems.append(System(display_name(path), lines, flags))
    if baseline is not None:
        at = next((i for i, path in enumerate(inputs) if same_file(path, baseline)), None)
        first = systems.pop(at) if at is not None else System(display_name(baseline), _read_text(baseline))
        systems = [first, *systems]
    for system in systems:
        if not system.lines:
            raise NmtError(f"{system.name}: no hypotheses (the input is empty)")
    return systems


def _read_length_cap_flags(path: str, n_lines: int, hyp_name: str) -> list[bool]:
    """`flags.hit_max_length` of each line of an `nmt translate --format jsonl` file."""
    flags = []
    for lineno, line in enumerate(read_lines(path), start=1):
        try:
            value = json.loads(line)["flags"]["hit_max_length"]
            if not isinstance(value, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise NmtError(
                f"{display_name(path)}: line {lineno}: expected a JSON object with flags.hit_max_length "
                "(the output of nmt translate --format jsonl)"
            ) from None
        flags.append(value)
    if len(flags) != n_lines:
        raise NmtError(f"{display_name(path)} has {len(flags)} lines but hypotheses {hyp_name} have {n_lines}")
    return flags


def _check_line_counts(systems: list[System], references: list[list[str]], ref_paths: list[str]) -> None:
    for system in systems:
        for path, stream in zip(ref_paths, references):
            if len(stream) != len(system.lines):
                raise NmtError(
                    f"hypotheses {system.name} have {len(system.lines)} lines "
                    f"but reference {display_name(path)} has {len(stream)}"
                )


def _read_sources(src: Optional[str], n_lines: int) -> Optional[list[str]]:
    if src is None:
        return None
    sources = list(read_lines(src))
    if len(sources) != n_lines:
        raise NmtError(f"source {display_name(src)} has {len(sources)} lines but the hypotheses have {n_lines}")
    return sources


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


def _score(systems, references, sources, settings: Settings, ref_paths, src) -> dict:
    """Corpus scores, diagnostics and (with several systems) the paired test, as one JSON-ready dict."""
    from nmt import metrics as m

    scorers = m.build_metrics(settings.metric_options, references)
    paired = settings.paired or ("bs" if len(systems) > 1 else None)
    if paired and len(systems) < 2:
        raise UsageError("paired tests need at least two systems: -i A -i B (or --baseline FILE)")
    if settings.confidence and len(systems) > 1:
        raise UsageError("--confidence is for one system; several systems get intervals from the paired test")
    n_bootstrap = settings.confidence_n if settings.confidence else 1
    doc: dict = {
        "references": [display_name(p) for p in ref_paths],
        "source": None if src is None else display_name(src),
        "lines": len(systems[0].lines),
        "systems": [],
        "paired_test": None,
    }
    for system in systems:
        log.debug("scoring %s", system.name)
        doc["systems"].append(
            {
                "name": system.name,
                "scores": m.corpus_scores(system.lines, scorers, n_bootstrap, settings.seed),
                "diagnostics": m.diagnostics(system.lines, references, sources, system.hit_max_length),
            }
        )
    if paired:
        _add_paired_test(doc, systems, scorers, paired, settings)
    return doc


def _add_paired_test(doc: dict, systems: list[System], scorers, test: str, settings: Settings) -> None:
    from nmt.metrics import paired_significance

    n = settings.paired_n
    log.info("paired %s test, n=%d: %d system(s) against %s", test, n, len(systems) - 1, systems[0].name)
    result = paired_significance(
        [(s.name, s.lines) for s in systems], scorers, test, n, settings.seed, settings.confidence_n
    )
    for entry, tested in zip(doc["systems"], result.pop("systems")):
        entry["paired"] = tested["results"]
        if tested.get("same_as_baseline"):
            log.warning("%s scores every line as the baseline %s does (%s): no difference to test (p = 1)",
                        entry["name"], systems[0].name, ", ".join(tested["same_as_baseline"]))
    if test == "ar":
        result["confidence_n"] = settings.confidence_n
    doc["paired_test"] = result


def _run_sentence_level(system: System, references: list[list[str]], settings: Settings) -> None:
    """Per-line scores to stdout as TSV (line, scores…, hypothesis) or JSON lines; signatures to stderr."""
    from nmt import metrics as m

    scorers = m.build_metrics(settings.metric_options, None, sentence_level=True)
    keys = list(scorers)
    w = settings.width
    if settings.fmt == "text" and not settings.score_only:
        print("\t".join(["line", *keys, "hypothesis"]))
    per_line = m.sentence_scores(system.lines, references, scorers)
    for lineno, (hyp, scores) in enumerate(zip(system.lines, per_line), start=1):
        if settings.fmt == "json":
            print(json_line({"line": lineno, **scores, "hypothesis": hyp}))
        elif settings.score_only:
            print("\t".join(f"{scores[k]:.{w}f}" for k in keys))
        else:  # the hypothesis as the last column of one row: no tab or line break of its own
            print("\t".join([str(lineno), *(f"{scores[k]:.{w}f}" for k in keys), one_line(hyp).replace("\t", " ")]))
    for key, signature in m.signatures(scorers).items():
        log.info("sentence %s signature: %s", key, signature)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def _print_results(doc: dict, settings: Settings) -> None:
    if settings.fmt == "json":
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    elif settings.score_only:
        for system in doc["systems"]:
            for record in system["scores"].values():
                print(f"{record['score']:.{settings.width}f}")
    elif doc["paired_test"] is None:
        _print_single_text(doc["systems"][0], settings.width)
    else:
        _print_table_text(doc, settings.width)


def _score_line(record: dict, width: int) -> str:
    """sacreBLEU's own text line: `NAME|signature = score [(μ = mean ± ci)] [BLEU details]`."""
    line = f"{record['name']}|{record['signature']} = {record['score']:.{width}f}"
    if "mean" in record:
        line += f" (μ = {record['mean']:.{width}f} ± {record['ci']:.{width}f})"
    if record["metric"] == "bleu":
        precisions = "/".join(f"{p:.1f}" for p in record["precisions"])
        line += (
            f" {precisions} (BP = {record['bp']:.3f} ratio = {record['ratio']:.3f} "
            f"hyp_len = {record['hyp_len']:d} ref_len = {record['ref_len']:d})"
        )
    return line


def _diagnostic_lines(diag: dict) -> list[tuple[str, str]]:
    """(label, value) pairs for the diagnostics that were computed."""
    n = diag["lines"]

    def share(entry: dict) -> str:
        return f"{100 * entry['share']:.1f}% ({entry['count']} of {n})"

    ratio = diag["length_ratio_chars"]
    rows = [("length ratio (characters, hyp/ref)", "n/a" if ratio is None else f"{ratio:.3f}")]
    rows.append(("empty lines", share(diag["empty"])))
    if diag["identical_to_source"] is not None:
        rows.append(("identical to source", share(diag["identical_to_source"])))
    rows.append(("repetition loops", share(diag["repetition_loops"])))
    if diag.get("length_blowups") is not None:
        rows.append(("length blow-ups (vs source)", share(diag["length_blowups"])))
    if diag["hit_max_length"] is not None:
        rows.append(("hit length cap", share(diag["hit_max_length"])))
    return rows


def _print_single_text(system: dict, width: int) -> None:
    for record in system["scores"].values():
        print(_score_line(record, width))
    print()
    for label, value in _diagnostic_lines(system["diagnostics"]):
        print(f"{label} = {value}")


def _print_table_text(doc: dict, width: int) -> None:
    """Systems × metrics table with the paired test, a diagnostics table, then signatures."""
    from rich.markup import escape
    from rich.table import Table

    test = doc["paired_test"]
    first = doc["systems"][0]
    table = Table(title="scores: score (bootstrap mean ± 95% CI), p-value against the baseline")
    table.add_column("system")
    for record in first["scores"].values():
        table.add_column(record["name"], justify="right")
    for i, system in enumerate(doc["systems"]):
        cells = [_paired_cell(system["paired"][key], width) for key in first["scores"]]
        table.add_row(escape(system["name"]) + (" (baseline)" if i == 0 else ""), *cells)
    from nmt.progress import stdout_console

    console = stdout_console()
    console.print(table)
    console.print(_diagnostics_table(doc))
    kind = "bootstrap resampling" if test["test"] == "bs" else "approximate randomisation"
    console.print(
        f"Paired {kind} test, n = {test['n']}, seed {test['seed']}, baseline {escape(test['baseline'])}; "
        "* marks p < 0.05 (the difference is unlikely to be chance)."
    )
    for key, signature in test["signatures"].items():
        console.print(f"{first['scores'][key]['name']}|{signature}")


def _paired_cell(result: dict, width: int) -> str:
    cell = f"{result['score']:.{width}f}"
    if result["mean"] is not None:
        cell += f" ({result['mean']:.{width}f} ± {result['ci']:.{width}f})"
    if result["p_value"] is not None:
        cell += f"\np = {result['p_value']:.4f}" + ("*" if result["p_value"] < 0.05 else "")
    return cell


def _diagnostics_table(doc: dict):
    from rich.markup import escape
    from rich.table import Table

    rows = [(system["name"], dict(_diagnostic_lines(system["diagnostics"]))) for system in doc["systems"]]
    labels = list(dict.fromkeys(label for _, values in rows for label in values))  # union, in order
    table = Table(title="diagnostics")
    table.add_column("system")
    for label in labels:
        table.add_column(label, justify="right")
    for name, values in rows:
        table.add_row(escape(name), *(values.get(label, "n/a") for label in labels))
    return table
