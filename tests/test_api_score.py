"""The Python API (`nmt.load` → `Model.translate` / `Model.score`) and `nmt score`: a score of
a pair equals the score beam search reports for the same hypothesis (with and without length
normalisation); the API and the CLI give the same output; bad pairs and options are one-line
errors. In-process on the session's tiny model directory, except one CLI run per command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import head_lines, ok, run_nmt

LINES = ["Y dijo Dios: Sea la luz.", "", "Y fue la luz.", "En el principio creó Dios los cielos y la tierra."]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    import nmt

    return nmt.load(tiny_model_dir, device="cpu", dtype="float32", threads=1)


def test_import_nmt_stays_light():
    code = "import sys, nmt; assert callable(nmt.load); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


class _Known:
    """A target tokenizer that encodes each text as the tokens the search produced for it: the
    search's detokenised text does not always encode back to the same subwords (a random model
    emits pieces a tokenizer would merge), and the property is about those very tokens."""

    def __init__(self, ids: dict[str, list[int]]):
        self.ids = ids

    def encode_batch_fast(self, lines, add_special_tokens=False):
        return [SimpleNamespace(ids=self.ids[line]) for line in lines]


@pytest.mark.parametrize("options", [dict(length_penalty=1.0), dict(length_penalty=0.7, length_norm="average"),
                                     dict(length_penalty=0.0)])
def test_score_equals_the_score_beam_search_reports(model, options):
    """Score each beam hypothesis (3-best, beam 3) back through `Translator.score` (what
    `Model.score` and `nmt score` call): with normalisation the beam's `score`, without it the
    beam's `logprob`, within 1e-4."""
    from nmt.tokenizer import Vocabs

    sources = head_lines("dev.es", 6)
    options = dict(beam_size=3, nbest=3, max_length_a=0.0, max_length_b=12, **options)
    results = list(model.translations(sources, **options))
    pairs = [(r.source, f"{k} {h.text}") for r in results for k, h in enumerate(r.hypotheses)]
    hyps = [h for r in results for h in r.hypotheses]
    assert len(hyps) == 18
    translator = model.translator(**options)
    translator.vocabs = Vocabs(model.vocabs.src, _Known({t: h.tokens for (_, t), h in zip(pairs, hyps)}))
    for normalize, expected in ((True, [h.score for h in hyps]), (False, [h.logprob for h in hyps])):
        scores = list(translator.score(pairs, normalize))
        assert [len(s.token_logprobs) for s in scores] == [len(h.tokens) + 1 for h in hyps]
        assert [s.score for s in scores] == pytest.approx(expected, abs=1e-4)


def test_score_records_and_empty_pairs(model):
    from nmt.errors import NmtError

    records = list(model.scores(["Y fue la luz.", ""], ["And there was light.", ""]))
    assert records[1].empty_input and records[1].score is None and records[1].token_logprobs == []
    first = records[0]
    assert first.logprob == pytest.approx(sum(first.token_logprobs)) and first.score > first.logprob
    assert model.score(["Y fue la luz.", ""], ["And there was light.", ""]) == [first.score, None]
    with pytest.raises(NmtError, match="^sources: line 2 is empty but its pair in targets is not$"):
        model.score(["a", " "], ["a", "b"])
    with pytest.raises(NmtError, match="^line counts differ: targets has 1 lines, sources has more$"):
        model.score(["a", "b"], ["a"])
    with pytest.raises(NmtError, match="^line counts differ: sources has 1 lines, targets has more$"):
        model.score(["a"], ["a", "b"])


