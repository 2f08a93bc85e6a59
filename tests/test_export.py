"""The CTranslate2 export against `nmt translate` itself: the exported model must translate real
test-set lines to the same tokens as our Translator (greedy, fp32), and score them alike.

Two kinds of model: the real `nmt train` tiny model (near random: its greedy outputs run to the
length cap, which exercises the cap), and small models whose weights are set here (seeded,
with a boosted end-of-sentence row) so that most outputs end on their own at varied lengths,
in the architectures' other corners (post-norm, untied embeddings, separate vocabularies,
short max_positions so long lines are cut). Also: broken model directories fail with an
NmtError, and a failed export leaves neither a half-written directory nor a lost old one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

ctranslate2 = pytest.importorskip("ctranslate2")

from conftest import DATA  # noqa: E402
from nmt import checkpoint, engines, export, runtime  # noqa: E402
from nmt.config import DecodeConfig, ModelConfig, to_dict  # noqa: E402
from nmt.errors import NmtError  # noqa: E402
from nmt.export import export_ctranslate2  # noqa: E402
from nmt.tokenizer import EOS_ID  # noqa: E402
from nmt.translate import Translator  # noqa: E402

LINES = (DATA / "test.es").read_text(encoding="utf-8").splitlines()[:30]


# -- helpers ------------------------------------------------------------------------------------


def nmt_translate(model_dir: Path, lines: list[str], config: DecodeConfig):
    rt = runtime.setup("cpu", "float32", 1)
    model, vocabs, _ = checkpoint.load_for_inference(model_dir)
    return list(Translator.from_model(model, vocabs, rt, config).translate(lines))


def ct2_translate(ct2_dir: Path, lines: list[str], config: DecodeConfig, exact_caps: bool = True):
    engine = engines.CTranslate2.load(ct2_dir, config, threads=1, exact_caps=exact_caps)
    return list(Translator(engine, engine.vocabs, config).translate(lines))


def hand_set_model(tok_dir: Path, *, pre_norm: bool, tie: bool, cross_scale: float, max_positions: int = 96):
    """(model, config) of a small model whose weights are set here so that its greedy outputs are
    not degenerate: norms and biases moved away from their identity init, the cross-attention
    output scaled (so the source matters), sharper output logits (fewer near-ties between two
    fp32 implementations), and the EOS output row scaled until most lines end on their own, at
    varied lengths. The calibration looks only at our own Translator's outputs, over a few
    seeds and scales (random nets flip between "always EOS" and "never EOS" at seed-dependent
    scales)."""
    import torch

    from nmt.model import Transformer
    from nmt.tokenizer import Vocabs

    vocabs = Vocabs.load(tok_dir)
    v = vocabs.src.get_vocab_size()
    c = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
                    pre_norm=pre_norm, tie_embeddings=tie, max_positions=max_positions,
                    src_vocab_size=v, tgt_vocab_size=v)
    rt = runtime.setup("cpu", "float32", 1)
    for seed in range(4):
        for eos_scale in (1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
            with torch.random.fork_rng(), torch.no_grad():
                torch.manual_seed(seed)
                m = Transformer(c).eval()
                for name, p in m.named_parameters():
                    if "norm" in name:
                        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
                    elif name.endswith("bias"):
                        p.normal_(0.0, 0.1)
                for layer in m.decoder:
                    layer.cross_attn.out.weight.mul_(cross_scale)
                m.output.weight.mul_(3.0)
                m.output.weight[EOS_ID].mul_(eos_scale)
            out = list(Translator.from_model(m, vocabs, rt, DecodeConfig(beam_size=1)).translate(LINES))
            ended = sum(not r.hit_max_length for r in out)
            if ended >= 10 and len({len(r.hypotheses[0].tokens) for r in out if not r.hit_max_length}) >= 5:
                return m, c
    pytest.fail("no calibrated test model: every candidate's greedy outputs were degenerate")


def write_model_dir(tok_dir: Path, out: Path, model, config: ModelConfig, separate: bool) -> Path:
    out.mkdir(parents=True)
    for name in (["tokenizer.src.json", "tokenizer.tgt.json"] if separate else ["tokenizer.json"]):
        shutil.copyfile(tok_dir / "tokenizer.json", out / name)
    checkpoint.write_config(out, {"model": to_dict(config)})
    checkpoint.save_weights(model, out / checkpoint.WEIGHTS)
    return out


def best(result):
    """(token ids, hit the cap) of a result from either engine."""
    h = result.hypotheses[0]
    return h.tokens, h.hit_max_length


# -- fixtures -----------------------------------------------------------------------------------

HAND_SET = {
    # pre-norm, untied embeddings, one tokenizer file per side
    "pre-untied-separate": dict(pre_norm=True, tie=False, separate=True, cross_scale=3.0),
    # post-norm, tied embeddings, joint vocabulary
    "post-tied-joint": dict(pre_norm=False, tie=True, separate=False, cross_scale=1.0),
}


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory) -> Path:
    return export_ctranslate2(tiny_model_dir, tmp_path_factory.mktemp("ct2") / "tiny")


@pytest.fixture(scope="module", params=sorted(HAND_SET))
def hand_set(request, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp(request.param)
    arch = HAND_SET[request.param]
    model, config = hand_set_model(tiny_model_dir, pre_norm=arch["pre_norm"], tie=arch["tie"],
                                   cross_scale=arch["cross_scale"])
    model_dir = write_model_dir(tiny_model_dir, base / "model", model, config, arch["separate"])
    return model_dir, export_ctranslate2(model_dir, base / "ct2")


# -- equality with nmt translate ----------------------------------------------------------------


def test_greedy_equals_nmt_translate_on_trained_tiny_model(tiny_model_dir, tiny_export):
    config = DecodeConfig(beam_size=1)
    ours, theirs = nmt_translate(tiny_model_dir, LINES, config), ct2_translate(tiny_export, LINES, config)
    assert [best(r) for r in theirs] == [best(r) for r in ours]
    assert [r.text for r in theirs] == [r.text for r in ours]
    assert [r.truncated for r in theirs] == [r.truncated for r in ours]


def test_nmt_load_of_an_export_scores_as_the_model_directory(tiny_model_dir, tiny_export):
    """`nmt.load` on both directories: `score_batch` gives nmt's teacher-forced log-probabilities."""
    import nmt

    ours, theirs = (nmt.load(d, device="cpu", dtype="float32" if d == tiny_model_dir else "auto", threads=1)
                    for d in (tiny_model_dir, tiny_export))
    sources = [*LINES[:8], ""]
    targets = [*(DATA / "test.en").read_text(encoding="utf-8").splitlines()[:8], ""]
    a, b = list(ours.scores(sources, targets)), list(theirs.scores(sources, targets))
    assert [r.score is None for r in b] == [not s.strip() for s in sources]
    for x, y in zip(a, b):
        assert y.token_logprobs == pytest.approx(x.token_logprobs, abs=1e-4)
        assert (y.score is None and x.score is None) or y.score == pytest.approx(x.score, abs=1e-4)


