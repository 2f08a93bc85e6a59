"""Unit tests of `nmt.metrics`: sacreBLEU glue checked against sacreBLEU's public API, and
diagnostics on crafted lines whose answers are counted by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from nmt import checks
from nmt import metrics as m
from nmt.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bible-es-en"


def _lines(name: str, n: int | None = None) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return lines[:n] if n else lines


@pytest.fixture(scope="module")
def dev():
    return {"hyp": _lines("dev.kjv"), "ref": _lines("dev.en")}


# --- metric names ---------------------------------------------------------------------------


def test_metric_names_default_order_and_dedup():
    assert m.parse_metric_names(None) == ("bleu", "chrf")
    assert m.parse_metric_names(["ter,BLEU", "bleu", " chrf "]) == ("ter", "bleu", "chrf")


@pytest.mark.parametrize("spec, message", [
    (["bleu,meteor"], "unknown metric 'meteor' (choose from bleu, chrf, ter)"),
    (["comet"], "unknown metric 'comet' (choose from bleu, chrf, ter)"),
    ([","], "--metrics is empty (choose from bleu, chrf, ter)"),
])
def test_metric_names_unknown_or_empty_is_usage_error(spec, message):
    with pytest.raises(UsageError) as caught:
        m.parse_metric_names(spec)
    assert str(caught.value) == message


def test_unknown_tokenizer_is_usage_error():
    with pytest.raises(UsageError, match=r"^unknown BLEU tokenizer 'nope' \(choose from .*\b13a\b"):
        m.build_metrics(m.MetricOptions(tokenize="nope"), [["a"]])


# --- corpus scores equal sacreBLEU's API ----------------------------------------------------


def test_corpus_scores_equal_sacrebleu_api(dev):
    scorers = m.build_metrics(m.MetricOptions(metrics=("bleu", "chrf")), [dev["ref"]])
    got = m.corpus_scores(dev["hyp"], scorers)
    bleu = sacrebleu.BLEU()
    expected_bleu = bleu.corpus_score(dev["hyp"], [dev["ref"]])
    chrf = sacrebleu.CHRF()
    expected_chrf = chrf.corpus_score(dev["hyp"], [dev["ref"]])
    assert got["bleu"]["score"] == expected_bleu.score
    assert got["bleu"]["precisions"] == expected_bleu.precisions
    assert (got["bleu"]["hyp_len"], got["bleu"]["ref_len"]) == (expected_bleu.sys_len, expected_bleu.ref_len)
    assert got["bleu"]["signature"] == str(bleu.get_signature())
    assert got["chrf"]["score"] == expected_chrf.score
    assert got["chrf"]["name"] == "chrF2"
    assert got["chrf"]["signature"] == str(chrf.get_signature())
    assert "mean" not in got["bleu"]


def test_multi_reference_options_and_ter_equal_sacrebleu_api():
    hyp, ref_a, ref_b = _lines("test.kjv", 25), _lines("test.en", 25), _lines("dev.en", 25)
    options = m.MetricOptions(metrics=("bleu", "chrf", "ter"), tokenize="intl", lowercase=True, chrf_word_order=2)
    got = m.corpus_scores(hyp, m.build_metrics(options, [ref_a, ref_b]))
    bleu = sacrebleu.BLEU(tokenize="intl", lowercase=True)
    assert got["bleu"]["score"] == bleu.corpus_score(hyp, [ref_a, ref_b]).score
    assert got["bleu"]["signature"] == str(bleu.get_signature())
    assert "nrefs:2" in got["bleu"]["signature"] and "tok:intl" in got["bleu"]["signature"]
    assert got["chrf"]["score"] == sacrebleu.CHRF(word_order=2).corpus_score(hyp, [ref_a, ref_b]).score
    assert got["chrf"]["name"] == "chrF2++"
    assert got["ter"]["score"] == sacrebleu.TER().corpus_score(hyp, [ref_a, ref_b]).score


def test_confidence_is_seeded_and_recorded_in_signature(dev):
    before = os.environ.get("SACREBLEU_SEED")
    scorers = m.build_metrics(m.MetricOptions(metrics=("bleu",)), [dev["ref"]])
    a = m.corpus_scores(dev["hyp"], scorers, n_bootstrap=50, seed=7)["bleu"]
    b = m.corpus_scores(dev["hyp"], scorers, n_bootstrap=50, seed=7)["bleu"]
    c = m.corpus_scores(dev["hyp"], scorers, n_bootstrap=50, seed=8)["bleu"]
    assert a["mean"] == b["mean"] and a["ci"] == b["ci"] and a["mean"] != c["mean"]
    assert "bs:50|seed:7" in a["signature"]
    assert os.environ.get("SACREBLEU_SEED") == before  # the seed is set only while resampling


# --- paired significance ----------------------------------------------------------------------


def test_paired_significance_shape_and_determinism(dev):
    worse = [" ".join(line.split()[:-3]) for line in dev["hyp"]]
    scorers = m.build_metrics(m.MetricOptions(metrics=("bleu", "chrf")), [dev["ref"]])
    run = lambda seed: m.paired_significance([("base", dev["hyp"]), ("worse", worse)], scorers, "bs", 60, seed)
    first, again, other = run(3), run(3), run(4)
    assert first == again and first != other
    base, tested = first["systems"]
    assert base["results"]["bleu"]["p_value"] is None and tested["results"]["bleu"]["p_value"] < 0.05
    assert tested["results"]["bleu"]["score"] == sacrebleu.BLEU().corpus_score(worse, [dev["ref"]]).score
    assert set(first["signatures"]) == {"bleu", "chrf"} and "bs:60|seed:3" in first["signatures"]["bleu"]
    assert (first["test"], first["n"], first["baseline"]) == ("bs", 60, "base")


def test_paired_ar_gives_p_values_and_intervals(dev):
    scorers = m.build_metrics(m.MetricOptions(metrics=("bleu",)), [dev["ref"]])
    result = m.paired_significance([("a", dev["hyp"]), ("b", dev["ref"])], scorers, "ar", 50, 5, n_confidence=40)
    tested = result["systems"][1]["results"]["bleu"]
    assert tested["score"] == pytest.approx(100.0) and tested["p_value"] == pytest.approx(1 / 51)
    assert tested["mean"] is not None and tested["ci"] >= 0
    assert "ar:50" in result["signatures"]["bleu"] and "bs:40" in result["signatures"]["bleu"]


# --- sentence scores -------------------------------------------------------------------------


def test_sentence_scores_equal_sacrebleu_sentence_api(dev):
    hyps, refs = dev["hyp"][:20], dev["ref"][:20]
    scorers = m.build_metrics(m.MetricOptions(metrics=("bleu", "chrf")), None, sentence_level=True)
    got = list(m.sentence_scores(hyps, [refs], scorers))
    assert [g["bleu"] for g in got] == [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs)]
    assert [g["chrf"] for g in got] == [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyps, refs)]
    assert "eff:yes" in m.signatures(scorers)["bleu"]


# --- diagnostics on crafted lines ------------------------------------------------------------


@pytest.mark.parametrize(
    "line, loops",
    [
        ("the the the", True),  # 1-gram ×3
        ("the the", False),  # only twice
        ("and of the of the of the end", True),  # 2-gram ×3
        ("a b c d a b c d a b c d", True),  # 4-gram ×3
        ("a b c d e a b c d e a b c d e", False),  # 5-gram: longer than the definition
        ("the cat and the cat and a dog and the cat", False),  # repeated, but not back to back
        ("Holy, holy, holy", False),  # case and punctuation count
        ("", False),
    ],
)
def test_repetition_loop_definition(line, loops):
    assert checks.has_repetition_loop(line) is loops


def test_diagnostics_known_answers():
    hyps = ["the cat sat", "  ", "hola mundo", "go go go now", "of the of the of the", "Holy, holy, holy"]
    refs = [["the cat sat", "a dog", "hello world", "go now", "of the", "Holy holy holy"]]
    srcs = ["el gato", "un perro", " hola mundo", "ve ahora", "x", ""]
    capped = [False, False, False, True, True, False]
    d = m.diagnostics(hyps, refs, srcs, capped)
    assert d["lines"] == 6
    assert d["length_ratio_chars"] == pytest.approx(71 / 53)  # 11+2+10+12+20+16 over 11+5+11+6+6+14
    assert d["empty"] == {"count": 1, "share": pytest.approx(1 / 6)}
    assert d["identical_to_source"] == {"count": 1, "share": pytest.approx(1 / 6)}
    assert d["repetition_loops"] == {"count": 2, "share": pytest.approx(2 / 6)}
    assert d["hit_max_length"] == {"count": 2, "share": pytest.approx(2 / 6)}
    assert d["length_blowups"] == {"count": 2, "share": pytest.approx(2 / 6)}  # 20 > 2.5·1 + 10, 16 > 0 + 10


def test_length_blowup_boundary():
    source = "a" * 8  # allows 2.5 · 8 + 10 = 30 characters
    assert not checks.is_length_blowup("b" * 30, source) and checks.is_length_blowup("b" * 31, source)
    assert checks.failed_check("x y x y x y", "s", False) == "loop"
    assert checks.failed_check("b" * 31, source, True) == "length ratio"
    assert checks.failed_check("fine", source, True) == "length cap"
    assert checks.failed_check("fine", source, False) is None


def test_diagnostics_optional_parts_and_multi_reference_ratio():
    d = m.diagnostics(["abcd", "ef"], [["ab", "cd"], ["abcdef", "gh"]])
    assert d["identical_to_source"] is None and d["hit_max_length"] is None and d["length_blowups"] is None
    assert d["length_ratio_chars"] == pytest.approx(6 / ((4 + 8) / 2))


def test_metrics_module_imports_neither_torch_nor_sacrebleu():
    code = "import sys, nmt.metrics; print('torch' in sys.modules, 'sacrebleu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