@pytest.mark.parametrize("options, penalty", [
    ({}, lambda n: ((5 + n) / 6) ** 1.0),  # the defaults: GNMT's ((5 + |Y|) / 6)^α with α = 1
    ({"length_penalty": 0.6}, lambda n: ((5 + n) / 6) ** 0.6),
    ({"length_penalty": 0.7, "length_norm": "average"}, lambda n: n ** 0.7),
    ({"length_penalty": 0.0}, lambda n: 1.0),
])
def test_a_score_is_the_teacher_forced_log_probability_computed_here(model, tiny_model_dir, options, penalty):
    """Each target token's log-probability (and the EOS after them) from one forward pass of the
    model's weights over BOS + target, summed, and divided by the length penalty of |target| + 1:
    all computed here, and compared with what `Model.scores` returns."""
    import torch

    from nmt.checkpoint import load_for_inference

    net, vocabs, _ = load_for_inference(tiny_model_dir)
    bos, eos = vocabs.tgt.token_to_id("<s>"), vocabs.tgt.token_to_id("</s>")
    assert vocabs.src.token_to_id("</s>") == eos
    sources = ["Y dijo Dios: Sea la luz.", "Y fue la luz.", "En el principio creó Dios los cielos y la tierra."]
    targets = ["And God said, Let there be light.", "And there was light.", "In the beginning"]
    records = list(model.scores(sources, targets, **options))
    assert len(records) == len(sources)
    for source, target, record in zip(sources, targets, records):
        src = torch.tensor([vocabs.src.encode(source, add_special_tokens=False).ids + [eos]])
        ids = model.vocabs.tgt.encode(target, add_special_tokens=False).ids
        assert len(ids) >= 2
        tgt = torch.tensor([[bos] + ids + [eos]])
        with torch.no_grad():
            logits = net(src, tgt[:, :-1])
        logp = torch.log_softmax(logits.double(), -1)[0]
        expected = [logp[i, t].item() for i, t in enumerate(ids + [eos])]
        assert record.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert record.logprob == pytest.approx(sum(expected), abs=1e-4)
        assert record.score == pytest.approx(sum(expected) / penalty(len(ids) + 1), abs=1e-4)
        assert not record.empty_input and not record.truncated


def test_an_empty_target_of_a_source_is_scored_as_eos_alone_as_the_search_scores_it(model):
    """The search can end with EOS first (here forced: a length cap of 1 leaves room for EOS alone),
    printing an empty line: `nmt score` gives that hypothesis's log-probability back."""
    [found] = model.translations(["Y fue la luz."], beam_size=1, max_length_a=0.0, max_length_b=1, guard=False)
    [hyp] = found.hypotheses
    assert hyp.tokens == [] and hyp.logprob < 0
    [scored] = model.scores(["Y fue la luz."], [""], normalize=False)
    assert not scored.empty_input and len(scored.token_logprobs) == 1
    assert scored.logprob == pytest.approx(hyp.logprob, abs=1e-4)


def test_unknown_or_impossible_options_are_usage_errors_naming_them(model):
    from nmt.errors import UsageError

    with pytest.raises(UsageError, match="unknown option.*beam_width"):
        model.translate(["Hola"], beam_width=3)
    with pytest.raises(UsageError, match="nbest"):
        model.translate(["Hola"], beam_size=2, nbest=3)
    with pytest.raises(UsageError, match="length.norm.*sqrt.*choose from"):
        model.score(["Hola"], ["Hello"], length_norm="sqrt")
    # values of the wrong type (the CLI's are typed already): a string is not False, nor "5" an int
    with pytest.raises(UsageError, match='alignment must be bool, not "false"'):
        model.translate(["Hola"], alignment="false")
    with pytest.raises(UsageError, match='beam_size must be int, not "5"'):
        model.translate(["Hola"], beam_size="5")
    with pytest.raises(UsageError, match="sampling-topp must be in"):
        model.translate(["Hola"], sampling_topp=-0.1)
    assert model.translate("Y fue la luz.", beam_size=1) == model.translate(["Y fue la luz."], beam_size=1)[0]


