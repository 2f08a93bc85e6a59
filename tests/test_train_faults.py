"""The failure paths of `nmt train` (issue 17): a run directory that is not the run's, dev-set
problems found at start and evaluation after the save, --update-freq beyond an epoch, signals and
a closed stderr, --max-length beyond the model's positions, torchrun variables and out-of-memory
under DDP. In-process where possible (one tiny prepared run shared by the module); the signal
cases run the CLI, since signals and pipes are what they test."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import ROOT, error_line, run_nmt, tiny_configs, write_slice
from nmt import checkpoint, validate
from nmt import config as cfg
from nmt import train as train_mod
from nmt.corpus import ParallelCorpus
from nmt.errors import Interrupted, NmtError, UsageError
from nmt.runtime import setup
from nmt.train import Distributed, Trainer, check_out_dir, prepare
from nmt.validate import check_dev


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults-data")
    return {"train": write_slice(base, "train", 100), "dev": write_slice(base, "dev", 5, split="dev")}


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):
    train_config, model_config, tok_config = tiny_configs(data["train"], data["dev"])
    p = prepare(train_config, model_config, tok_config, tmp_path_factory.mktemp("faults-run") / "run")
    return p, train_config


def trainer_in(prepared, out: Path, **fields) -> Trainer:
    p, train_config = prepared
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(replace(p, out=out), replace(train_config, **fields), setup("cpu", "float32", 1), Distributed("cpu"))


# -- 1. --out must be new, empty or this run's ----------------------------------------------------


def test_out_directory_new_empty_or_an_interrupted_preparation_is_accepted(tmp_path):
    assert check_out_dir(tmp_path / "new", False) is False
    assert check_out_dir(tmp_path, False) is False  # empty
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "cache").mkdir()
    (tmp_path / ".config.json.tmp-999999").write_text("")
    assert check_out_dir(tmp_path, False) is False  # what a run killed while preparing leaves


def test_one_trainer_per_run_directory_and_a_dead_ones_lock_is_no_obstacle(tmp_path):
    held = checkpoint.lock_run(tmp_path / "run")
    assert held is not None
    try:
        with pytest.raises(NmtError) as refused:
            checkpoint.lock_run(tmp_path / "run")  # a second open of the file: flock refuses it, even here
        assert str(refused.value) == (f"{tmp_path / 'run'}: another `nmt train` (pid {os.getpid()}) is writing this "
                                      f"run: wait for it to end, or use another --out")
    finally:
        os.close(held)
    again = checkpoint.lock_run(tmp_path / "run")  # the lock file stays; the lock went with the descriptor
    os.close(again)
    assert check_out_dir(tmp_path / "run", False) is False  # a run killed while preparing leaves the file


def test_train_on_a_run_directory_another_trainer_holds_stops_before_writing(data, tmp_path):
    out = tmp_path / "run"
    held = checkpoint.lock_run(out)  # as a running `nmt train` holds it
    try:
        r = run_nmt("train", "--preset", "tiny", "--train", str(data["train"]), "--src", "es", "--tgt", "en",
                    "--dev", "none", "--max-steps", "2", "--out", str(out))
    finally:
        os.close(held)
    msg = error_line(r, 1)
    assert msg.endswith(f"another `nmt train` (pid {os.getpid()}) is writing this run: wait for it to end, or use "
                        f"another --out")
    assert sorted(p.name for p in out.iterdir()) == [checkpoint.RUN_LOCK]  # nothing prepared, nothing written


def test_a_tokenizer_left_by_a_preparation_cut_short_is_reused_only_with_its_options(data, tmp_path):
    """Killed after the tokenizer, before config.json: the next run reuses it with the same options
    and refuses other ones, naming them; a tokenizer put there by hand (no record) is reused."""
    train_config, model_config, tok_config = tiny_configs(data["train"])
    out = tmp_path / "run"
    first = prepare(train_config, model_config, tok_config, out, build_cache=False).vocabs
    again = prepare(train_config, model_config, tok_config, out, build_cache=False).vocabs
    assert again.fingerprint() == first.fingerprint()
    other = cfg.apply(tok_config, {"vocab_size": 300}, "tok")
    with pytest.raises(NmtError, match=r"trained with vocab_size 400 \(this run: 300\); use a new --out, or delete"):
        prepare(train_config, model_config, other, out, build_cache=False)
    with pytest.raises(NmtError, match=r"trained with seed 1 \(this run: 7\)"):
        prepare(replace(train_config, seed=7), model_config, tok_config, out, build_cache=False)
    assert check_out_dir(out, False) is False  # the record is part of what a preparation leaves
    record = out / train_mod.TOKENIZER_OPTIONS_FILE
    options = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in options.items() if k != "lowercase"}))  # an older record
    prepare(train_config, model_config, replace(tok_config, lowercase=True), out, build_cache=False)
    for damaged, problem in (("{ not json", "cannot be read"), ("[]", "is not a JSON object")):
        record.write_text(damaged)
        with pytest.raises(NmtError, match=rf"tokenizer.options.json: {problem}.*delete it and the tokenizer files"):
            prepare(train_config, model_config, tok_config, out, build_cache=False)
    record.write_text(json.dumps({**options, "tokenizer_sha256": "0" * 64}))  # a record of another tokenizer
    prepare(train_config, model_config, other, out, build_cache=False)
    record.unlink()  # a tokenizer put there by hand
    assert prepare(train_config, model_config, other, out, build_cache=False).vocabs.fingerprint() == first.fingerprint()
    record.write_text(json.dumps(options))
    (out / "config.json").write_text("{}")  # a run stopped before its first checkpoint (or --force): checked
    with pytest.raises(NmtError, match=r"trained with vocab_size 400 \(this run: 300\)"):
        prepare(train_config, model_config, other, out, build_cache=False)
    step = out / "checkpoints" / "step-00000002"  # with checkpoints, the resume check compares the run's config
    step.mkdir(parents=True)
    for name in ("state.pt", checkpoint.WEIGHTS):
        (step / name).write_bytes(b"")
    prepare(train_config, model_config, other, out, build_cache=False)


def test_a_tokenizer_left_for_other_training_data_is_not_reused(tmp_path):
    """A preparation cut short, then the command again with --train corrected: a new tokenizer is
    needed, and the error says so (the same data at another path is the same data)."""
    first, other = write_slice(tmp_path / "a", "train", 100), write_slice(tmp_path / "b", "train", 100, start=300)
    out = tmp_path / "run"
    prepare(*tiny_configs(first), out, build_cache=False)
    with pytest.raises(NmtError, match=r"run: its tokenizer was trained with other training data; use a new --out"):
        prepare(*tiny_configs(other), out, build_cache=False)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "a", moved)
    prepare(*tiny_configs(moved / "train"), out, build_cache=False)


def test_checkpoints_without_their_tokenizer_are_refused_not_given_a_new_one(data, tmp_path):
    train_config, model_config, tok_config = tiny_configs(data["train"])
    out = tmp_path / "run"
    prepare(train_config, model_config, tok_config, out, build_cache=False)
    step = out / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    for name in ("state.pt", checkpoint.WEIGHTS):
        (step / name).write_bytes(b"")
    (out / "tokenizer.json").unlink()
    with pytest.raises(NmtError, match=r"run: has checkpoints but not the tokenizer they were trained with \(restore "
                                       r"tokenizer.json or tokenizer.src.json and tokenizer.tgt.json"):
        prepare(train_config, model_config, tok_config, out, build_cache=False)
    assert not (out / "tokenizer.json").exists()


def test_a_resume_whose_process_count_is_not_recorded_goes_on_with_a_warning(data, prepared, tmp_path, caplog):
    """A run from before config.json kept `processes`, with no training.json (or one without
    world_size) to tell: resumed with a warning; one that tells another count is refused."""
    p, train_config = prepared
    *_, tok_config = tiny_configs(data["train"], data["dev"])
    described = train_mod.run_config(p, train_config, tok_config, 1)
    checkpoint.write_config(tmp_path, {k: v for k, v in described.items() if k != "processes"})
    for summary in (None, {"steps": 3}):
        if summary is not None:
            (tmp_path / "training.json").write_text(json.dumps(summary))
        caplog.clear()
        train_mod.check_resumable(tmp_path, described, has_checkpoints=True)
        assert "cannot tell how many processes trained it: resuming with 1" in caplog.text
    (tmp_path / "training.json").write_text(json.dumps({"world_size": 2}))
    with pytest.raises(NmtError, match="it was trained by 2 processes and this command runs 1"):
        train_mod.check_resumable(tmp_path, described, has_checkpoints=True)


def test_out_directory_with_other_files_needs_force(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NmtError, match=r"not an nmt run .*notes\.txt.*--force") as e:
        check_out_dir(tmp_path, False)
    assert str(tmp_path) in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NmtError, match=r"^\.: .*--force"):
        check_out_dir(Path("."), False)
    assert check_out_dir(tmp_path, True) is False


def test_out_directory_with_a_foreign_config_json_needs_force(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MarianMTModel"]}))  # a Hugging Face folder
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NmtError, match=r"not an nmt run's.*--force"):
        check_out_dir(tmp_path, False)
    assert check_out_dir(tmp_path, True) is False


def test_a_finished_model_without_checkpoints_is_not_replaced_by_another_run(data, tmp_path):
    """A model whose checkpoints are gone cannot be resumed: training again, with its configuration
    or another, would start from step 0 and replace it, so it is refused unless --force."""
    train_config, model_config, tok_config = tiny_configs(data["train"], max_steps=2)
    first = tmp_path / "first"
    train_mod.train(train_config, model_config, tok_config, first)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy, ignore=shutil.ignore_patterns("checkpoints"))
    weights, summary = (copy / "model.safetensors").read_bytes(), (copy / "training.json").read_bytes()
    for model in (model_config, replace(model_config, dropout=0.3)):
        with pytest.raises(NmtError, match=r"holds a trained model but no checkpoints to resume its training from: "
                                           r"training again from step 0 would replace it \(use a new --out, or "
                                           r"--force to train a new model there\)") as e:
            train_mod.train(train_config, model, tok_config, copy)
        assert str(e.value).startswith(f"{copy}: ")
        assert (copy / "model.safetensors").read_bytes() == weights
        assert (copy / "training.json").read_bytes() == summary
    # --force replaces it
    old_metrics = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    train_mod.train(train_config, replace(model_config, dropout=0.3), tok_config, copy, force=True)
    assert json.loads((copy / "config.json").read_text())["model"]["dropout"] == 0.3
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert old_metrics and steps == old_metrics  # the new run's records alone, not appended to the old ones'
    # a run cut short in its first checkpoint (the model written, no checkpoint, no training.json)
    # is not a finished model: the same command starts it again
    cut = tmp_path / "cut"
    shutil.copytree(first, cut, ignore=shutil.ignore_patterns("checkpoints", "training.json"))
    train_mod.train(train_config, model_config, tok_config, cut)
    assert json.loads((cut / "training.json").read_text())["steps"] == 2


def test_a_force_that_is_cut_short_leaves_no_old_weights_beside_its_new_options(data, tmp_path, monkeypatch):
    """--force over a finished model without checkpoints: if the new run stops before writing a
    model, the directory must not pair the new config.json with the old run's weights and summary."""
    train_config, model_config, tok_config = tiny_configs(data["train"], max_steps=2)
    run = tmp_path / "run"
    train_mod.train(train_config, model_config, tok_config, run)
    shutil.rmtree(run / "checkpoints")
    assert {"model.safetensors", "training.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}

    def cut(self):
        raise RuntimeError("power cut")

    monkeypatch.setattr(train_mod.Trainer, "run", cut)
    with pytest.raises(RuntimeError, match="power cut"):
        train_mod.train(train_config, replace(model_config, dropout=0.3), tok_config, run, force=True)
    assert json.loads((run / "config.json").read_text())["model"]["dropout"] == 0.3
    left = {p.name for p in run.iterdir()}
    assert not left & {"model.safetensors", "training.json", "metrics.jsonl", "averaging.json", "test.hyp"}
    monkeypatch.undo()  # the same command again, without --force, trains the new configuration from step 0
    train_mod.train(train_config, replace(model_config, dropout=0.3), tok_config, run)
    assert json.loads((run / "training.json").read_text())["steps"] == 2


# -- 2. the dev set is checked whole at start; evaluation comes after the save --------------------


def dev_with(tmp_path, src_lines: list[bytes], tgt_lines: list[bytes]) -> ParallelCorpus:
    (tmp_path / "dev.es").write_bytes(b"".join(x + b"\n" for x in src_lines))
    (tmp_path / "dev.en").write_bytes(b"".join(x + b"\n" for x in tgt_lines))
    return ParallelCorpus.from_prefix(tmp_path / "dev", "es", "en")


def test_dev_set_with_an_empty_reference_line(tmp_path):
    with pytest.raises(NmtError, match=r"dev\.en: line 2 is empty"):
        check_dev(dev_with(tmp_path, [b"uno", b"dos", b"tres"], [b"one", b"", b"three"]))


def test_dev_set_empty(tmp_path):
    (tmp_path / "dev.es").write_bytes(b"")
    (tmp_path / "dev.en").write_bytes(b"")
    with pytest.raises(NmtError, match="dev set is empty"):
        check_dev(ParallelCorpus.from_prefix(tmp_path / "dev", "es", "en"))


def test_dev_set_with_invalid_utf8_fails_before_the_tokenizer_is_trained(data, tmp_path):
    lines = [f"línea {i}".encode() for i in range(30)]
    lines[20] = b"ma\xf1ana"
    dev = dev_with(tmp_path, lines, [f"line {i}".encode() for i in range(30)])
    train_config, model_config, tok_config = tiny_configs(data["train"], tmp_path / "dev")
    with pytest.raises(NmtError, match=r"dev\.es.*line 21.*UTF-8"):
        prepare(train_config, model_config, tok_config, tmp_path / "run")
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    assert dev.src_path.exists()


class _Clock:
    """`time` as nmt.train sees it, with a monotonic clock that moves only when a test says: steps
    take no time on it, so a budget is spent exactly where the test spends it, however loaded the
    machine."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _evaluation_fails(*args, **kwargs):
    raise RuntimeError("evaluation failed")


def test_an_evaluation_that_fails_loses_no_steps(prepared, tmp_path, monkeypatch):
    trainer = trainer_in(prepared, tmp_path / "run")
    trainer.progress.step = 7
    monkeypatch.setattr(validate, "evaluate_dev", _evaluation_fails)
    with pytest.raises(RuntimeError):
        trainer.evaluate_and_save()
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000007"]


def test_the_evaluation_after_the_save_is_kept_for_the_resume(prepared, tmp_path, monkeypatch):
    trainer = trainer_in(prepared, tmp_path / "run")
    trainer.progress.step = 5
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (12.5, "sig", 3.0))
    trainer.evaluate_and_save()
    again = trainer_in(prepared, tmp_path / "run")
    assert again.resume()
    assert again.progress.step == 5 and again.progress.best_bleu == 12.5
    assert [r["step"] for r in again.progress.history] == [5]


def test_a_run_killed_in_its_final_evaluation_evaluates_on_the_rerun(prepared, tmp_path, monkeypatch):
    trainer = trainer_in(prepared, tmp_path / "run", max_steps=5)
    trainer.progress.step = 5
    monkeypatch.setattr(validate, "evaluate_dev", _evaluation_fails)  # killed during the evaluation
    with pytest.raises(RuntimeError):
        trainer.evaluate_and_save()
    assert not (tmp_path / "run" / checkpoint.WEIGHTS).exists()
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (7.5, "sig", 3.0))
    again = trainer_in(prepared, tmp_path / "run", max_steps=5)
    assert again.resume()
    again.run()  # the budget is spent: no training, but the missing evaluation
    assert again.progress.step == 5 and again.progress.best_bleu == 7.5
    assert (tmp_path / "run" / checkpoint.WEIGHTS).exists()
    third = trainer_in(prepared, tmp_path / "run", max_steps=5)
    assert third.resume() and [r["step"] for r in third.progress.history] == [5]  # kept, not redone


def test_an_evaluation_that_spends_the_time_budget_ends_the_run_at_the_step_it_scored(prepared, tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(train_mod, "time", clock)

    def slow(*args, **kwargs):  # the budget's last seconds go by in this evaluation
        clock.now += 2.5
        return 6.0, "sig", 3.0

    monkeypatch.setattr(validate, "evaluate_dev", slow)
    trainer = trainer_in(prepared, tmp_path / "run", max_time=2.0, eval_every=2)
    trainer.run()
    assert trainer.stop_reason == "time budget of 2 s used"
    assert trainer.progress.step == 2  # not a third step saved and scored again
    assert [r["step"] for r in trainer.progress.history if r.get("event") == "eval"] == [2]
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    again = trainer_in(prepared, tmp_path / "run", max_time=2.0, eval_every=2)
    assert again.resume()
    again.run()  # a finished run re-run with its budget trains and scores no further
    assert again.progress.step == 2 and [r["step"] for r in again.progress.history] == [2]


def test_a_signal_during_an_evaluation_ends_the_run_at_the_step_it_scored(prepared, tmp_path, monkeypatch):
    """No time budget: a SIGTERM that comes while step 2 is evaluated (the handler only sets the flag)
    ends the run there, not after one more step with its own save, within a grace period."""
    trainer = trainer_in(prepared, tmp_path / "run", max_steps=10, eval_every=2)

    def signalled(*args, **kwargs):
        trainer._signal, trainer._signum = "SIGTERM", signal.SIGTERM
        return 6.0, "sig", 3.0

    monkeypatch.setattr(validate, "evaluate_dev", signalled)
    trainer.run()
    assert trainer.stop_reason == "stopped by SIGTERM" and trainer.progress.step == 2
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000002"]


def test_a_checkpoint_better_than_the_best_but_not_than_the_kept_average_is_not_the_model(prepared, tmp_path, monkeypatch):
    """An extended run whose averaged model (dev BLEU 50, kept in place of its best checkpoint) is the
    bar: checkpoints scoring 10 and 20 become the best checkpoint (its score and step, as training.json
    says) but not the model, and count against the patience; one scoring 60 becomes the model."""
    trainer = trainer_in(prepared, tmp_path / "run", max_steps=10, eval_every=2)
    trainer._to_beat = 50.0
    scores = iter([10.0, 20.0, 60.0])
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (next(scores), "sig", 3.0))
    weights = tmp_path / "run" / checkpoint.WEIGHTS
    pr = trainer.progress
    for step in (2, 4):
        pr.step = step
        trainer.evaluate_and_save()
    assert (pr.best_bleu, pr.best_step, pr.evals_without_gain) == (20.0, 4, 2) and not weights.exists()
    pr.step = 6
    trainer.evaluate_and_save()
    assert (pr.best_bleu, pr.best_step, pr.evals_without_gain) == (60.0, 6, 0) and weights.exists()


def test_the_model_is_the_best_scoring_checkpoint_and_the_patience_counts_evaluations_without_gain(
        prepared, tmp_path, monkeypatch):
    """Dev BLEU 10, 30, 20 at steps 2, 4, 6: model.safetensors holds step 4's weights (read back
    from its checkpoint), training.json says so, and one evaluation went without a gain."""
    from safetensors.torch import load_file

    trainer = trainer_in(prepared, tmp_path / "run", max_steps=6, eval_every=2, keep_last=5, average_last=0)
    scores = iter([10.0, 30.0, 20.0])
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (next(scores), "sig", 3.0))
    trainer.run()
    pr = trainer.progress
    assert (pr.step, pr.best_bleu, pr.best_step, pr.evals_without_gain) == (6, 30.0, 4, 1)
    saved = [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")]
    assert saved == ["step-00000002", "step-00000004", "step-00000006"]
    model = load_file(str(tmp_path / "run" / checkpoint.WEIGHTS))
    for step, same in (("step-00000004", True), ("step-00000006", False), ("step-00000002", False)):
        other = load_file(str(tmp_path / "run" / "checkpoints" / step / checkpoint.WEIGHTS))
        assert set(other) == set(model)
        assert all(torch.equal(model[k], other[k]) for k in model) is same, step


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_a_loss_that_is_not_a_number_ends_the_run_before_its_step_and_saves_nothing_broken(prepared, tmp_path,
                                                                                         monkeypatch, clip_norm):
    """A step whose loss is NaN (here: a batch's loss made NaN at step 3) is not taken: the run ends
    with a one-line error naming the step, the weights and the step-2 checkpoint stay finite, and no
    NaN model is saved as the best one (before, "dev loss nan (best so far, saved)" and exit 0)."""
    from safetensors.torch import load_file

    trainer = trainer_in(prepared, tmp_path / "run", max_steps=6, eval_every=2, clip_norm=clip_norm)
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (5.0, "sig", 3.0))
    forward_backward = Trainer._forward_backward

    def poisoned(self, batch, n_tokens, sync, model=None):
        loss = forward_backward(self, batch, n_tokens, sync, model)
        return float("nan") if self.progress.step == 2 else loss

    monkeypatch.setattr(Trainer, "_forward_backward", poisoned)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NmtError) as e:
        trainer.run()
    head, norm, tail = re.fullmatch(r"(.* gradient norm )(\S+)( .*)", str(e.value)).groups()
    assert head == "training diverged at step 3: the loss is nan and the gradient norm "
    assert tail == (f" (learning rate {trainer.learning_rate(3):.3g}); its last checkpoint, step-00000002, is kept: run "
                    f"the same command again with a lower --lr (now {trainer.config.lr:g}) or a longer --warmup (now "
                    f"{trainer.config.warmup_steps})")
    assert float(norm) >= 0  # the gradients of the NaN loss's batch itself are finite here
    assert trainer.progress.step == 2
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # steps 1-2 were taken
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / checkpoint.WEIGHTS))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000002"]


def test_a_gradient_that_is_not_finite_is_not_applied(prepared, tmp_path, monkeypatch):
    """The loss can be finite while a gradient overflows: the step is refused all the same."""
    trainer = trainer_in(prepared, tmp_path / "run", max_steps=3, eval_every=100)
    forward_backward = Trainer._forward_backward

    def overflowing(self, batch, n_tokens, sync, model=None):
        loss = forward_backward(self, batch, n_tokens, sync, model)
        next(self.model.parameters()).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(Trainer, "_forward_backward", overflowing)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NmtError, match=r"^training diverged at step 1: the loss is [0-9.]+ and the gradient norm inf "
                                       r".*no checkpoint was saved: run the same command again with a lower --lr"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("text, problem", [
    (b"{", "cannot be read (JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (b"[]", "not a JSON object"),
    (b'{"step": "x", "epoch": 0}', 'step must be int, not "x"'),
    (b'{"step": -5}', "step = -5 is negative"),
    (b'{"step": 1e400}', "step must be int, not Infinity"),
    (b'{"step": 2}', "step 2 is not this checkpoint's"),
    (b'{"step": 4, "history": [3]}', "history holds a record that is not an object"),
    (b'{"step": 4, "lr": 3}', "unknown field(s) ['lr']"),
])
def test_a_damaged_checkpoint_progress_is_a_one_line_error_on_resume(prepared, tmp_path, monkeypatch, text, problem):
    """Before: internal errors (a JSONDecodeError, a TypeError), or a run that went on from a step of
    the file's choosing (-5: a new step-00000000 checkpoint, 'best dev BLEU 0.00 at step 0')."""
    trainer = trainer_in(prepared, tmp_path / "run", max_steps=4, eval_every=2)
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (5.0, "sig", 3.0))
    trainer.run()
    saved = tmp_path / "run" / "checkpoints" / "step-00000004"
    (saved / "progress.json").write_bytes(text)
    with pytest.raises(NmtError) as e:
        trainer_in(prepared, tmp_path / "run", max_steps=6, eval_every=2).resume()
    assert str(e.value) == (f"{saved / 'progress.json'}: {problem}; move step-00000004 out of {saved.parent} to resume "
                            f"from the checkpoint before it")
    shutil.move(saved, tmp_path / "aside")  # as the message says: the run resumes from step 2
    again = trainer_in(prepared, tmp_path / "run", max_steps=6, eval_every=2)
    assert again.resume() and again.progress.step == 2
    # the only checkpoint damaged: no advice to move it aside (that would start the run again)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "progress.json").write_bytes(b"[]")
    with pytest.raises(NmtError, match=r"; it is the run's only checkpoint, so the run cannot be resumed: train into "
                                       r"a new --out \(its model\.safetensors, if any, is the best model so far\)$"):
        trainer_in(prepared, tmp_path / "run", max_steps=6, eval_every=2).resume()


