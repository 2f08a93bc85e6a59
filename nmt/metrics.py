"""Scoring translations with sacreBLEU: corpus and sentence scores, paired significance, diagnostics.

Every number here comes from sacreBLEU's own implementation (`sacrebleu.metrics`,
`sacrebleu.significance.PairedTest`), so scores and signatures equal those of the `sacrebleu`
command on the same lines. This module only adds the glue (which metric objects, which seed)
and a few plain diagnostics of the outputs (length, empty lines, copies of the source, and the
per-line checks of `nmt.checks`: loops, length blow-ups).
It reads no files and prints nothing: `nmt.evaluate` does that. No torch import; sacreBLEU and
numpy are imported inside the functions so `nmt --help` stays quick.

Results are plain dicts ready for JSON. Metric keys are the lower-case names users type
(`bleu`, `chrf`, `ter`); sacreBLEU's display name (`BLEU`, `chrF2`, `TER`) is in `name`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence

from nmt.checks import has_repetition_loop, is_length_blowup
from nmt.errors import NmtError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from sacrebleu.metrics.base import Metric, Score

METRIC_NAMES = ("bleu", "chrf", "ter")
DEFAULT_METRICS = ("bleu", "chrf")
DEFAULT_SEED = 12345  # sacreBLEU's own default, so results match `sacrebleu` without SACREBLEU_SEED


@dataclass(frozen=True)
class MetricOptions:
    """Which metrics to compute and the sacreBLEU options that change their values."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    tokenize: str = "13a"  # BLEU tokenizer (sacreBLEU `--tokenize`)
    lowercase: bool = False  # BLEU only, like sacreBLEU `--lowercase`
    chrf_word_order: int = 0  # 2 gives chrF++


def parse_metric_names(specs: Sequence[str] | None) -> tuple[str, ...]:
    """`["bleu,chrf", "ter"]` → `("bleu", "chrf", "ter")`, in the order given; unknown names are usage errors."""
    if not specs:
        return DEFAULT_METRICS
    wanted = [part.strip().lower() for spec in specs for part in spec.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in METRIC_NAMES]
    if unknown:
        raise UsageError(f"unknown metric {unknown[0]!r} (choose from {', '.join(METRIC_NAMES)})")
    if not wanted:
        raise UsageError(f"--metrics is empty (choose from {', '.join(METRIC_NAMES)})")
    return tuple(dict.fromkeys(wanted))  # first mention decides the order


# sacreBLEU's old names of its tokenizers: the same tokenizer and signature as the new name, but
# sacreBLEU prints a deprecation line on stderr for them (before any error line of nmt's own)
RENAMED_TOKENIZERS = {"spm": "flores101"}


def bleu_tokenizers() -> list[str]:
    from sacrebleu.metrics import BLEU

    return list(BLEU.TOKENIZERS)


def build_metrics(
    options: MetricOptions, references: Sequence[Sequence[str]] | None, sentence_level: bool = False
) -> dict[str, "Metric"]:
    """sacreBLEU metric objects keyed by metric name, references cached when given.

    `references` is a list of reference streams (one list of lines per reference file).
    Sentence-level BLEU uses effective order, as `sacrebleu --sentence-level` does.
    """
    from sacrebleu.metrics import BLEU, CHRF, TER

    if options.tokenize not in BLEU.TOKENIZERS:
        raise UsageError(f"unknown BLEU tokenizer {options.tokenize!r} (choose from {', '.join(BLEU.TOKENIZERS)})")
    makers = {
        "bleu": lambda: BLEU(
            lowercase=options.lowercase,
            tokenize=RENAMED_TOKENIZERS.get(options.tokenize, options.tokenize),
            effective_order=sentence_level,
            references=references,
        ),
        "chrf": lambda: CHRF(word_order=options.chrf_word_order, references=references),
        "ter": lambda: TER(references=references),
    }
    built = {}
    for name in options.metrics:
        try:
            built[name] = makers[name]()
        except (ImportError, RuntimeError, OSError) as e:  # e.g. a tokenizer's optional package
            raise NmtError(f"cannot set up {name}: {' '.join(str(e).split())}") from None
    return built