def test_the_cli_gives_the_api_output(model, tiny_model_dir, tmp_path):
    """One `nmt translate` and one `nmt score` run, byte for byte what the API gives."""
    from nmt.translate import score_json, to_json

    src, tgt = tmp_path / "in.es", tmp_path / "in.en"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    targets = ["And God said, Let there be light.", "", "And there was light.", "In the beginning"]
    tgt.write_text("\n".join(targets) + "\n", encoding="utf-8")
    options = dict(beam_size=2, nbest=2, max_length_b=8, max_length_a=0.5)
    cli = ok(run_nmt("translate", "-m", str(tiny_model_dir), "-i", str(src), "--format", "jsonl", "--beam-size", "2",
                     "--nbest", "2", "--max-length-b", "8", "--max-length-a", "0.5", "--dtype", "float32"))
    api = [json.dumps(to_json(t), ensure_ascii=False) for t in model.translations(LINES, **options)]
    assert cli.splitlines() == api
    cli = ok(run_nmt("score", "-m", str(tiny_model_dir), "--src", str(src), "--tgt", str(tgt), "--format", "jsonl",
                     "--length-penalty", "0.6", "--dtype", "float32"))
    api = [json.dumps(score_json(s), ensure_ascii=False) for s in model.scores(LINES, targets, length_penalty=0.6)]
    assert cli.splitlines() == api


def _cli(monkeypatch, capsys, *args):
    """`nmt ARGS` in-process: (exit code, stdout, stderr)."""
    import logging

    from nmt import cli

    logger = logging.getLogger("nmt")
    for name in ("handlers", "propagate", "level"):  # cli.main configures the logger: undo it afterwards
        value = getattr(logger, name)
        monkeypatch.setattr(logger, name, list(value) if name == "handlers" else value)
    monkeypatch.setattr(sys, "argv", ["nmt", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_nmt_score_text_and_errors(model, tiny_model_dir, tmp_path, monkeypatch, capsys):
    src, tgt, short, gap = (tmp_path / n for n in ("a.es", "a.en", "short.en", "gap.en"))
    src.write_text("Y fue la luz.\n\nY dijo Dios.\n", encoding="utf-8")
    tgt.write_text("And there was light.\n\nAnd God said.\n", encoding="utf-8")
    short.write_text("And there was light.\n\n", encoding="utf-8")
    gap.write_text("Y fue la luz.\n\n\n", encoding="utf-8")  # a source line 3 empty, its target not
    m = ["-m", str(tiny_model_dir), "--dtype", "float32", "--threads", "1"]
    code, out, _ = _cli(monkeypatch, capsys, "score", *m, "--src", str(src), "--tgt", str(tgt), "--no-normalize")
    expected = model.score(["Y fue la luz.", "", "Y dijo Dios."], ["And there was light.", "", "And God said."],
                           normalize=False)
    assert code == 0 and out.splitlines() == [f"{expected[0]:.6f}", "", f"{expected[2]:.6f}"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tgt.read_bytes())))  # `… | nmt score --tgt -`
    code, piped, _ = _cli(monkeypatch, capsys, "score", *m, "--src", str(src), "--tgt", "-", "--no-normalize")
    assert code == 0 and piped == out
    code, _, err = _cli(monkeypatch, capsys, "score", *m, "--src", "-", "--tgt", "-")
    assert code == 2 and err == "nmt: error: --src and --tgt cannot both be stdin\n"
    code, out, err = _cli(monkeypatch, capsys, "score", *m, "--src", str(src), "--tgt", str(short))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("nmt: error: line counts differ:") and "has 3 lines" in err and "has 2" in err
    assert out == ""  # the mismatch shows while the first window is read
    code, out, err = _cli(monkeypatch, capsys, "score", *m, "--src", str(gap), "--tgt", str(tgt))
    assert code == 1 and err == f"nmt: error: {gap}: line 3 is empty but its pair in {tgt} is not\n"
    code, _, err = _cli(monkeypatch, capsys, "score", *m, "--src", str(src), "--tgt", str(tmp_path / "none.en"))
    assert code == 1 and err.startswith("nmt: error: ") and "no such file" in err


def test_nmt_score_with_stdin_on_a_terminal_is_an_error_not_a_wait(tiny_model_dir, tmp_path):
    import os
    import pty

    from conftest import ROOT

    src = tmp_path / "a.es"
    src.write_text("Y fue la luz.\n", encoding="utf-8")
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "nmt", "score", "-m", str(tiny_model_dir), "--src", str(src),
                               "--tgt", "-"], cwd=ROOT, stdin=follower, capture_output=True, timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    assert done.returncode == 2
    assert done.stderr.decode().strip() == "nmt: error: --tgt -: stdin is a terminal: pipe the text in or give --tgt FILE"