@pytest.mark.parametrize("content", [b"", b"not a pickle"])
def test_a_damaged_resume_state_is_a_one_line_error(prepared, tmp_path, monkeypatch, content):
    trainer = trainer_in(prepared, tmp_path / "run", max_steps=2, eval_every=2)
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (5.0, "sig", 3.0))
    trainer.run()
    state = tmp_path / "run" / "checkpoints" / "step-00000002" / "state.pt"
    state.write_bytes(content)
    with pytest.raises(NmtError, match=rf"^{re.escape(str(state))}: cannot load resume state \(\S.*\)$"):
        trainer_in(prepared, tmp_path / "run", max_steps=4, eval_every=2).resume()


def test_a_run_resumed_with_fewer_steps_than_it_has_says_so_and_trains_none(prepared, tmp_path, monkeypatch):
    """It said "2 steps done" beside steps: 4 in training.json."""
    monkeypatch.setattr(validate, "evaluate_dev", lambda *a, **k: (5.0, "sig", 3.0))
    first = trainer_in(prepared, tmp_path / "run", max_steps=4, eval_every=2)
    first.run()
    assert first.stop_reason == "4 steps done"
    again = trainer_in(prepared, tmp_path / "run", max_steps=2, eval_every=2)
    assert again.resume()
    again.run()
    assert again.stop_reason == "already at step 4, past --max-steps 2" and again.progress.step == 4


