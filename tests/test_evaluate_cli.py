"""End-to-end tests of `nmt evaluate`: the same numbers and signatures as the `sacrebleu`
command on the same files, diagnostics with known answers, and one-line errors with the
right exit codes. Every command runs in a subprocess, as a user would run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bible-es-en"
TEST_EN, TEST_KJV, TEST_ES = DATA / "test.en", DATA / "test.kjv", DATA / "test.es"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
ENV.pop("SACREBLEU_SEED", None)


def nmt(*args, stdin: bytes | None = b"") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nmt", "evaluate", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, input=stdin, capture_output=True)


def sacrebleu_cli(*args, seed: int | None = None) -> str:
    env = {**ENV, "SACREBLEU_SEED": str(seed)} if seed else ENV
    cmd = [sys.executable, "-m", "sacrebleu", *map(str, args), "--no-color", "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True)
    return done.stdout.decode()


from conftest import ok, without_paths  # noqa: E402


def head(path: Path, n: int, out: Path) -> Path:
    out.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory) -> Path:
    """test.kjv with every 4th word dropped on every 3rd line: a slightly worse second system."""
    out = tmp_path_factory.mktemp("sys") / "kjv-perturbed.txt"
    lines = TEST_KJV.read_text(encoding="utf-8").splitlines()
    changed = [" ".join(w for j, w in enumerate(l.split()) if i % 3 or j % 4 != 3) for i, l in enumerate(lines)]
    out.write_text("\n".join(changed) + "\n", encoding="utf-8")
    return out


# --- equal to the sacrebleu command ---------------------------------------------------------


def test_text_lines_equal_sacrebleu_cli():
    ours = ok(nmt("-i", TEST_KJV, "-r", TEST_EN, "-w", 4)).splitlines()
    theirs = sacrebleu_cli(TEST_EN, "-i", TEST_KJV, "-m", "bleu", "chrf", "-f", "text", "-w", 4).splitlines()
    assert [line.strip() for line in theirs] == ours[:2]
    assert ours[0].startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


def test_json_equals_sacrebleu_cli_multi_reference_and_options(perturbed):
    args = ["--tokenize", "intl", "--lowercase"]
    doc = json.loads(ok(nmt("-i", perturbed, "-r", TEST_EN, "-r", TEST_KJV, "-f", "json", *args)))
    theirs = json.loads(sacrebleu_cli(TEST_EN, TEST_KJV, "-i", perturbed, "-m", "bleu", "chrf", "-w", 4, *args))
    scores = doc["systems"][0]["scores"]
    assert len(theirs) == 2
    for key, expected in zip(("bleu", "chrf"), theirs):
        assert scores[key]["name"] == expected["name"]
        assert scores[key]["signature"] == expected["signature"]
        assert float(f"{scores[key]['score']:.4f}") == expected["score"]
    assert "nrefs:2" in scores["bleu"]["signature"] and "tok:intl" in scores["bleu"]["signature"]
    assert doc["references"] == [str(TEST_EN), str(TEST_KJV)] and doc["lines"] == 1434


def test_stdin_ter_and_score_only_equal_sacrebleu_cli(tmp_path):
    hyp, ref = head(TEST_KJV, 30, tmp_path / "h"), head(TEST_EN, 30, tmp_path / "r")
    ours = ok(nmt("-r", ref, "-m", "ter", "-m", "bleu,chrf", "-b", "-w", 4, stdin=hyp.read_bytes())).split()
    theirs = [sacrebleu_cli(ref, "-i", hyp, "-m", m, "-b", "-w", 4).strip() for m in ("ter", "bleu", "chrf")]
    assert ours == theirs


def test_confidence_equals_sacrebleu_cli(tmp_path):
    hyp, ref = head(TEST_KJV, 300, tmp_path / "h"), head(TEST_EN, 300, tmp_path / "r")
    ours = ok(nmt("-i", hyp, "-r", ref, "-m", "bleu", "--confidence", "--paired-bs-n", 100, "-w", 3))
    theirs = sacrebleu_cli(ref, "-i", hyp, "-f", "text", "-w", 3, "--confidence", "--confidence-n", 100)
    assert ours.splitlines()[0] == theirs.strip()
    assert "bs:100|seed:12345" in ours


def _latex_rows(table: str) -> list[list[str]]:
    """Numbers of each system row of `sacrebleu --paired-* -f latex`, formatted as printed."""
    body = table.split("\\midrule")[1].split("\\bottomrule")[0]
    return [re.findall(r"\d+\.\d+", row.split("&", 1)[1]) for row in body.strip().splitlines()]


def _fmt(*values) -> list[str]:
    return [f"{v:.4f}" for v in values if v is not None]


def test_paired_bootstrap_equals_sacrebleu_cli(perturbed):
    n, seed = 200, 7
    doc = json.loads(ok(nmt("-i", TEST_KJV, "-i", perturbed, "-r", TEST_EN, "-f", "json", "--paired-bs-n", n, "--seed", seed)))
    theirs = _latex_rows(
        sacrebleu_cli(TEST_EN, "-i", TEST_KJV, perturbed, "-m", "bleu", "chrf", "--paired-bs", "--paired-bs-n", n,
                      "-f", "latex", "-w", 4, seed=seed)  # fmt: skip
    )
    assert len(theirs) == len(doc["systems"]) == 2
    for system, row in zip(doc["systems"], theirs):
        r = system["paired"]
        ours = [*_fmt(r["bleu"]["score"], r["bleu"]["mean"], r["bleu"]["ci"], r["bleu"]["p_value"])]
        ours += _fmt(r["chrf"]["score"], r["chrf"]["mean"], r["chrf"]["ci"], r["chrf"]["p_value"])
        assert ours == row
    test = doc["paired_test"]
    assert (test["test"], test["n"], test["seed"], test["baseline"]) == ("bs", n, seed, str(TEST_KJV))
    assert test["signatures"]["bleu"].startswith(f"nrefs:1|bs:{n}|seed:{seed}|case:mixed|eff:no|tok:13a")


def test_paired_ar_with_baseline_option_equals_sacrebleu_cli(perturbed):
    n = 150
    done = nmt("-i", perturbed, "-i", TEST_KJV, "--baseline", TEST_KJV, "-r", TEST_EN, "-f", "json", "-m", "bleu",
               "--paired-ar", "--paired-ar-n", n, "--paired-bs-n", 50)  # fmt: skip
    doc = json.loads(ok(done))
    assert [s["name"] for s in doc["systems"]] == [str(TEST_KJV), str(perturbed)]
    theirs = _latex_rows(sacrebleu_cli(TEST_EN, "-i", TEST_KJV, perturbed, "--paired-ar", "--paired-ar-n", n, "-f", "latex", "-w", 4))
    assert len(theirs) == len(doc["systems"]) == 2
    for system, row in zip(doc["systems"], theirs):
        assert _fmt(system["paired"]["bleu"]["score"], system["paired"]["bleu"]["p_value"]) == row
        assert system["paired"]["bleu"]["ci"] is not None  # our addition: a bootstrap interval
    assert doc["systems"][0]["paired"]["bleu"]["p_value"] is None


def test_paired_text_table_on_stdout(perturbed):
    out = ok(nmt("-i", TEST_KJV, "-i", perturbed, "-r", TEST_EN, "-m", "bleu", "--paired-bs-n", 50))
    assert "(baseline)" in out and "p = " in out and "diagnostics" in out
    assert "BLEU|nrefs:1|bs:50|seed:12345|" in out


def test_sentence_level_equals_sacrebleu_cli(tmp_path):
    hyp, ref = head(TEST_KJV, 40, tmp_path / "h"), head(TEST_EN, 40, tmp_path / "r")
    rows = [line.split("\t") for line in ok(nmt("-i", hyp, "-r", ref, "--sentence-level", "-w", 4)).splitlines()]
    assert rows[0] == ["line", "bleu", "chrf", "hypothesis"] and len(rows) == 41
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(1, 41)]
    assert [r[3] for r in rows[1:]] == hyp.read_text(encoding="utf-8").splitlines()
    for column, metric in ((1, "bleu"), (2, "chrf")):
        theirs = sacrebleu_cli(ref, "-i", hyp, "-m", metric, "--sentence-level", "-b", "-w", 4).split()
        assert [r[column] for r in rows[1:]] == theirs
    records = [json.loads(l) for l in ok(nmt("-i", hyp, "-r", ref, "--sentence-level", "-f", "json")).splitlines()]
    assert [f"{r['bleu']:.4f}" for r in records] == [r[1] for r in rows[1:]]


# --- diagnostics with known answers ---------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_diagnostics_on_crafted_files(tmp_path):
    hyp = _write(tmp_path / "hyp", ["the cat sat", "", "hola mundo", "go go go now", "of the of the of the", "yes"])
    ref = _write(tmp_path / "ref", ["the cat sat", "a dog", "hello world", "go now", "of the", "yes"])
    src = _write(tmp_path / "src", ["el gato", "un perro", "hola mundo", "ve ahora", "de", "sí"])
    capped = [False, True, False, True, False, False]
    jsonl = _write(tmp_path / "t.jsonl", [json.dumps({"translation": "x", "flags": {"hit_max_length": c}}) for c in capped])
    doc = json.loads(ok(nmt("-i", hyp, "-r", ref, "--src", src, "--translate-jsonl", jsonl, "-f", "json")))
    d = doc["systems"][0]["diagnostics"]
    assert d["length_ratio_chars"] == pytest.approx(56 / 42)  # 11+0+10+12+20+3 over 11+5+11+6+6+3
    assert [d[k]["count"] for k in ("empty", "identical_to_source", "repetition_loops", "hit_max_length")] == [1, 1, 2, 2]
    assert d["repetition_loops"]["share"] == pytest.approx(2 / 6)
    text = ok(nmt("-i", hyp, "-r", ref, "--src", src, "--translate-jsonl", jsonl))
    assert "repetition loops = 33.3% (2 of 6)" in text and "hit length cap = 33.3% (2 of 6)" in text
    assert "identical to source = 16.7% (1 of 6)" in text and "length ratio (characters, hyp/ref) = 1.333" in text


# --- errors: one line, right exit code ------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    return {
        "two": _write(tmp_path / "two.txt", ["a b", "c d"]),
        "three": _write(tmp_path / "three.txt", ["a", "b", "c"]),
        "bad": bad,
        "empty": _write(tmp_path / "empty.txt", []),
        "notjson": _write(tmp_path / "x.jsonl", ["{}", "[1]"]),
        "alias": f"{tmp_path}/./two.txt",  # another name for two.txt
    }


@pytest.mark.parametrize(
    "args, code, pieces",
    [
        (["-i", "{missing}", "-r", "{two}"], 1, ["missing.txt", "no such file"]),
        (["-i", "{two}", "-r", "{three}"], 1, ["two.txt", "2 lines", "three.txt", "has 3"]),
        (["-i", "{two}", "-r", "{two}", "-r", "{three}"], 1, ["2 lines", "three.txt", "has 3"]),
        (["-i", "{bad}", "-r", "{two}"], 1, ["bad.txt", "line 2", "UTF-8"]),
        (["-i", "{empty}", "-r", "{empty}"], 1, ["empty.txt", "empty"]),
        (["-i", "{two}", "-r", "{two}", "--src", "{three}"], 1, ["three.txt", "3 lines"]),
        (["-i", "{two}", "-r", "{two}", "--translate-jsonl", "{notjson}"], 1, ["x.jsonl", "line 1", "hit_max_length"]),
        (["-i", "{two}"], 2, ["-r/--ref"]),
        (["-i", "{two}", "-r", "{two}", "-m", "bleu,meteor"], 2, ["unknown metric", "meteor"]),
        (["-i", "{two}", "-r", "{two}", "--format", "xml"], 2, ["--format", "xml"]),
        (["-i", "{two}", "-r", "{two}", "--tokenize", "nope"], 2, ["--tokenize", "nope"]),
        (["-i", "{two}", "-r", "{two}", "--paired-bs"], 2, ["two systems"]),
        (["-i", "{two}", "-i", "{three}", "-r", "{two}", "--paired-bs", "--paired-ar"], 2, ["--paired-ar"]),
        (["-i", "{two}", "-r", "{two}", "--seed", "0"], 2, ["--seed"]),
        (["-i", "{two}", "-r", "{two}", "--sentence-level", "--confidence"], 2, ["--sentence-level"]),
        (["-i", "{two}", "-r", "{two}", "-b", "-f", "json"], 2, ["--score-only"]),
        (["-r", "{two}", "-i", "-", "--src", "-"], 2, ["stdin"]),
        (["-i", "{two}", "-i", "{three}", "-r", "{two}", "--sentence-level"], 2, ["single -i"]),
        (["-i", "{two}", "-r", "{two}", "--sentence-level", "--src", "{two}"], 2,
         ["--sentence-level prints one score per line", "leave them out"]),
        (["-i", "{two}", "-r", "{two}", "--paired-ar-n", "50"], 2, ["give --paired-ar too"]),
        (["-i", "{two}", "-r", "{two}", "--paired-ar-n", "10000"], 2, ["give --paired-ar too"]),  # the default's value
        (["-i", "{two}", "-i", "{alias}", "-r", "{two}"], 2, ["the same -i file was given twice"]),
        (["-i", "{two}", "-r", "{two}", "-r", "{alias}"], 2, ["the same -r file was given twice"]),
        (["-i", "{two}", "-r", "{two}", "--confidence", "--paired-bs-n", "39"], 2, ["--paired-bs-n must be at least 40"]),
    ],
)
def test_errors_are_one_line_with_exit_code(files, tmp_path, args, code, pieces):
    names = {**files, "missing": tmp_path / "missing.txt"}
    done = nmt(*[a.format(**names) for a in args])
    err = done.stderr.decode().strip()
    assert done.returncode == code, err
    assert done.stdout == b""
    assert len(err.splitlines()) == 1 and err.startswith("nmt: error: ") and "Traceback" not in err
    for piece in pieces:  # file names in the message itself, everything else in its words
        assert piece in (err if piece.endswith((".txt", ".jsonl")) else without_paths(err))


def test_a_reference_on_a_terminal_is_an_error_not_a_wait(files):
    import pty

    leader, follower = pty.openpty()
    try:
        cmd = [sys.executable, "-m", "nmt", "evaluate", "-i", str(files["two"]), "-r", "-"]
        done = subprocess.run(cmd, cwd=REPO, env=ENV, stdin=follower, capture_output=True, timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    err = done.stderr.decode().strip()
    assert done.returncode == 2 and err == "nmt: error: -r -: stdin is a terminal: pipe the text in or give -r FILE"


def test_a_system_equal_to_the_baseline_is_not_significantly_different(tmp_path, perturbed):
    copy, spaced = tmp_path / "copy.txt", tmp_path / "spaced.txt"
    copy.write_bytes(TEST_KJV.read_bytes())
    spaced.write_bytes(TEST_KJV.read_bytes().replace(b" ", b"  "))  # other lines, the same words for BLEU
    done = nmt("-i", TEST_KJV, "-i", perturbed, "-i", copy, "-i", spaced, "-r", TEST_EN, "-f", "json", "-m", "bleu",
               "--paired-bs-n", 50)
    doc = json.loads(ok(done))
    p_values = [s["paired"]["bleu"]["p_value"] for s in doc["systems"]]
    assert p_values[0] is None and p_values[1] < 0.05 and p_values[2:] == [1.0, 1.0]  # sacreBLEU alone: 1/51
    err = without_paths(done.stderr.decode())
    assert err.count("scores every line as the baseline") == 2 and "no difference to test (p = 1)" in err


def test_sentence_level_rows_stay_one_line_each(tmp_path):
    hyp = _write(tmp_path / "hyp", ["a\tb c", "c\u2028d", "e\x85f"])
    ref = _write(tmp_path / "ref", ["a b c", "c d", "e f"])
    rows = ok(nmt("-i", hyp, "-r", ref, "--sentence-level", "-m", "bleu")).splitlines()
    assert [r.split("\t")[2] for r in rows[1:]] == ["a b c", "c d", "e f"] and len(rows) == 4
    records = [json.loads(l) for l in ok(nmt("-i", hyp, "-r", ref, "--sentence-level", "-f", "json")).splitlines()]
    assert [r["hypothesis"] for r in records] == ["a\tb c", "c\u2028d", "e\x85f"]  # JSON keeps them, escaped


def test_confidence_interval_of_a_system_scoring_zero(tmp_path):
    hyp = _write(tmp_path / "hyp", ["x", "y"])
    ref = _write(tmp_path / "ref", ["a b", "c d"])
    bleu = json.loads(ok(nmt("-i", hyp, "-r", ref, "-f", "json", "-m", "bleu", "--confidence", "--paired-bs-n", 50)))
    scores = bleu["systems"][0]["scores"]["bleu"]
    assert scores["score"] == 0.0 and scores["mean"] == 0.0 and scores["ci"] == 0.0


def test_a_file_name_that_is_not_utf8_is_named_not_a_crash(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"\xff.txt")
    with open(name, "wb") as f:
        f.write(b"a b c d\n")
    cmd = [sys.executable.encode(), b"-m", b"nmt", b"evaluate", b"-i", name, b"-r", name, b"-f", b"json", b"-m", b"bleu"]
    doc = json.loads(ok(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True)))
    assert doc["systems"][0]["name"].endswith("/\\xff.txt") and doc["systems"][0]["scores"]["bleu"]["score"] == pytest.approx(100.0)


def test_a_renamed_sacrebleu_tokenizer_adds_no_warning_line(tmp_path):
    """`--tokenize spm` is sacreBLEU's old name of flores101 (the same tokenizer and signature):
    sacreBLEU's deprecation line must not come before or instead of nmt's own lines. Without
    sentencepiece the one line on stderr is the error naming it."""
    import importlib.util

    from conftest import error_line

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: the tokenizer would download its model")
    text = head(TEST_EN, 3, tmp_path / "ref.txt")
    msg = error_line(nmt("-i", text, "-r", text, "--tokenize", "spm"), 1)
    assert msg == ("nmt: error: cannot set up bleu: Please install the sentencepiece library for SPM tokenization: "
                   "pip install sentencepiece")


def test_spm_is_flores101_for_sacrebleu(monkeypatch):
    """What the renamed tokenizer is built as: the new name, so sacreBLEU has nothing to warn about."""
    import sacrebleu.metrics

    from nmt.metrics import MetricOptions, build_metrics

    made = []
    monkeypatch.setattr(sacrebleu.metrics, "BLEU", type("BLEU", (), {
        "TOKENIZERS": sacrebleu.metrics.BLEU.TOKENIZERS,
        "__init__": lambda self, **kw: made.append(kw["tokenize"])}))
    build_metrics(MetricOptions(("bleu",), "spm", False, 0), None)
    build_metrics(MetricOptions(("bleu",), "13a", False, 0), None)
    assert made == ["flores101", "13a"]
