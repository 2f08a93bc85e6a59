"""End-to-end tests of `nmt train` as a user runs it: one-line errors (file, line, counts) with the
right exit codes for bad data and bad options, and one tiny run whose directory is checked file
by file, resumed, and protected against resuming with other model options or other data."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import error_line as conftest_error_line
from conftest import ok as conftest_ok
from conftest import run_nmt, without_paths, write_slice

# The test machine is small and shared: one thread per subprocess is much faster than
# oversubscribed cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = ("--src", "es", "--tgt", "en", "--preset", "tiny", "--dtype", "float32", "--device", "cpu",
        "--vocab-size", "400", "--batch-tokens", "512")


def train(*args: str):
    return run_nmt("train", *TINY, *args)


def error_line(r: subprocess.CompletedProcess, code: int) -> str:
    """One `nmt: error: …` line, the last on stderr (log lines may come before it)."""
    return conftest_error_line(r, code, only_line=False)


def ok(r: subprocess.CompletedProcess) -> str:
    """Exit 0, no traceback; the logs (stderr)."""
    conftest_ok(r)
    return r.stderr.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("train-data")
    return {"train": write_slice(base, "train", 300), "dev": write_slice(base, "dev", 5, split="dev")}


# -- bad training data --------------------------------------------------------------------------


def test_missing_training_file(tmp_path, data):
    prefix = tmp_path / "nowhere" / "corpus"
    msg = error_line(train("--train", str(prefix), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2"), 1)
    assert f"{prefix}.es" in msg


def test_missing_target_side(tmp_path):
    prefix = write_slice(tmp_path / "d", "c", 50)
    Path(f"{prefix}.en").unlink()
    msg = error_line(train("--train", str(prefix), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2"), 1)
    assert f"{prefix}.en" in msg


def test_mismatched_line_counts(tmp_path):
    prefix = write_slice(tmp_path / "d", "c", 60)
    en = Path(f"{prefix}.en")
    en.write_text("\n".join(en.read_text(encoding="utf-8").splitlines()[:57]) + "\n", encoding="utf-8")
    msg = error_line(train("--train", str(prefix), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2"), 1)
    assert msg == f"nmt: error: line counts differ: {prefix}.es has 60 lines, {prefix}.en has 57"


def test_mismatched_dev_line_counts(tmp_path, data):
    dev = write_slice(tmp_path / "d", "dev", 5, split="dev")
    Path(f"{dev}.en").write_text("one\ntwo\n", encoding="utf-8")
    msg = error_line(train("--train", str(data["train"]), "--dev", str(dev), "--out", str(tmp_path / "run"),
                           "--max-steps", "2"), 1)
    assert msg == f"nmt: error: line counts differ: {dev}.es has 5 lines, {dev}.en has 2"


def test_invalid_utf8_in_training_data(tmp_path):
    prefix = write_slice(tmp_path / "d", "c", 40)
    es = Path(f"{prefix}.es")
    lines = es.read_bytes().split(b"\n")
    lines[6] = b"ma\xf1ana \xff"
    es.write_bytes(b"\n".join(lines))
    msg = error_line(train("--train", str(prefix), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2"), 1)
    assert str(es) in msg and "line 7" in msg and "UTF-8" in msg


def test_empty_training_data(tmp_path):
    prefix = tmp_path / "d" / "c"
    prefix.parent.mkdir()
    Path(f"{prefix}.es").write_bytes(b"")
    Path(f"{prefix}.en").write_bytes(b"")
    msg = error_line(train("--train", str(prefix), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2"), 1)
    assert "empty" in without_paths(msg)


def test_a_corpus_that_filtering_empties_is_named(tmp_path, data):
    prefix = tmp_path / "same"
    for lang in ("es", "en"):  # every pair has its source equal to its target: all filtered out
        Path(f"{prefix}.{lang}").write_text("hola mundo\nbuenos días\n", encoding="utf-8")
    msg = error_line(train("--train", str(data["train"]), "--train", str(prefix), "--weights", "1,1", "--dev", "none",
                           "--out", str(tmp_path / "run"), "--max-steps", "2"), 1)
    assert msg.startswith(f"nmt: error: {prefix}.es, {prefix}.en: no training pairs left after filtering (")


def test_separate_vocabularies_of_equal_size_train_two_embedding_matrices(tmp_path, data):
    out = tmp_path / "run"
    ok(train("--train", str(data["train"]), "--dev", "none", "--out", str(out), "--max-steps", "2",
             "--separate-vocab"))  # --vocab-size 400 (TINY): both sides reach it
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["src_vocab_size"] == config["model"]["tgt_vocab_size"]  # equal sizes, other pieces
    assert config["model"]["joint_vocab"] is False and config["tokenizer"]["joint"] is False
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    # saved once per matrix: the source embeddings, and the target's, tied to the output layer
    assert {k for k in weights if "embed" in k or k.startswith("output")} == {"src_embed.weight", "output.weight"}
    assert not torch.equal(weights["src_embed.weight"], weights["output.weight"])
    r = run_nmt("translate", "-m", str(out), "--beam-size", "1", "--max-length-a", "0", "--max-length-b", "5",
                input="hola\n")
    assert r.returncode == 0 and r.stdout.decode().count("\n") == 1, r.stderr.decode()
    # one of the two tokenizer files lost: the checkpoints' tokenizer is not trained anew over the other
    kept = (out / "tokenizer.src.json").read_bytes()
    (out / "tokenizer.tgt.json").unlink()
    msg = without_paths(error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(out),
                                         "--max-steps", "4", "--separate-vocab"), 1))
    assert "has tokenizer.src.json but not the other side's file, and checkpoints trained with both" in msg
    assert (out / "tokenizer.src.json").read_bytes() == kept


# -- bad options --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge' (choose from tiny, small, base, big)"),
    (["--max-time", "abc"], "--max-time: cannot read 'abc' (examples: 30m, 1h30m, 90s, 600)"),
    (["--dtype", "float64"], "--dtype: unknown value 'float64' (choose from auto, float32, bfloat16)"),
    (["--device", "tpu"], "--device: unknown value 'tpu' (choose from auto, cpu, cuda)"),
    (["--max-steps", "0"], "--max-steps must be > 0 (got 0)"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1) (got 1.5)"),
    (["--max-length", "5000"], "--max-length 5000 exceeds the model's max_positions 1024 (lower --max-length, "
                               "or raise model.max_positions with --config)"),
    (["--keep-last", "0"], "--keep-last must be ≥ 1 (got 0)"),
    (["--patience", "-1"], "--patience must be ≥ 0, 0 for off (got -1)"),
    (["--average-last", "-2"], "--average-last must be ≥ 0, 0 for off (got -2)"),
    (["--max-ratio", "nan"], "--max-ratio must be ≥ 1, a longer side at most that many times the shorter (got nan)"),
    (["--max-ratio", "0.5"], "--max-ratio must be ≥ 1, a longer side at most that many times the shorter (got 0.5)"),
    (["--tokenizer-sample", "0"], "--tokenizer-sample must be ≥ 1 pair (got 0)"),
    (["--lr", "-1e-3"], "--lr must be a finite number > 0 (got -0.001)"),
    (["--lr", "nan"], "--lr must be a finite number > 0 (got nan)"),
    (["--lr", "0"], "--lr must be a finite number > 0 (got 0.0)"),
    (["--warmup", "-5"], "--warmup must be ≥ 0 (got -5)"),
    (["--vocab-size", "0"], "--vocab-size must be in [1, 4,194,304] (got 0; the smallest vocabulary has 324 pieces: "
                            "256 byte tokens, 4 special ones and 64 more)"),
    (["--vocab-size", "99999999999"], "--vocab-size must be in [1, 4,194,304] (got 99999999999; the smallest "
                                      "vocabulary has 324 pieces: 256 byte tokens, 4 special ones and 64 more)"),
    (["--threads", "100000"], "--threads must be in [0, {most}] (0: all cores; at most 4 per core here; got 100000)"),
])
def test_usage_errors_exit_2(tmp_path, data, args, message):
    from nmt.config import max_threads

    msg = error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2", *args), 2)
    assert msg == f"nmt: error: {message}".replace("{most}", str(max_threads()))
    assert not (tmp_path / "run").exists()


def test_an_option_the_parser_cannot_read_exits_2(tmp_path, data):
    """The option parser's own message (click's words, which nmt does not write): the option is named."""
    msg = error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2", "--max-steps", "many"), 2)
    assert msg.startswith("nmt: error: Invalid value for '--max-steps': ")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_schedule_to_zero_at_the_budgets_end_needs_a_budget(tmp_path, data, schedule):
    msg = error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--lr-schedule", schedule), 2)
    assert msg == (f"nmt: error: --lr-schedule {schedule} decays to 0 at the end of the budget: "
                   f"give --max-steps, --max-time or --max-epochs")
    assert not (tmp_path / "run").exists()


def _logged_rates(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # --log-every 1: every step
    return rows


def test_the_cosine_ends_with_the_epochs_when_max_epochs_is_the_budget(tmp_path, data):
    """--max-epochs is a budget too: the rate of each step is the cosine at the share of the epochs
    done before it (computed here from the logged epochs), so the last step trains near 0."""
    out = tmp_path / "run"
    ok(train("--train", str(data["train"]), "--dev", "none", "--out", str(out), "--max-epochs", "2",
             "--lr-schedule", "cosine", "--warmup", "1", "--log-every", "1"))
    rows = _logged_rates(out)
    peak = json.loads((out / "config.json").read_text())["train"]["lr"]
    per_epoch = [sum(r["epoch"] == e for r in rows) for e in (0, 1)]  # each epoch's batches (update-freq 1)
    assert min(per_epoch) > 3 and len(rows) == sum(per_epoch)
    for i, r in enumerate(rows):
        done = i - per_epoch[0] * r["epoch"]  # batches of this epoch before this step
        share = (r["epoch"] + done / per_epoch[r["epoch"]]) / 2
        assert r["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * share)), rel=1e-6)
    assert rows[-1]["lr"] < 0.01 * peak and rows[0]["lr"] == pytest.approx(peak)


def test_the_last_step_of_a_step_budget_still_learns(tmp_path, data):
    """--max-steps N: step k trains at the cosine of (k-1)/N, so step N is not at 0 (and
    --max-steps 1 trains at the peak, not at 0)."""
    out = tmp_path / "run"
    ok(train("--train", str(data["train"]), "--dev", "none", "--out", str(out), "--max-steps", "4",
             "--lr-schedule", "cosine", "--warmup", "1", "--log-every", "1"))
    peak = json.loads((out / "config.json").read_text())["train"]["lr"]
    assert [r["lr"] for r in _logged_rates(out)] == pytest.approx(
        [peak * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], rel=1e-6)


def test_config_file_not_json(tmp_path, data):
    bad = tmp_path / "cfg.json"
    bad.write_text("model: {d_model: 32}\n", encoding="utf-8")
    msg = error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2", "--config", str(bad)), 1)
    assert without_paths(msg).startswith("nmt: error: <path>: not valid JSON (")
    assert str(bad) in msg


def test_config_file_missing(tmp_path, data):
    missing = tmp_path / "none.json"
    msg = error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2", "--config", str(missing)), 1)
    assert without_paths(msg) == "nmt: error: <path>: no such config file"
    assert str(missing) in msg


def test_config_file_unknown_model_key(tmp_path, data):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"d_model": 32, "n_experts": 4}}), encoding="utf-8")
    msg = error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2", "--config", str(cfg)), 2)
    assert "n_experts" in msg


@pytest.mark.parametrize("overrides, message", [
    ({"train": {"keep_last": "x"}}, '--config train: keep_last must be int, not "x"'),
    ({"train": {"train": "corpus"}}, '--config train: train must be list[str], not "corpus"'),
    ({"train": {"max_time": "30m"}}, '--config train: max_time must be float | None, not "30m"'),
    ({"tokenizer": {"min_frequency": 1.5}}, "--config tokenizer: min_frequency must be int, not 1.5"),
    ({"train": {"weights": [0.5, 0.5]}}, "--config train: weights: 2 weight(s) for 1 --train corpora (give one per corpus)"),
    ({"train": {"weights": [-1]}}, "--config train: weights: [-1] has a negative or non-finite weight (each must be ≥ 0)"),
    ({"train": {"betas": [1.0, 0.98]}}, "--config train.betas must be two numbers in [0, 1) (got [1.0, 0.98])"),
    ({"train": {"weight_decay": -0.1}}, "--config train.weight_decay must be ≥ 0 (got -0.1)"),
    ({"train": {"clip_norm": -1}}, "--config train.clip_norm must be ≥ 0, 0 for off (got -1)"),
    ({"train": {"eval_max_sentences": -5}},
     "--config train.eval_max_sentences must be ≥ 0, 0 for the whole dev set (got -5)"),
    ({"train": {"seed": -1}}, "--seed must be in [0, 9223372036854775807] (got -1)"),
    ({"train": {"init_from": "runs/base"}}, "--config train.init_from: give --init-from runs/base on the command line "
                                            "instead (a fine-tune keeps the parent's shape and sets its own schedule)"),
    # the model section: what loading a model would refuse, refused before any work
    ({"model": {"d_model": 63}}, "--config model: d_model = 63 must be even (sinusoidal positions come in sin/cos pairs)"),
    ({"model": {"d_model": 66}}, "--config model: d_model = 66 is not divisible by n_heads = 4"),
    ({"model": {"n_heads": 0}}, "--config model: n_heads = 0 is out of range [1, 1024]"),
    ({"model": {"d_model": 1e3}}, "--config model: d_model must be int, not 1000.0"),
    ({"model": {"d_model": 1000000}}, "--config model: d_model = 1000000 is out of range [2, 65536]"),
    ({"model": {"encoder_layers": 0}}, "--config model: encoder_layers = 0 is out of range [1, 1024]"),
    ({"model": {"attention_dropout": 1.0}}, "--config model: attention_dropout = 1.0 is not in [0, 1)"),
    ({"model": {"pad_id": 5}}, "--config model.pad_id: set by the tokenizer, not an option (nmt's tokenizers fix the "
                               "special ids at 0, 2 and 3)"),
    ({"model": {"tgt_vocab_size": 900}}, "--config model.tgt_vocab_size: set by the tokenizer, not an option (use "
                                         "--vocab-size)"),
    ({"model": []}, "<path>: section model must be a JSON object of options (got [])"),
    ({"tokenizer": {"min_frequency": -3}}, "--config tokenizer.min_frequency must be ≥ 0 (got -3)"),
])
def test_config_file_values_of_the_wrong_type_or_range_are_one_line_errors(tmp_path, data, overrides, message):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(overrides), encoding="utf-8")
    msg = error_line(train("--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                           "--max-steps", "2", "--config", str(cfg)), 2)
    assert without_paths(msg) == f"nmt: error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, message", [
    ({"n_heads": 0}, "--config model: n_heads = 0 is out of range [1, 1024]"),
    ({"d_model": 63}, "--config model: d_model = 63 must be even (sinusoidal positions come in sin/cos pairs)"),
    ({"dropout": 1.5}, "--config model: dropout = 1.5 is not in [0, 1)"),
    ({"eos_id": 1}, "--config model.eos_id: set by the tokenizer, not an option (nmt's tokenizers fix the special ids "
                    "at 0, 2 and 3)"),
])
def test_config_model_values_are_checked_when_the_recipe_chooses_the_shape(tmp_path, data, model, message):
    """With a budget and no preset the recipe sets the width: each field given is checked alone."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": model}), encoding="utf-8")
    r = run_nmt("train", "--train", str(data["train"]), "--dev", "none", "--out", str(tmp_path / "run"),
                "--max-time", "1m", "--config", str(cfg))
    assert error_line(r, 2) == f"nmt: error: {message}"
    assert not (tmp_path / "run").exists()