def test_a_model_too_large_for_the_memory_is_a_one_line_error(prepared, tmp_path, monkeypatch):
    """The option limits allow d_model 65,536 and 1,024 layers; the allocator's refusal was an internal
    error. (Stood in for here: really allocating it could wake the kernel's OOM killer instead.)"""
    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train_mod, "Transformer", refuse)
    c = prepared[0].model_config
    with pytest.raises(NmtError) as e:
        trainer_in(prepared, tmp_path / "run")
    assert str(e.value) == (f"the model (d_model {c.d_model}, d_ff {c.d_ff}, {c.encoder_layers}+{c.decoder_layers} "
                            f"layers, vocabulary {c.src_vocab_size:,}) does not fit in the memory of cpu: choose a "
                            f"smaller one (--preset, or --config model)")

    def other(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(train_mod, "Transformer", other)
    with pytest.raises(RuntimeError, match="^some other failure$"):  # not taken for a lack of memory
        trainer_in(prepared, tmp_path / "run")


def test_a_signal_during_the_catch_up_evaluation_of_a_resume_ends_the_run_at_that_step(prepared, tmp_path, monkeypatch):
    """A resume first evaluates the step its run saved but did not score; a SIGTERM that comes then
    is nmt's to handle, as in the loop: the evaluation ends, kept, and the run stops at that step
    (the handler of before the run, here one that only counts, is not called and is put back)."""
    first = trainer_in(prepared, tmp_path / "run", max_steps=10, eval_every=2)
    first.progress.step = 2
    monkeypatch.setattr(validate, "evaluate_dev", _evaluation_fails)  # killed during step 2's evaluation
    with pytest.raises(RuntimeError):
        first.evaluate_and_save()

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return 6.0, "sig", 3.0

    monkeypatch.setattr(validate, "evaluate_dev", signalled)
    seen: list[int] = []
    counting = lambda signum, frame: seen.append(signum)  # noqa: E731
    before = signal.signal(signal.SIGTERM, counting)
    try:
        again = trainer_in(prepared, tmp_path / "run", max_steps=10, eval_every=2)
        assert again.resume()
        again.run()
        assert signal.getsignal(signal.SIGTERM) is counting
    finally:
        signal.signal(signal.SIGTERM, before)
    assert seen == []
    assert again.stop_reason == "stopped by SIGTERM" and again.progress.step == 2
    assert [r["step"] for r in again.progress.history if r.get("event") == "eval"] == [2]
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    third = trainer_in(prepared, tmp_path / "run", max_steps=10, eval_every=2)
    assert third.resume() and [r["step"] for r in third.progress.history] == [2]  # kept for the next resume


def test_a_save_that_spends_the_time_budget_ends_the_run_and_its_checkpoint_knows(prepared, tmp_path, monkeypatch):
    save = checkpoint.save_checkpoint

    clock = _Clock()
    monkeypatch.setattr(train_mod, "time", clock)

    def slow(*args, **kwargs):  # no dev set: the save itself spends the budget, after the step's time was taken
        clock.now += 2.5
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow)
    p, train_config = prepared
    no_dev = (replace(p, dev=None, devs=[]), train_config)
    trainer = trainer_in(no_dev, tmp_path / "run", max_time=2.0, eval_every=2)
    trainer.run()
    assert trainer.stop_reason == "time budget of 2 s used" and trainer.progress.step == 2
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    again = trainer_in(no_dev, tmp_path / "run", max_time=2.0, eval_every=2)
    assert again.resume() and again.progress.seconds >= 2.0
    again.run()  # the checkpoint holds the time its save spent: nothing more to train
    assert again.progress.step == 2
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000002"]