@pytest.mark.parametrize("exact_caps", [True, False])
def test_greedy_tokens_and_scores_equal_nmt_translate(hand_set, exact_caps):
    model_dir, ct2_dir = hand_set
    config = DecodeConfig(beam_size=1, length_penalty=0.0)  # α = 0: CTranslate2's score is the log-probability
    ours = nmt_translate(model_dir, LINES, config)
    theirs = ct2_translate(ct2_dir, LINES, config, exact_caps=exact_caps)
    ended = [not r.hit_max_length for r in ours]
    assert any(r.truncated for r in ours)  # max_positions 96 cuts the longest lines
    assert [best(r) for r in theirs] == [best(r) for r in ours]
    assert [r.text for r in theirs] == [r.text for r in ours]
    assert [r.truncated for r in theirs] == [r.truncated for r in ours]
    for a, b, done in zip(ours, theirs, ended):
        if done:  # at the cap we add the forced EOS's log-probability, CTranslate2 stops without it
            assert b.hypotheses[0].logprob == pytest.approx(a.hypotheses[0].logprob, abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_agrees_with_nmt_translate_away_from_the_cap(hand_set, length_penalty):
    """Beam 5 with CTranslate2's normalisation (|Y|^α, EOS counted = our "average"), on lines where
    neither side's best ran into the length cap (there CTranslate2 scores without the EOS we
    force, so rankings may differ by design). With α = 0 both return the most probable finished
    hypothesis: the same one. With α > 0 CTranslate2 stops once 5 hypotheses have finished, while
    we go on as long as a live beam could still win; up to its stop both searches hold the same
    beams, so our best is at least as good, and the same hypothesis has the same score."""
    model_dir, ct2_dir = hand_set
    # the searches themselves: a guard retry (under an n-gram ban) of a line that hit the cap
    # would compound the stopping-rule difference described above
    config = DecodeConfig(beam_size=5, length_penalty=length_penalty, length_norm="average", guard=False)
    ours = nmt_translate(model_dir, LINES, config)
    theirs = ct2_translate(ct2_dir, LINES, config)
    pairs = [(a, b) for a, b in zip(ours, theirs) if not (best(a)[1] or best(b)[1])]
    assert len(pairs) >= 5
    for a, b in pairs:
        ours_score, their_score = a.hypotheses[0].score, b.hypotheses[0].score
        if length_penalty == 0.0 or best(a) == best(b):
            assert best(b) == best(a)
            assert their_score == pytest.approx(ours_score, abs=1e-4)
        else:
            assert ours_score >= their_score - 1e-4


def test_line_contract_empty_lines_and_order(tiny_export):
    lines = ["", LINES[0], "   ", LINES[1], LINES[0], ""]
    out = ct2_translate(tiny_export, lines, DecodeConfig(beam_size=2, window=2))
    assert len(out) == len(lines)
    assert [r.empty_input for r in out] == [True, False, True, False, False, True]
    assert [r.text for r in out if r.empty_input] == ["", "", ""]
    assert out[1].text == out[4].text and out[1].text


def test_int8_export_translates(tiny_model_dir, tmp_path):
    out = export_ctranslate2(tiny_model_dir, tmp_path / "int8", quantization="int8")
    results = ct2_translate(out, LINES[:3], DecodeConfig(beam_size=2))
    assert len(results) == 3 and all(r.hypotheses for r in results)


def test_export_directory_contents(tiny_model_dir, tiny_export):
    names = {p.name for p in tiny_export.iterdir()}
    assert {"model.bin", "config.json", "shared_vocabulary.json", "tokenizer.json", export.EXPORT_META} <= names
    assert (tiny_export / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    config = json.loads((tiny_export / "config.json").read_text())
    assert (config["unk_token"], config["bos_token"], config["eos_token"]) == ("<unk>", "<s>", "</s>")
    assert config["add_source_eos"] is True and math.isclose(config["layer_norm_epsilon"], 1e-5)


# -- failures -----------------------------------------------------------------------------------


def test_broken_model_directory_raises_nmt_error(tiny_model_dir, tmp_path):
    with pytest.raises(NmtError, match="no such model directory"):
        export_ctranslate2(tmp_path / "missing", tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    (broken / checkpoint.WEIGHTS).write_bytes((broken / checkpoint.WEIGHTS).read_bytes()[:100])
    with pytest.raises(NmtError, match="cannot load weights|not a safetensors file"):
        export_ctranslate2(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` (relative), with the bytes of the files the model is made of."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.name in ("config.json", checkpoint.WEIGHTS) else None)
            for p in sorted(directory.rglob("*"))}


def test_refuses_to_replace_a_directory_that_is_not_an_export(tiny_model_dir, tmp_path):
    before = _snapshot(tiny_model_dir)
    with pytest.raises(NmtError) as caught:
        export_ctranslate2(tiny_model_dir, tiny_model_dir)
    assert str(caught.value) == f"{tiny_model_dir}: the export must not overwrite the model directory"
    assert _snapshot(tiny_model_dir) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(NmtError, match="not a CTranslate2 model directory"):
        export_ctranslate2(tiny_model_dir, other)
    assert (other / "notes.txt").read_text() == "keep me"
    (other / "model.bin").write_bytes(b"someone else's model")  # a CTranslate2 model nmt did not export
    with pytest.raises(NmtError) as caught:
        export_ctranslate2(tiny_model_dir, other)
    assert str(caught.value) == (f"{other}: holds a CTranslate2 model that nmt did not export "
                                 f"(no nmt_export.json; refusing to replace it)")
    assert (other / "model.bin").read_bytes() == b"someone else's model"


def test_threads_zero_gives_ctranslate2_as_many_threads_as_torch_uses(tiny_export, monkeypatch):
    import torch

    seen = {}
    real = ctranslate2.Translator

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ctranslate2, "Translator", recording)
    engines.CTranslate2.load(tiny_export, DecodeConfig(), threads=0)
    assert seen["intra_threads"] == torch.get_num_threads() >= 1  # not CTranslate2's own default of 4
    engines.CTranslate2.load(tiny_export, DecodeConfig(), threads=1)
    assert seen["intra_threads"] == 1


def test_failed_save_leaves_nothing_half_written(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "ct2"
    export_ctranslate2(tiny_model_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_save(self, output_dir):
        Path(output_dir, "model.bin").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ctranslate2.specs.TransformerSpec, "save", failing_save)
    with pytest.raises(NmtError, match=r"ct2: cannot write the model \(No space left on device\)$"):
        export_ctranslate2(tiny_model_dir, out)  # replacing the good export
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(NmtError, match="cannot write"):
        export_ctranslate2(tiny_model_dir, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]


def test_missing_ctranslate2_is_one_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # makes `import ctranslate2` fail
    with pytest.raises(NmtError, match=r"ctranslate2 is not installed: pip install 'nmt\[ctranslate2\]'"):
        export_ctranslate2(tiny_model_dir, tmp_path / "out")


def test_export_command_writes_a_ctranslate2_model(tiny_model_dir, tmp_path):
    from conftest import run_nmt

    r = run_nmt("export", "-m", str(tiny_model_dir), "--format", "ctranslate2", "--out", str(tmp_path / "ct2"),
                "--quantization", "int8")
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "ct2" / "model.bin").exists()
    r = run_nmt("export", "-m", str(tiny_model_dir), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1


def test_emitted_line_break_bytes_stay_on_one_line(tiny_model_dir, tmp_path):
    """The CTranslate2 path keeps the line contract like nmt's own: a model that always emits the
    byte token of "\\n" still yields one line per input line."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    model_dir = tmp_path / "newline"
    shutil.copytree(tiny_model_dir, model_dir)
    newline_id = Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id("<0x0A>")
    weights = load_file(str(model_dir / "model.safetensors"))
    v = torch.randn(weights["decoder_norm.bias"].shape, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    weights["decoder_norm.weight"] = torch.zeros_like(weights["decoder_norm.weight"])
    weights["decoder_norm.bias"] = v
    weights["output.weight"][newline_id] = 30 * v  # logit 30 for "\n" whatever the input
    save_file(weights, str(model_dir / "model.safetensors"))
    ct2_dir = export_ctranslate2(model_dir, tmp_path / "ct2")
    config = DecodeConfig(beam_size=1, max_length_a=0.0, max_length_b=4)
    results = list(ct2_translate(ct2_dir, ["Hola.", "Dios dijo.", "Amén."], config))
    assert len(results) == 3
    for r in results:
        assert "\n" not in r.text and r.text.strip() == ""  # three line breaks, each now a space


def test_sampling_on_an_export_follows_the_seed_across_runs(tiny_export, tmp_path):
    """CTranslate2 seeds its generator from std::random_device unless told: `--seed` must reach it,
    so two runs with one seed print the same samples, as nmt's own engine does."""
    from conftest import run_nmt

    src = tmp_path / "in.es"
    src.write_text("\n".join(LINES[:6]) + "\n", encoding="utf-8")

    def sample(seed: int) -> bytes:
        r = run_nmt("translate", "-m", str(tiny_export), "-i", str(src), "--sampling-topk", "50", "--seed", str(seed),
                    "--threads", "1", "--no-guard")
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout

    first = sample(1)
    assert sample(1) == first and len(first.splitlines()) == 6
    assert sample(2) != first


@pytest.mark.parametrize("option, value, expected", [
    ("--seed", "-1", "--seed must be in [0, 4294967295] (got -1)"),
    ("--seed", "5000000000", "--seed must be in [0, 4294967295] (got 5000000000)"),
    ("--threads", "-1", "--threads must be in [0, {most}] (0: all cores; at most 4 per core here; got -1)"),
    ("--threads", "100000", "--threads must be in [0, {most}] (0: all cores; at most 4 per core here; got 100000)"),
])
@pytest.mark.parametrize("which", ["model", "export"])
def test_a_seed_or_thread_count_out_of_range_is_a_usage_error_for_either_engine(tiny_model_dir, tiny_export, option,
                                                                               value, expected, which):
    """CTranslate2 takes both unsigned (a negative one was its internal error); nmt's engine the same."""
    from conftest import error_line, run_nmt

    model = tiny_export if which == "export" else tiny_model_dir
    r = run_nmt("translate", "-m", str(model), option, value, input="hola\n")
    from nmt.config import max_threads

    assert error_line(r, 2) == f"nmt: error: {expected}".replace("{most}", str(max_threads()))
    assert r.stdout == b""


def test_an_export_with_a_damaged_record_or_another_tokenizer_is_one_error(tiny_export, tmp_path):
    from tokenizers import Tokenizer

    broken = tmp_path / "ct2"
    shutil.copytree(tiny_export, broken)
    meta = json.loads((broken / export.EXPORT_META).read_text())
    (broken / export.EXPORT_META).write_text(json.dumps({**meta, "max_positions": "many"}))
    with pytest.raises(NmtError, match=r"nmt_export.json: max_positions is 'many', not a whole number ≥ 2"):
        engines.CTranslate2.load(broken, DecodeConfig())
    (broken / export.EXPORT_META).write_text("{not json")
    with pytest.raises(NmtError, match=r"nmt_export.json: not valid JSON"):
        engines.CTranslate2.load(broken, DecodeConfig())
    (broken / export.EXPORT_META).write_text(json.dumps([meta]))
    with pytest.raises(NmtError, match=r"nmt_export.json: not a JSON object \(export the model again\)"):
        engines.CTranslate2.load(broken, DecodeConfig())
    (broken / export.EXPORT_META).unlink()
    os.mkfifo(broken / export.EXPORT_META)  # a FIFO with no writer: refused, not waited on
    with pytest.raises(NmtError, match=r"nmt_export.json: not a regular file"):
        engines.CTranslate2.load(broken, DecodeConfig())
    (broken / export.EXPORT_META).unlink()
    with pytest.raises(NmtError, match=r": not an nmt CTranslate2 export \(no nmt_export\.json\)$"):
        engines.CTranslate2.load(broken, DecodeConfig())
    (broken / export.EXPORT_META).write_text(json.dumps(meta))
    tok = json.loads((broken / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i > 3 and len(t) > 2][:2]  # not the specials at ids 0-3
    vocab[a], vocab[b] = vocab[b], vocab[a]  # another tokenizer of the same size: two ids name each other's piece
    (broken / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    Tokenizer.from_file(str(broken / "tokenizer.json"))  # still a valid tokenizer
    with pytest.raises(NmtError, match="its tokenizer is not the one the model was exported with"):
        engines.CTranslate2.load(broken, DecodeConfig())


def test_info_on_an_export_names_the_model_it_came_from(tiny_model_dir, tiny_export):
    from conftest import error_line, run_nmt

    msg = error_line(run_nmt("info", str(tiny_export)), 1)
    assert msg == (f"nmt: error: {tiny_export} is a CTranslate2 export (`nmt export`): run `nmt info` on the model "
                   f"it was exported from ({tiny_model_dir.resolve()})")