# -- one tiny run, resumed ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> dict:
    """20 steps, dev evaluation and checkpoint every 10, a train log record every 5."""
    base = tmp_path_factory.mktemp("train-run")
    cfg = base / "overrides.json"
    cfg.write_text(json.dumps({"train": {"log_every": 5}}), encoding="utf-8")
    out = base / "run"
    args = ["--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(out), "--config", str(cfg),
            "--eval-every", "10"]
    first = train(*args, "--max-steps", "20")
    return {"out": out, "args": args, "stderr": ok(first)}


def test_run_directory(run, data):
    out: Path = run["out"]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["format"] == "nmt-model" and config["version"] == 1
    assert config["src"] == "es" and config["tgt"] == "en"
    assert config["model"]["d_model"] == 64 and config["train"]["preset"] == "tiny"
    fingerprints = {d["path"]: d for d in config["data"]}
    for lang in ("es", "en"):
        path = Path(f"{data['train']}.{lang}")
        fp = fingerprints[str(path)]
        assert fp["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert fp["size"] == path.stat().st_size
        assert fp["lines"] == 300
    assert len(config["data"]) == 2

    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["model"]["type"] == "BPE"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 10

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    events = {r["event"] for r in records}
    assert events == {"train", "eval"}
    assert [r["step"] for r in records if r["event"] == "eval"] == [10, 20]
    assert [r["step"] for r in records if r["event"] == "train"] == [5, 10, 15, 20]
    assert all(isinstance(r["loss"], float) for r in records if r["event"] == "train")

    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert training["steps"] == 20
    assert [e["step"] for e in training["evaluations"]] == [10, 20]

    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == ["step-00000010", "step-00000020"]
    for name in steps:
        assert (out / "checkpoints" / name / "model.safetensors").is_file()
        assert (out / "checkpoints" / name / "state.pt").is_file()
    assert not list(out.rglob("*.tmp-*")), "no temporary files left behind"


def test_resume(run, tmp_path):
    """On a copy of the 20-step run, which the other tests then still see as it was."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    args = [str(out) if a == str(run["out"]) else a for a in run["args"]]
    err = ok(train(*args, "--max-steps", "30"))
    assert "resuming from step-00000020" in err
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert training["steps"] == 30
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [10, 20, 30]
    assert [r["step"] for r in records if r["event"] == "train"] == [5, 10, 15, 20, 25, 30]


def test_rerunning_a_finished_run_trains_no_further(run):
    out: Path = run["out"]
    steps = json.loads((out / "training.json").read_text(encoding="utf-8"))["steps"]
    ok(train(*run["args"], "--max-steps", str(steps)))
    assert json.loads((out / "training.json").read_text(encoding="utf-8"))["steps"] == steps


@pytest.mark.parametrize("limit", [("--max-epochs", "1"), ("--patience", "1", "--eval-every", "1", "--max-steps", "60")])
def test_rerunning_a_run_ended_by_its_epochs_or_patience_trains_no_further(tmp_path, data, limit):
    args = ["--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(tmp_path / "run"), *limit]
    ok(train(*args))
    first = json.loads((tmp_path / "run" / "training.json").read_text(encoding="utf-8"))
    assert first["stop_reason"] == ("1 epochs done" if limit[0] == "--max-epochs" else
                                    "no dev BLEU gain in 1 evaluations")
    ok(train(*args))
    again = json.loads((tmp_path / "run" / "training.json").read_text(encoding="utf-8"))
    assert (again["steps"], again["epochs"], again["stop_reason"]) == \
        (first["steps"], first["epochs"], first["stop_reason"])
    assert len(again["evaluations"]) == len(first["evaluations"])


def test_a_run_killed_in_a_mid_run_evaluation_evaluates_that_step_when_resumed(tmp_path, data):
    out = tmp_path / "run"
    args = ["--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(out), "--eval-every", "10",
            "--max-steps", "20"]
    ok(train(*args))
    # as if killed while evaluating step 10: its checkpoint saved, its evaluation's record not yet
    shutil.rmtree(out / "checkpoints" / "step-00000020")
    (out / "checkpoints" / "step-00000010" / "progress.json").unlink()
    err = ok(train(*args))
    assert "step 10 was saved but not evaluated: evaluating it now" in err
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert training["steps"] == 20 and [e["step"] for e in training["evaluations"]] == [10, 20]


def test_an_epoch_ending_on_an_evaluation_step_is_evaluated_once_and_a_resume_counts_its_time(tmp_path, data):
    one = tmp_path / "one"
    ok(train("--train", str(data["train"]), "--dev", "none", "--out", str(one), "--max-epochs", "1"))
    per_epoch = json.loads((one / "training.json").read_text(encoding="utf-8"))["steps"]
    out = tmp_path / "run"
    ok(train("--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(out), "--max-epochs", "1",
             "--eval-every", str(per_epoch)))
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert [e["step"] for e in training["evaluations"]] == [per_epoch]  # not twice
    # the checkpoint was saved before its evaluation; progress.json, written after it, counts it
    last = out / "checkpoints" / f"step-{per_epoch:08d}"
    before = json.loads(torch.load(last / "state.pt", weights_only=True)["progress"])["seconds"]
    after = json.loads((last / "progress.json").read_text())["seconds"]
    assert after > before and after == pytest.approx(training["seconds"], abs=1.0)
    # killed in that evaluation: the resume evaluates the step once, and the epoch's end saves it no more
    last.joinpath("progress.json").unlink()
    err = ok(train("--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(out), "--max-epochs", "1",
                   "--eval-every", str(per_epoch)))
    assert f"step {per_epoch} was saved but not evaluated: evaluating it now" in err
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert [e["step"] for e in training["evaluations"]] == [per_epoch]


def test_a_catch_up_evaluation_that_spends_the_time_budget_ends_the_run_at_its_step(tmp_path, data):
    """Killed while evaluating step 10 with 0.05 s of a 100-s budget left (planted): the evaluation
    done on resume spends it, and the run ends at step 10, not one step, save and evaluation later."""
    out = tmp_path / "run"
    args = ["--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(out), "--eval-every", "10"]
    ok(train(*args, "--max-steps", "10"))
    last = out / "checkpoints" / "step-00000010"
    (last / "progress.json").unlink()  # saved, not evaluated
    state = torch.load(last / "state.pt", weights_only=True)
    state["progress"] = json.dumps({**json.loads(state["progress"]), "seconds": 99.999})
    torch.save(state, last / "state.pt")
    err = ok(train(*args, "--max-time", "100"))
    assert "step 10 was saved but not evaluated: evaluating it now" in err
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert training["steps"] == 10 and [e["step"] for e in training["evaluations"]] == [10]
    assert training["stop_reason"] == "time budget of 100 s used" and training["seconds"] >= 100
    # the checkpoint knows the time the evaluation spent: the same command trains no further
    assert json.loads((last / "progress.json").read_text())["seconds"] >= 100
    ok(train(*args, "--max-time", "100"))
    assert json.loads((out / "training.json").read_text(encoding="utf-8"))["steps"] == 10


@pytest.mark.parametrize("kept, current", [("averaged", 0.5), ("current", 99.0)])
def test_an_extended_run_keeps_an_averaged_model_no_evaluation_beats(tmp_path, data, kept, current):
    """The average kept at the end scored above every checkpoint (planted here: 99): extended, the
    run must beat that score, not its best checkpoint's, to replace model.safetensors. Also when the
    record says "current": a re-run that averaged the same checkpoints again found its earlier
    average as the current model, scoring the same, and kept it as the current one."""
    out = tmp_path / "run"
    args = ["--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(out), "--eval-every", "4"]
    ok(train(*args, "--max-steps", "8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))["train"]
    (out / "averaging.json").write_text(json.dumps({"checkpoints": ["step-00000004", "step-00000008"], "kept": kept,
                                                    "scores": {"averaged": {"dev_bleu": 99.0},
                                                               "current": {"dev_bleu": current}},
                                                    "dev": config["dev"], "max_sentences": 0}))
    weights = (out / "model.safetensors").read_bytes()
    err = " ".join(ok(train(*args, "--max-steps", "16")).split())
    bar = "the model that averaging kept at the end of the last run (dev BLEU 99.00) is the one to beat"
    assert bar in err
    assert (out / "model.safetensors").read_bytes() == weights
    assert "(best so far, saved)" not in err
    # what training.json calls the best is still a checkpoint's score, at that checkpoint's step
    t = json.loads((out / "training.json").read_text(encoding="utf-8"))
    scores = {r["step"]: r["dev_bleu"] for r in t["evaluations"] if r.get("event") == "eval"}
    assert t["best_dev_bleu"] == max(scores.values()) == scores[t["best_step"]] < 99.0


def test_a_budget_added_to_a_resume_keeps_the_runs_preset(tmp_path, data):
    """A run of a fixed preset stopped by its epochs, resumed with --max-steps and no --preset (which
    alone would mean --preset auto, the recipe): it resumes with its preset, model and schedule."""
    out = tmp_path / "run"
    args = [a for a in TINY if a not in ("--preset", "tiny")]
    first = ["--train", str(data["train"]), "--dev", "none", "--out", str(out)]
    ok(run_nmt("train", *TINY, *first, "--max-epochs", "1"))
    before = json.loads((out / "config.json").read_text(encoding="utf-8"))
    steps = json.loads((out / "training.json").read_text(encoding="utf-8"))["steps"]
    err = ok(run_nmt("train", *args, *first, "--max-steps", str(steps + 2)))
    assert "a run of --preset tiny, resumed with it" in " ".join(err.split()) and "resuming from" in err
    after = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert after["train"]["preset"] == "tiny" and after["model"] == before["model"]
    assert after["train"]["lr"] == before["train"]["lr"] and not (out / "recipe.json").exists()
    assert json.loads((out / "training.json").read_text(encoding="utf-8"))["steps"] == steps + 2
    # and with no budget and no --preset (which alone would mean --preset small): still tiny's run
    err = " ".join(ok(run_nmt("train", *args, *first, "--max-epochs", "2")).split())
    assert "a run of --preset tiny, resumed with it" in err and "(the recipe" not in err
    training = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert training["epochs"] == 2 and training["steps"] > steps + 2


def test_resume_refused_when_a_model_option_changes(run):
    out: Path = run["out"]
    before = (out / "config.json").read_bytes()
    msg = error_line(train(*run["args"], "--max-steps", "40", "--dropout", "0.3"), 1)
    assert "dropout" in msg and str(out) in msg
    assert (out / "config.json").read_bytes() == before, "a refused run must not rewrite the config"


@pytest.mark.parametrize("flags, change", [
    (["--vocab-size", "500"], "tokenizer options changed (vocab_size: 400 → 500)"),
    (["--tokenizer", "unigram"], "tokenizer options changed (kind: bpe → unigram)"),
    (["--seed", "2"], "options that set the data order changed (seed: 1 → 2)"),
    (["--max-length", "100"], "options that set the data order changed (max_length: 250 → 100)"),
    (["--src", "en", "--tgt", "es"], "directions changed (es-en → en-es)"),
])
def test_resume_refused_when_the_tokenizer_the_data_order_or_the_directions_change(run, flags, change):
    out: Path = run["out"]
    before, caches = (out / "config.json").read_bytes(), sorted(p.name for p in (out / "cache").iterdir() if p.is_dir())
    msg = error_line(train(*run["args"], "--max-steps", "40", *flags), 1)
    assert msg == f"nmt: error: {out}: cannot resume, {change}; use a new --out"
    assert (out / "config.json").read_bytes() == before, "a refused run must not rewrite the config"
    assert sorted(p.name for p in (out / "cache").iterdir() if p.is_dir()) == caches, "nor build a cache first"


def test_resume_refused_when_the_tokenizer_files_were_replaced(run, tmp_path):
    """The same options, another tokenizer (two pieces' ids swapped): the model's ids would name other
    pieces, so the resume is refused before the cache is built."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    caches = sorted(p.name for p in (out / "cache").iterdir() if p.is_dir())
    args = [str(out) if a == str(run["out"]) else a for a in run["args"]]
    msg = without_paths(error_line(train(*args, "--max-steps", "40"), 1))
    assert msg == ("nmt: error: <path>: cannot resume, its tokenizer files are not the ones it was trained with "
                   "(replaced since: restore them, or use a new --out)")
    assert sorted(p.name for p in (out / "cache").iterdir() if p.is_dir()) == caches


def test_a_resume_takes_the_same_data_at_another_path(run, data, tmp_path):
    """The data moved and the cache gone (a job's scratch space): the same bytes are the same run."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    shutil.rmtree(out / "cache")
    moved = tmp_path / "moved" / "train"
    moved.parent.mkdir()
    for lang in ("es", "en"):
        shutil.copy(f"{data['train']}.{lang}", f"{moved}.{lang}")
    args = [str(moved) if a == str(data["train"]) else str(out) if a == str(run["out"]) else a for a in run["args"]]
    steps = json.loads((out / "training.json").read_text())["steps"]
    err = ok(train(*args, "--max-steps", str(steps + 5)))
    assert f"resuming from step-{steps:08d}" in err
    assert json.loads((out / "training.json").read_text())["steps"] == steps + 5


def test_resume_refused_when_the_data_changes(run, data):
    out: Path = run["out"]
    files = [Path(f"{data['train']}.{lang}") for lang in ("es", "en")]
    saved = [f.read_bytes() for f in files]
    try:
        for f, text in zip(files, ("una línea más\n", "one more line\n")):
            with open(f, "a", encoding="utf-8") as handle:
                handle.write(text)
        caches = sorted(p.name for p in (out / "cache").iterdir() if p.is_dir())
        msg = error_line(train(*run["args"], "--max-steps", "40"), 1)
        assert "cannot resume, training data changed" in without_paths(msg)
        assert str(files[0]) in msg and str(files[1]) in msg
        assert sorted(p.name for p in (out / "cache").iterdir() if p.is_dir()) == caches, "refused before a cache is built"
    finally:
        for f, b in zip(files, saved):
            f.write_bytes(b)