# -- 3. --update-freq beyond the batches of an epoch ----------------------------------------------


def test_update_freq_larger_than_an_epoch_is_an_error_not_a_hang(prepared, tmp_path):
    def hung(signum, frame):
        raise TimeoutError("the training loop hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        trainer = trainer_in(prepared, tmp_path / "run", update_freq=10_000, max_steps=3)
        with pytest.raises(UsageError, match=r"--update-freq 10000 exceeds the \d+ batches"):
            trainer.run()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_batches_update_freq_leaves_out_of_each_epoch_are_said(prepared, tmp_path, caplog):
    p, train_config = prepared
    n = len(p.cache.plan(512, train_config.seed, 0, 0, 1, 0.0))
    k = next(k for k in range(2, n + 1) if n % k)  # a group size that does not divide the epoch
    trainer = trainer_in(prepared, tmp_path / "run", update_freq=k, max_steps=1, eval_every=1000)
    with caplog.at_level(logging.INFO, logger="nmt.train"):
        trainer.run()
    assert f"--update-freq {k}: each epoch's last {n % k} of its {n} batches are left out" in caplog.text


# -- 4. signals: SIGHUP like SIGTERM, a closed stderr, exit 128 + N --------------------------------


def test_a_signal_ignored_at_start_stays_ignored(prepared, tmp_path):
    """`nohup nmt train …` ignores SIGHUP: the run must not start handling it."""
    trainer = trainer_in(prepared, tmp_path / "run")
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with train_mod._StopOnSignal(trainer):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_interrupted_exits_128_plus_the_signal():
    assert Interrupted("stopped", signal.SIGTERM).exit_code == 143


def _where_it_waits(pid: int) -> str:
    """Each thread's kernel wait channel and syscall, and what fd 2 is, for a process that hangs."""
    parts = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            parts.append(f"{task.name}: {(task / 'wchan').read_text()} {(task / 'syscall').read_text().split()[:1]}")
        except OSError as e:
            parts.append(f"{task.name}: {e}")
    try:
        parts.append(f"fd 2 -> {os.readlink(f'/proc/{pid}/fd/2')}")
    except OSError:
        pass
    return "; ".join(parts)


def test_sighup_after_the_log_reader_went_away_still_saves(data, tmp_path):
    """`nmt train 2>&1 | tee log`, then the terminal closes: tee is gone (stderr is a broken
    pipe) and SIGHUP arrives. The run saves its checkpoint and exits 128 + 1."""
    out = tmp_path / "hup"
    args = ["--preset", "tiny", "--src", "es", "--tgt", "en", "--dev", str(data["dev"]), "--dtype", "float32",
            "--batch-tokens", "1000", "--eval-every", "100000", "--log-every", "1", "--vocab-size", "500",
            "--threads", "1", "--train", str(data["train"]), "--out", str(out), "--max-steps", "1000000"]
    # started from a terminal: SIGHUP at its default even when the tests run under nohup, which
    # ignores it (the run then rightly keeps it ignored and never stops: how this test used to hang)
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "train", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        start = time.monotonic()
        while not (out / "metrics.jsonl").exists() and time.monotonic() - start < 120 and proc.poll() is None:
            time.sleep(0.1)
        proc.stderr.close()  # tee went away
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit 120 s after SIGHUP: {_where_it_waits(proc.pid)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGHUP
    summary = json.loads((out / "training.json").read_text())
    assert summary["stop_reason"] == "stopped by SIGHUP"
    assert summary["evaluations"] == [], "no dev evaluation in the grace period"
    assert (out / "checkpoints" / f"step-{summary['steps']:08d}" / "state.pt").exists()


# -- 5. --max-length beyond the model's positions ---------------------------------------------------


def test_max_length_above_the_model_positions_is_a_usage_error_at_start(data, tmp_path):
    train_config, model_config, tok_config = tiny_configs(data["train"], max_length=5000)
    with pytest.raises(UsageError, match=r"--max-length 5000 .*max_positions 1024"):
        train_mod.train(train_config, model_config, tok_config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    short = replace(model_config, max_positions=64)
    with pytest.raises(UsageError, match=r"--max-length 250 .*max_positions 64"):
        train_mod.train(replace(train_config, max_length=250), short, tok_config, tmp_path / "run")


# -- 6. torchrun ------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, words", [
    ({"RANK": "1"}, "without WORLD_SIZE"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
])
def test_stray_or_inconsistent_torchrun_variables(env, words):
    with pytest.raises(NmtError, match=words):
        train_mod._ranks(env)


def test_torchrun_variables_read():
    assert train_mod._ranks({}) == (1, 0, 0)
    assert train_mod._ranks({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (4, 3, 1)


def test_the_process_group_waits_hours_for_rank_0(monkeypatch):
    import torch.distributed as dist

    assert train_mod.dist_timeout({}).total_seconds() >= 3600
    assert train_mod.dist_timeout({"NMT_DIST_TIMEOUT": "90"}).total_seconds() == 90
    with pytest.raises(NmtError, match="NMT_DIST_TIMEOUT"):
        train_mod.dist_timeout({"NMT_DIST_TIMEOUT": "soon"})
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("NMT_DIST_TIMEOUT", "7200")
    Distributed("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 7200


def test_out_of_memory_under_ddp_is_an_error_not_a_lone_retry(prepared, tmp_path):
    """A retry on one rank would pair its collectives with the other ranks' wrongly."""
    from nmt.batching import plan_epoch

    trainer = trainer_in(prepared, tmp_path / "run")
    p = prepared[0]
    batch = plan_epoch(p.cache.src_len, p.cache.tgt_len, 1000, 1, 0)[0]

    class TwoRanks(Distributed):
        def __init__(self):
            self.world_size, self.rank, self.local_rank, self.is_writer, self.backend = 2, 1, 1, False, "gloo"

        def _all_reduce(self, value, op):
            return value

    trainer.dist = TwoRanks()

    def forward(*args):
        raise torch.OutOfMemoryError("simulated")

    trainer.model.forward = forward
    with pytest.raises(NmtError, match=r"out of memory at step 1 on rank 1.*lower --batch-tokens"):
        trainer.train_step([batch])