@contextlib.contextmanager
def sacrebleu_seed(seed: int) -> Iterator[None]:
    """sacreBLEU reads its resampling seed from SACREBLEU_SEED when it resamples; set it meanwhile."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = old


def score_record(metric_key: str, score: "Score", signature: str, bootstrapped: bool = False) -> dict:
    """A sacreBLEU `Score` as a JSON-ready dict (BLEU adds its n-gram precisions and lengths;
    `bootstrapped`: with the bootstrap's mean and 95% interval half-width)."""
    record = {"metric": metric_key, "name": score.name, "score": float(score.score), "signature": signature}
    if metric_key == "bleu":
        record.update(
            precisions=[float(p) for p in score.precisions],
            bp=float(score.bp),
            ratio=float(score.ratio),
            hyp_len=int(score.sys_len),
            ref_len=int(score.ref_len),
            counts=[int(c) for c in score.counts],
            totals=[int(t) for t in score.totals],
        )
    if bootstrapped:  # (sacreBLEU's own marker, a mean over 0, is not set for a system scoring 0)
        record.update(mean=float(score._mean), ci=float(score._ci))
    return record


def corpus_scores(
    hypotheses: Sequence[str], metrics: Mapping[str, "Metric"], n_bootstrap: int = 1, seed: int = DEFAULT_SEED
) -> dict[str, dict]:
    """Corpus score and signature per metric against the metrics' cached references.

    With `n_bootstrap > 1`, sacreBLEU's bootstrap also gives `mean` and the 95% `ci`
    half-width (as `sacrebleu --confidence`), and the signature records `bs` and `seed`.
    """
    results = {}
    with sacrebleu_seed(seed):
        for key, metric in metrics.items():
            score = metric.corpus_score(list(hypotheses), None, n_bootstrap=n_bootstrap)
            results[key] = score_record(key, score, metric.get_signature().format(), n_bootstrap > 1)
    return results


def paired_significance(
    systems: Sequence[tuple[str, Sequence[str]]],
    metrics: Mapping[str, "Metric"],
    test: str = "bs",
    n_samples: int = 1000,
    seed: int = DEFAULT_SEED,
    n_confidence: int = 1000,
) -> dict:
    """sacreBLEU's paired test of every system against the first (the baseline).

    `test` is "bs" (paired bootstrap resampling, `n_samples` resamples) or "ar" (approximate
    randomisation, `n_samples` trials; confidence intervals then come from `n_confidence`
    bootstrap resamples, which the signature records as `bs`). Returns
    `{"test", "n", "seed", "baseline", "signatures": {metric: str},
    "systems": [{"name", "results": {metric: {"score", "p_value", "mean", "ci"}}}]}`;
    the baseline's p_value is None, and `ci` is the half-width of the 95% interval around `mean`.
    """
    from sacrebleu.significance import PairedTest

    with sacrebleu_seed(seed):
        paired = PairedTest(
            [(name, list(hyps)) for name, hyps in systems],
            dict(metrics),
            references=None,
            test_type=test,
            n_samples=n_samples,
            n_ar_confidence=n_confidence if test == "ar" else -1,
            n_jobs=1,
        )
        signatures, table = paired()
    score_names = [k for k in table if k != "System"]  # sacreBLEU's names, in our metric order
    keys = list(metrics)
    out_systems = []
    for i, (name, hyps) in enumerate(systems):
        results = {key: _result_dict(table[score_name][i]) for key, score_name in zip(keys, score_names)}
        entry = {"name": name, "results": results}
        same = [key for key in keys if i and _same_statistics(metrics[key], hyps, systems[0][1])]
        for key in same:  # every resampled difference is 0, where sacreBLEU's count gives p = 1/(n+1)
            results[key]["p_value"] = 1.0
        if same:
            entry["same_as_baseline"] = same
        out_systems.append(entry)
    return {
        "test": test,
        "n": paired.n_samples,
        "seed": seed,
        "baseline": systems[0][0],
        "signatures": {key: signatures[sn].format() for key, sn in zip(keys, score_names)},
        "systems": out_systems,
    }


def _same_statistics(metric: "Metric", hyps: Sequence[str], baseline: Sequence[str]) -> bool:
    """The metric counts the same for every line of the two systems (the same lines, or lines
    that differ only where the metric does not look: spaces, or case with --lowercase)."""
    import numpy as np

    if list(hyps) == list(baseline):
        return True
    ours, theirs = (metric._extract_corpus_statistics(list(h), None) for h in (hyps, baseline))
    return len(ours) == len(theirs) and all(np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
                                            for a, b in zip(ours, theirs))


def _result_dict(result) -> dict:
    def num(x):
        return None if x is None else float(x)

    return {key: num(getattr(result, key)) for key in ("score", "p_value", "mean", "ci")}


def sentence_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Mapping[str, "Metric"]
) -> Iterator[dict[str, float]]:
    """Per-line `{metric: score}` by sacreBLEU's `sentence_score` (metrics built with `sentence_level`)."""
    for i, hyp in enumerate(hypotheses):
        refs = [stream[i] for stream in references]
        yield {key: float(metric.sentence_score(hyp, refs).score) for key, metric in metrics.items()}


def signatures(metrics: Mapping[str, "Metric"]) -> dict[str, str]:
    """Signature per metric; valid once the metric has seen references (cached or sentence-scored)."""
    return {key: metric.get_signature().format() for key, metric in metrics.items()}


def _share(count: int, total: int) -> dict:
    return {"count": count, "share": count / total if total else 0.0}


def diagnostics(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    sources: Optional[Sequence[str]] = None,
    hit_max_length: Optional[Sequence[bool]] = None,
) -> dict:
    """Plain checks on the outputs, each `{"count", "share"}` of lines (share in 0..1):

    - `length_ratio_chars`: characters (Unicode code points) of all hypotheses divided by the
      characters of the references, averaged over the reference files;
    - `empty`: lines that are empty or whitespace only;
    - `identical_to_source`: non-empty source lines copied unchanged (outer whitespace ignored);
      None without sources;
    - `repetition_loops`: lines with a loop as defined by `checks.has_repetition_loop`;
    - `length_blowups`: lines longer than their source allows (`checks.is_length_blowup`);
      None without sources;
    - `hit_max_length`: lines whose translation stopped at the length cap (from
      `nmt translate --format jsonl` flags); None without those flags.
    """
    total = len(hypotheses)
    hyp_chars = sum(len(h) for h in hypotheses)
    ref_chars = sum(len(r) for stream in references for r in stream) / max(len(references), 1)
    identical = blowups = None
    if sources is not None:
        blowups = _share(sum(1 for h, s in zip(hypotheses, sources) if is_length_blowup(h, s)), total)
        copies = sum(1 for h, s in zip(hypotheses, sources) if s.strip() and h.strip() == s.strip())
        identical = _share(copies, total)
    return {
        "lines": total,
        "length_ratio_chars": hyp_chars / ref_chars if ref_chars else None,
        "empty": _share(sum(1 for h in hypotheses if not h.strip()), total),
        "identical_to_source": identical,
        "repetition_loops": _share(sum(1 for h in hypotheses if has_repetition_loop(h)), total),
        "length_blowups": blowups,
        "hit_max_length": None if hit_max_length is None else _share(sum(map(bool, hit_max_length)), total),
    }
