"""`nmt info` and `nmt average` end to end on one tiny run with three checkpoints, and
`average_state_dicts` against means computed by hand."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import error_line, ok, run_nmt, write_slice
from nmt.average import average_state_dicts, kept_model_bleu
from nmt.errors import NmtError

# The test machine is small and shared: one thread per subprocess is much faster than
# oversubscribed cores (`nmt average` has no --threads option).
os.environ.setdefault("OMP_NUM_THREADS", "1")





@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("avg")
    train = write_slice(base / "data", "train", 300)
    dev = write_slice(base / "data", "dev", 5, split="dev")
    out = base / "run"
    ok(run_nmt("train", "--train", str(train), "--dev", str(dev), "--src", "es", "--tgt", "en", "--out", str(out),
               "--preset", "tiny", "--dtype", "float32", "--device", "cpu", "--vocab-size", "400",
               "--batch-tokens", "512", "--eval-every", "10", "--max-steps", "30", "--keep-last", "3"))
    return out


def safetensors_parameters(path: Path) -> int:
    """Elements stored in a safetensors file: tied matrices are stored (and so counted) once."""
    total = 0
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            total += n
    return total


# -- info ---------------------------------------------------------------------------------------


def test_info_json_round_trips_the_config(run):
    facts = json.loads(ok(run_nmt("info", str(run), "--format", "json")))
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert facts["model"] == config["model"]
    assert facts["tokenizer"] == config["tokenizer"]
    assert facts["data"] == config["data"]
    assert facts["format_version"] == 1
    assert facts["languages"] == "es→en"
    assert facts["preset"] == "tiny"
    assert facts["parameters"] == safetensors_parameters(run / "model.safetensors")
    assert facts["training"] == json.loads((run / "training.json").read_text(encoding="utf-8"))


def test_info_text(run):
    text = ok(run_nmt("info", str(run)))
    params = safetensors_parameters(run / "model.safetensors")
    assert f"{params:,}" in text
    assert "es→en" in text
    assert "tiny" in text


def test_training_json_gives_the_rate_between_dev_evaluations_too(run, tmp_path):
    """The whole run's rate counts the dev evaluations' time; the training rate leaves it out, each
    evaluation's time taken from metrics.jsonl's records (3 evaluations: steps 10, 20, 30)."""
    t = json.loads((run / "training.json").read_text(encoding="utf-8"))
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
             if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    spent = sum(r["eval_seconds"] for r in evals)
    assert 0 < spent < t["seconds"] and t["evaluation_seconds"] == pytest.approx(spent)
    assert t["training_target_tokens_per_s"] == pytest.approx(t["target_tokens"] / (t["seconds"] - spent))
    assert t["training_target_tokens_per_s"] > t["target_tokens_per_s"]
    text = " ".join(ok(run_nmt("info", str(run))).split())
    assert f"{t['target_tokens_per_s']:,.0f} target tokens/s ({t['training_target_tokens_per_s']:,.0f} between dev " \
           f"evaluations, which took {spent / 60:.1f} min)" in text
    old = tmp_path / "old"  # a run from before these were kept: the whole run's rate alone
    old.mkdir()
    for name in ("config.json", "model.safetensors"):
        (old / name).write_bytes((run / name).read_bytes())
    (old / "tokenizer.json").write_bytes((run / "tokenizer.json").read_bytes())
    for extra in ("tokenizer.options.json",):
        if (run / extra).exists():
            (old / extra).write_bytes((run / extra).read_bytes())
    (old / "training.json").write_text(json.dumps({k: v for k, v in t.items() if k not in (
        "evaluation_seconds", "training_target_tokens_per_s")}), encoding="utf-8")
    text = " ".join(ok(run_nmt("info", str(old))).split())
    assert f"{t['target_tokens_per_s']:,.0f} target tokens/s" in text and "between dev evaluations" not in text


def test_training_json_gives_no_evaluation_time_where_an_evaluation_did_not_record_it(tmp_path):
    """A run begun by an nmt from before evaluations recorded their time, resumed by this one: a
    sum of the newer evaluations alone would understate it, so neither figure is given."""
    from types import SimpleNamespace

    from nmt import train as train_mod
    from nmt.runtime import setup

    history = [{"event": "eval", "step": 10, "dev_bleu": 1.0},
               {"event": "eval", "step": 20, "dev_bleu": 2.0, "eval_seconds": 4.0}]
    for records, spent in [(history, None), (history[1:], 4.0)]:
        trainer = SimpleNamespace(progress=train_mod.Progress(step=20, target_tokens=1000, seconds=10.0, history=records),
                                  p=SimpleNamespace(out=tmp_path), stop_reason="20 steps done",
                                  model=torch.nn.Linear(2, 2))
        train_mod._write_summary(trainer, setup("cpu", "float32", 0), SimpleNamespace(world_size=1))
        t = json.loads((tmp_path / "training.json").read_text(encoding="utf-8"))
        assert t["target_tokens_per_s"] == pytest.approx(100.0) and t["evaluation_seconds"] == spent
        assert t["training_target_tokens_per_s"] == (None if spent is None else pytest.approx(1000 / 6.0))


@pytest.mark.parametrize("what", ["empty dir", "missing dir", "a file", "bad training.json"])
def test_info_on_a_non_model_dir(tmp_path, run, what):
    target = tmp_path / "x"
    if what == "empty dir":
        target.mkdir()
    elif what == "a file":
        target.write_text("hello\n")
    elif what == "bad training.json":
        import shutil

        shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "cache"))
        (target / "training.json").write_text("{oops", encoding="utf-8")
    msg = error_line(run_nmt("info", str(target)), 1)
    assert str(target) in msg


def test_info_bad_format(run):
    error_line(run_nmt("info", str(run), "--format", "xml"), 2)


def test_info_on_json_files_of_the_wrong_shape(tmp_path, run):
    import shutil

    target = tmp_path / "x"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    (target / "training.json").write_text('{"steps": 1}', encoding="utf-8")  # a summary missing its fields
    msg = error_line(run_nmt("info", str(target)), 1)
    assert "config.json, training.json or averaging.json is malformed" in msg and "KeyError" in msg
    (target / "training.json").write_bytes(b"\xff\xfe")  # not UTF-8
    assert "training.json: not valid JSON" in error_line(run_nmt("info", str(target)), 1)
    (target / "training.json").unlink()
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    (target / "config.json").write_text(json.dumps({**config, "train": None}), encoding="utf-8")
    assert json.loads(ok(run_nmt("info", str(target), "--format", "json")))["preset"] is None


def test_info_text_is_plain_text_on_a_pipe_and_says_when_there_was_no_dev_set(tmp_path, run):
    """A path with brackets is text, not rich markup; a pipe gets lines wider than 80 columns (the
    signature whole); a model trained without a dev set has no best dev BLEU (not -1.00)."""
    import shutil

    target = tmp_path / "es-en[v2]"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    training = json.loads((target / "training.json").read_text(encoding="utf-8"))
    signature = training["evaluations"][-1]["signature"]
    text = ok(run_nmt("info", str(target)))
    assert f"nmt model {target}" in text and any(signature in line for line in text.splitlines())
    (target / "training.json").write_text(json.dumps({**training, "best_dev_bleu": -1.0, "best_step": 0,
                                                      "evaluations": []}), encoding="utf-8")
    text = ok(run_nmt("info", str(target)))
    assert "none (trained without a dev set)" in text and "-1.00" not in text


def test_info_does_not_wait_on_a_fifo_for_a_summary(tmp_path, run):
    import shutil

    target = tmp_path / "x"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    (target / "training.json").unlink()
    os.mkfifo(target / "training.json")
    msg = error_line(run_nmt("info", str(target), timeout=60), 1)
    assert "training.json" in msg and "not a regular file" in msg


# -- average ------------------------------------------------------------------------------------


def test_average_last_one_is_a_usage_error(run):
    msg = error_line(run_nmt("average", "-m", str(run), "--last", "1"), 2)
    assert "--last" in msg


def test_average_needs_a_model_dir(tmp_path):
    error_line(run_nmt("average", "-m", str(tmp_path / "nothing"), "--last", "2"), 1)


def test_average_refuses_a_checkpoint_of_another_shape(tmp_path, run):
    import shutil

    target = tmp_path / "x"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("cache"))
    last = sorted((target / "checkpoints").glob("step-*"))[-1] / "model.safetensors"
    tensors = load_file(str(last))
    name = next(iter(tensors))
    save_file({**tensors, name: torch.zeros(3, 3)}, str(last))
    msg = error_line(run_nmt("average", "-m", str(target), "--last", "2", "--device", "cpu"), 1)
    assert str(last) in msg and name in msg


def test_average_on_an_empty_dev_set_is_a_one_line_error_and_keeps_the_model(tmp_path, run):
    (tmp_path / "empty.es").write_bytes(b"")
    (tmp_path / "empty.en").write_bytes(b"")
    before = (run / "model.safetensors").read_bytes()
    msg = error_line(run_nmt("average", "-m", str(run), "--last", "2", "--device", "cpu", "--dev",
                             str(tmp_path / "empty")), 1)
    assert msg.endswith("the dev set is empty (give a dev set with lines)")
    assert (run / "model.safetensors").read_bytes() == before


def test_average_last_two(run, tmp_path):
    """End to end: which model is kept depends on the tiny model's real dev scores (both outcomes
    are set by hand in the test below)."""
    shutil.copytree(run, tmp_path / "run")
    run = tmp_path / "run"
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000010", "step-00000020", "step-00000030"]
    before = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    stdout = ok(run_nmt("average", "-m", str(run), "--last", "2", "--device", "cpu"))
    record = json.loads((run / "averaging.json").read_text(encoding="utf-8"))
    assert record["checkpoints"] == ["step-00000020", "step-00000030"]
    assert set(record["scores"]) == {"current", "averaged"}
    for score in record["scores"].values():
        assert isinstance(score["dev_bleu"], float) and score["signature"].startswith("nrefs:1|")
    assert record["kept"] in ("current", "averaged")
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert record["dev"] == config["train"]["dev"] and record["max_sentences"] == 0  # where it scored: the run's
    assert f"kept the {record['kept']} model" in stdout
    if record["scores"]["averaged"]["dev_bleu"] > record["scores"]["current"]["dev_bleu"]:
        assert record["kept"] == "averaged"
    else:
        assert record["kept"] == "current"
    # model.safetensors: the element-wise mean of the two checkpoints if kept, else untouched
    now = load_file(str(run / "model.safetensors"))
    if record["kept"] == "averaged":
        a, b = (load_file(str(c / "model.safetensors")) for c in checkpoints[1:])
        assert set(now) == set(a)
        for name in now:
            torch.testing.assert_close(now[name], (a[name].double() + b[name].double()).div(2).float())
    else:
        assert hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest() == before
    facts = json.loads(ok(run_nmt("info", str(run), "--format", "json")))
    assert facts["averaging"] == record


@pytest.mark.parametrize("current, averaged, kept", [(10.0, 20.0, "averaged"), (20.0, 10.0, "current"),
                                                      (15.0, 15.0, "current")])  # a tie keeps the model
def test_average_keeps_the_mean_of_every_parameter_only_when_it_scores_higher(run, tmp_path, monkeypatch, current,
                                                                              averaged, kept):
    """Both outcomes, whatever the tiny model's real scores: the dev scores are set by hand (the
    current model is scored first), and the mean is computed here, in float64, from the files."""
    from nmt import average as average_mod
    from nmt import validate
    from nmt.checkpoint import load_for_inference
    from nmt.runtime import setup

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "model.safetensors").read_bytes()
    scores = iter([current, averaged])
    monkeypatch.setattr(validate, "evaluate_devs", lambda *a, **k: (next(scores), "nrefs:1|x", 4.0, {}))
    record = average_mod.average(copy, 2, setup("cpu", "float32", 1))
    assert record["kept"] == kept and record["checkpoints"] == ["step-00000020", "step-00000030"]
    assert [record["scores"][k]["dev_bleu"] for k in ("current", "averaged")] == [current, averaged]
    assert json.loads((copy / "averaging.json").read_text()) == record
    if kept == "current":
        assert (copy / "model.safetensors").read_bytes() == before
        return
    a, b = (load_file(str(copy / "checkpoints" / s / "model.safetensors")) for s in record["checkpoints"])
    now = load_file(str(copy / "model.safetensors"))
    assert set(now) == set(a)
    for name in now:
        torch.testing.assert_close(now[name], ((a[name].double() + b[name].double()) / 2).float(), rtol=0, atol=0)
    # loaded as a model, every parameter is the mean, the tied ones (one stored tensor) included
    model = load_for_inference(copy)[0].state_dict()
    for name, tensor in model.items():
        stored = next(k for k in now if torch.equal(now[k], tensor)) if name not in now else name
        torch.testing.assert_close(tensor, ((a[stored].double() + b[stored].double()) / 2).float(), rtol=0, atol=0)


def test_dev_bleu_and_loss_agree_with_sacrebleu_and_a_loss_summed_by_hand(run, monkeypatch):
    """`evaluate_dev` on the first 3 dev lines: BLEU = sacreBLEU's corpus BLEU of the translations
    of those lines alone (the tiny model's are empty, so a stand-in translator answers with a
    word cut from each reference), and the loss = Σ −log p(reference token) / Σ tokens, EOS
    included, computed one sentence at a time without padding."""
    import sacrebleu
    import torch.nn.functional as F

    from nmt import translate, validate
    from nmt.checkpoint import load_for_inference
    from nmt.corpus import ParallelCorpus
    from nmt.runtime import setup

    config = json.loads((run / "config.json").read_text())
    dev = ParallelCorpus.from_prefix(config["train"]["dev"], "es", "en")
    pairs = list(dev.pairs())
    assert len(pairs) > 3
    answers = {src: " ".join(tgt.split()[1:]) for src, tgt in pairs}  # the reference less its first word
    seen = []

    class StandIn:
        def translate(self, sources):
            for src in sources:
                seen.append(src)
                yield type("T", (), {"text": answers[src]})()

    monkeypatch.setattr(translate.Translator, "from_model", classmethod(lambda cls, *a, **k: StandIn()))
    model, vocabs, _ = load_for_inference(run)
    bleu, signature, loss = validate.evaluate_dev(model, vocabs, dev, setup("cpu", "float32", 1), max_sentences=3)
    assert seen == [s for s, _ in pairs[:3]]
    reference = sacrebleu.metrics.BLEU()
    expected = reference.corpus_score([answers[s] for s, _ in pairs[:3]], [[t for _, t in pairs[:3]]])
    assert 0 < expected.score < 100 and bleu == pytest.approx(expected.score, abs=1e-9)
    assert signature == reference.get_signature().format()
    total, count = 0.0, 0
    with torch.no_grad():
        for src, tgt in pairs[:3]:
            s = torch.tensor([vocabs.src.encode(src, add_special_tokens=False).ids + [model.config.eos_id]])
            t = vocabs.tgt.encode(tgt, add_special_tokens=False).ids + [model.config.eos_id]
            logits = model(s, torch.tensor([[model.config.bos_id] + t[:-1]]))[0]
            total -= F.log_softmax(logits.double(), -1)[torch.arange(len(t)), torch.tensor(t)].sum().item()
            count += len(t)
    assert loss == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("record, bar", [
    ({"kept": "averaged"}, 99.0), ({"kept": "current"}, 98.0),  # the score of the model kept, either one
    ({"kept": "averaged", "dev": "/elsewhere/dev"}, None), ({"kept": "averaged", "max_sentences": 2}, None),
    ({"kept": "averaged", "dev": None, "max_sentences": None}, 99.0),  # from before these were kept: as then,
    ({"kept": "current", "dev": None, "max_sentences": None}, None),   # only an average (its "current": any dev)
    ({"kept": "neither"}, None), ({"kept": "averaged", "scores": {}}, None)])
def test_the_bar_an_extended_run_must_beat_is_the_kept_models_score_on_its_own_dev_lines(tmp_path, record, bar):
    dev = "/data/dev"
    full = {"checkpoints": ["step-00000002", "step-00000004"], "dev": dev, "max_sentences": 0,
            "scores": {"averaged": {"dev_bleu": 99.0}, "current": {"dev_bleu": 98.0}}, **record}
    full = {k: v for k, v in full.items() if v is not None}  # None: a key records from before did not have
    (tmp_path / "averaging.json").write_text(json.dumps(full))
    assert kept_model_bleu(tmp_path, dev, 0) == bar
    assert kept_model_bleu(tmp_path / "none", dev, 0) is None  # no record


# -- average_state_dicts ------------------------------------------------------------------------


def test_average_state_dicts_by_hand(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
               "h": torch.tensor([60000.0, -1.0], dtype=torch.float16),
               "b": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}, str(first))
    save_file({"w": torch.tensor([[3.0, 6.0], [5.0, 0.0]]),
               "h": torch.tensor([60000.0, 2.0], dtype=torch.float16),
               "b": torch.tensor([2.0, 3.0], dtype=torch.bfloat16)}, str(second))
    mean = average_state_dicts([first, second])
    assert set(mean) == {"w", "h", "b"}
    assert mean["w"].dtype == torch.float32 and mean["w"].tolist() == [[2.0, 4.0], [4.0, 2.0]]
    # summed in float16 this would overflow (120000 > 65504)
    assert mean["h"].dtype == torch.float16 and mean["h"].tolist() == [60000.0, 0.5]
    assert mean["b"].dtype == torch.bfloat16 and mean["b"].tolist() == [1.5, 2.5]
    # one file: itself
    assert average_state_dicts([first])["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_average_state_dicts_three_files(tmp_path):
    paths = []
    for i, values in enumerate(([0.0, 3.0], [1.0, 3.0], [5.0, 3.0])):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"x": torch.tensor(values)}, str(paths[-1]))
    assert average_state_dicts(paths)["x"].tolist() == [2.0, 3.0]


def test_average_state_dicts_refuses_other_tensors(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2)}, str(first))
    save_file({"w": torch.zeros(2), "extra": torch.zeros(1)}, str(second))
    with pytest.raises(NmtError, match="b.safetensors"):
        average_state_dicts([first, second])


def test_average_state_dicts_names_a_damaged_file(tmp_path):
    first, damaged = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.tensor([1.0])}, str(first))
    damaged.write_bytes(first.read_bytes()[:20])  # cut short, as by a full disk
    with pytest.raises(NmtError) as caught:
        average_state_dicts([first, damaged])
    assert str(caught.value).startswith(f"{damaged}: cannot load weights (")
