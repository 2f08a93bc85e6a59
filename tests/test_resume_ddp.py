"""Training survives interruption exactly, and two processes (torchrun, gloo) train like one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, error_line, run_nmt, tiny_configs, without_paths, write_slice

COMMON = ["--preset", "tiny", "--src", "es", "--tgt", "en", "--dev", "none", "--dtype", "float32",
          "--batch-tokens", "1000", "--eval-every", "1000", "--log-every", "1", "--vocab-size", "500",
          "--threads", "1"]


def weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def train_losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x)["event"] == "train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_slice(tmp_path_factory.mktemp("resume"), "train", 100)


def test_n_steps_then_resume_then_n_steps_equals_2n_steps(data, tmp_path):
    """With dropout on (so the RNG state matters) and across an epoch boundary."""
    opts = [*COMMON, "--train", str(data), "--dropout", "0.1", "--keep-last", "5"]
    one_go = tmp_path / "one"
    r = run_nmt("train", *opts, "--out", str(one_go), "--max-steps", "24")
    assert r.returncode == 0, r.stderr.decode()
    split = tmp_path / "split"
    r = run_nmt("train", *opts, "--out", str(split), "--max-steps", "12")
    assert r.returncode == 0, r.stderr.decode()
    r = run_nmt("train", *opts, "--out", str(split), "--max-steps", "24")
    assert r.returncode == 0, r.stderr.decode()
    assert "resuming from step-00000012" in r.stderr.decode()
    epochs = json.loads((one_go / "training.json").read_text())["epochs"]
    assert epochs >= 1, "the test should cross an epoch boundary"
    a, b = weights(one_go, 24), weights(split, 24)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert train_losses(one_go)[12:] == train_losses(split)[12:]


def test_a_killed_run_resumes_from_its_last_checkpoint(data, tmp_path):
    """kill -9 mid-run: the newest complete checkpoint is intact and resuming continues from it."""
    out = tmp_path / "killed"
    opts = [*COMMON, "--train", str(data), "--out", str(out), "--eval-every", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "train", *opts, "--max-steps", "100000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = 120
        import time

        start = time.monotonic()
        while time.monotonic() - start < deadline:
            ckpts = list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
            if len(ckpts) >= 2:
                break
            time.sleep(0.2)
        proc.kill()
    finally:
        proc.wait()
    done = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert done, "no checkpoint was written before the kill"
    last = int(done[-1].split("-")[1])
    r = run_nmt("train", *opts, "--max-steps", str(last + 3))
    assert r.returncode == 0, r.stderr.decode()
    assert f"resuming from step-{last:08d}" in r.stderr.decode()
    assert json.loads((out / "training.json").read_text())["steps"] == last + 3


def test_sigterm_saves_a_checkpoint_without_evaluating_and_exits_143(data, tmp_path):
    """Container grace periods are 10-30 s: save, no dev evaluation or averaging; exit 128 + 15 so a
    scheduler tells an interrupted run from a finished one."""
    import signal
    import time

    out = tmp_path / "term"
    dev = write_slice(tmp_path / "dev", "dev", 5, split="dev")
    opts = [*COMMON, "--dev", str(dev), "--average-last", "2", "--keep-last", "3"]  # the later --dev wins
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "train", *opts, "--train", str(data), "--out", str(out),
                             "--max-steps", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.monotonic()
    while not (out / "metrics.jsonl").exists() and time.monotonic() - start < 120:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "Traceback" not in err.decode()
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("nmt: error: stopped by SIGTERM") and "resume" in last
    summary = json.loads((out / "training.json").read_text())
    assert summary["stop_reason"] == "stopped by SIGTERM"
    assert summary["evaluations"] == []
    assert (out / "checkpoints" / f"step-{summary['steps']:08d}" / "state.pt").exists()
    assert "averag" not in err.decode().lower()


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_loss_curve(data, tmp_path):
    """2 ranks × 1 batch per step = 1 process × 2 batches per step (--update-freq 2): the same
    batches make each step, so losses and weights agree up to float summation order."""
    steps = "8"
    single = tmp_path / "single"
    r = run_nmt("train", *COMMON, "--train", str(data), "--out", str(single), "--max-steps", steps, "--update-freq", "2")
    assert r.returncode == 0, r.stderr.decode()
    # the tokenizer is shared so both runs see identical ids
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    shutil.copy(single / "tokenizer.json", ddp / "tokenizer.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                        "-m", "nmt", "train", *COMMON, "--train", str(data), "--out", str(ddp), "--max-steps", steps],
                       cwd=ROOT, capture_output=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    a, b = train_losses(single), train_losses(ddp)
    assert len(a) == len(b) == int(steps)
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    wa, wb = weights(single, 8), weights(ddp, 8)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-4)
    # one process cannot continue the two ranks' epoch (each rank's batch index is into its share);
    # for a run from before config.json kept the number, training.json's tells
    config = ddp / "config.json"
    assert json.loads(config.read_text())["processes"] == 2
    for older in (False, True):
        if older:
            config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "processes"}))
        before = config.read_bytes()
        r = run_nmt("train", *COMMON, "--train", str(data), "--out", str(ddp), "--max-steps", "10")
        msg = without_paths(error_line(r, 1, only_line=False))
        assert "cannot resume, it was trained by 2 processes and this command runs 1" in msg
        assert config.read_bytes() == before, "a refused resume leaves config.json as it was"
    # an epoch of one batch cannot be shared by two processes: the advice is fewer tokens, not more
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(single / "tokenizer.json", few / "tokenizer.json")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
                        "-m", "nmt", "train", *COMMON, "--train", str(write_slice(tmp_path, "three", 3)), "--out", str(few),
                        "--max-steps", "2"], cwd=ROOT, capture_output=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "an epoch has 1 batch of --batch-tokens 1000, fewer than the 2 processes" in r.stderr.decode()


def test_an_out_of_memory_batch_is_retried_in_halves_with_the_same_gradient(data, tmp_path):
    """A batch that runs out of memory is split in two; the step's gradient is the same."""
    from nmt.batching import plan_epoch
    from nmt.runtime import setup
    from nmt.train import Distributed, Trainer, prepare

    train_config, model_config, tok_config = tiny_configs(data, vocab_size=500, batch_tokens=1000)
    p = prepare(train_config, model_config, tok_config, tmp_path / "run")
    runtime = setup("cpu", "float32", 1)
    batch = plan_epoch(p.cache.src_len, p.cache.tgt_len, 1000, 1, 0)[0]
    assert len(batch) >= 2

    def step(fail_above):
        trainer = Trainer(p, train_config, runtime, Distributed("cpu"))
        real_forward = trainer.model.forward

        def forward(src, tgt_in, *args):
            if src.shape[0] > fail_above:
                raise torch.OutOfMemoryError("simulated")
            return real_forward(src, tgt_in, *args)

        trainer.model.forward = forward
        loss, tokens = trainer.train_step([batch])
        return loss, tokens, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    loss_a, tok_a, w_a = step(fail_above=10**9)
    loss_b, tok_b, w_b = step(fail_above=len(batch) - 1)
    assert tok_a == tok_b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], rtol=1e-4, atol=1e-5)  # Adam: tiny grads, sign-like steps


def _torchrun(port: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "nmt", "train", *args], cwd=ROOT, capture_output=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_gloo_processes_resume_exactly_with_dropout(data, tmp_path):
    """Each rank keeps its own random stream (its dropout masks) in the checkpoint: 6 steps, then a
    resume to 12, equals 12 in one go under torchrun, as it does in one process."""
    opts = [*COMMON, "--train", str(data), "--dropout", "0.1", "--keep-last", "5"]
    one, split = tmp_path / "one", tmp_path / "split"
    r = _torchrun(29531, *opts, "--out", str(one), "--max-steps", "12")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    split.mkdir()
    shutil.copy(one / "tokenizer.json", split / "tokenizer.json")
    r = _torchrun(29532, *opts, "--out", str(split), "--max-steps", "6")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    r = _torchrun(29533, *opts, "--out", str(split), "--max-steps", "12")
    assert r.returncode == 0 and "resuming from step-00000006" in r.stderr.decode(), r.stderr.decode()[-3000:]
    a, b = weights(one, 12), weights(split, 12)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert train_losses(one)[6:] == train_losses(split)[6:]


@pytest.mark.slow
def test_a_catch_up_evaluation_that_spends_the_patience_stops_every_rank(data, tmp_path):
    """Killed in its last evaluation, resumed under torchrun: the evaluation done on resume gains
    nothing (a best score no model reaches is planted), so patience ends the run, on both ranks
    (rank 1 used to go on into a step and wait there for rank 0)."""
    dev = write_slice(tmp_path / "dev", "dev", 5, split="dev")
    out = tmp_path / "run"
    opts = [*COMMON, "--train", str(data), "--dev", str(dev), "--eval-every", "2", "--patience", "1", "--out", str(out)]
    r = _torchrun(29534, *opts, "--max-steps", "4")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    last = out / "checkpoints" / "step-00000004"
    (last / "progress.json").unlink()  # as if killed while evaluating step 4: saved, not evaluated
    state = torch.load(last / "state.pt", weights_only=True)
    progress = json.loads(state["progress"])
    state["progress"] = json.dumps({**progress, "best_bleu": 1000.0, "evals_without_gain": 0})
    torch.save(state, last / "state.pt")
    r = _torchrun(29535, *opts, "--max-steps", "8")
    err = r.stderr.decode()
    assert r.returncode == 0, err[-3000:]
    assert "step 4 was saved but not evaluated: evaluating it now" in err
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 4 and training["stop_reason"] == "no dev BLEU gain in 1 evaluations"


ONE_CLOCK = """
import json
import re
import sys
from pathlib import Path

from nmt.config import TrainConfig
from nmt.train import Distributed, Progress, Trainer

dist = Distributed("cpu")
trainer = Trainer.__new__(Trainer)  # the budget check alone: no model, no data
trainer.config, trainer.dist, trainer.stop_reason, trainer._signal = TrainConfig(max_time=10.0), dist, None, None
trainer.progress = Progress(step=3, seconds=[5.0, 12.0][dist.rank])  # rank 1's clock is past the budget
trainer._check_budget()
(Path(sys.argv[1]) / f"rank{dist.rank}.json").write_text(  # a file each: the ranks' stdout lines interleave
    json.dumps({"seconds": trainer.progress.seconds, "stop": trainer.stop_reason}))
trainer = None
dist.close()
"""


@pytest.mark.slow
def test_ranks_share_one_clock_so_the_time_budget_stops_both_for_the_same_reason(tmp_path):
    """Each rank times its own steps; the budget is checked against the slowest's seconds on every
    rank, so the time-based learning rate and the stop agree (rank 0 alone would say 5 s of 10)."""
    script = tmp_path / "one_clock.py"
    script.write_text(ONE_CLOCK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29536", str(script), str(tmp_path)], cwd=ROOT, capture_output=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks == [{"seconds": 12.0, "stop": "time budget of 10 s used"}] * 2


AUTO = [*COMMON[:COMMON.index("--dtype")], "--dtype", "auto", *COMMON[COMMON.index("--dtype") + 2:]]


def announced_dtypes(stderr: bytes) -> list[str]:
    """The dtype each process announced in its 'model: …' line (one line per rank)."""
    return re.findall(r"model: [^\n]*\), (float32|bfloat16)\b", stderr.decode())


def test_a_resume_trains_in_the_dtype_the_runs_first_race_chose(data, tmp_path):
    """Where --dtype auto races bf16 against fp32 (a CPU whose flags can't be read; here the race's
    outcome is pinned by NMT_CPU_BF16_SPEEDUP), config.json keeps the first race's answer and a resume
    trains in it instead of racing again (a noisy race could answer otherwise)."""
    out = tmp_path / "run"
    opts = [*AUTO, "--train", str(data), "--out", str(out)]
    r = run_nmt("train", *opts, "--max-steps", "2", env={"NMT_CPU_BF16_SPEEDUP": "3.0"})
    assert r.returncode == 0, r.stderr.decode()
    assert announced_dtypes(r.stderr) == ["bfloat16"]
    assert json.loads((out / "config.json").read_text())["dtype_raced"] == "bfloat16"
    # a resume with --dtype set trains in it, and keeps the record for the next one
    r = run_nmt("train", *COMMON, "--train", str(data), "--out", str(out), "--max-steps", "4")
    assert r.returncode == 0, r.stderr.decode()
    assert announced_dtypes(r.stderr) == ["float32"]
    r = run_nmt("train", *opts, "--max-steps", "6", env={"NMT_CPU_BF16_SPEEDUP": "1.0"})  # this race says float32
    assert r.returncode == 0, r.stderr.decode()
    assert "resuming from step-00000004" in r.stderr.decode()
    assert announced_dtypes(r.stderr) == ["bfloat16"]
    assert json.loads((out / "training.json").read_text())["device"].endswith(", bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype_raced"] == "bfloat16"


RANKS_RACE_APART = """
import os
import sys

os.environ["NMT_CPU_BF16_SPEEDUP"] = "3.0" if os.environ["RANK"] == "0" else "1.0"  # rank 0's race: bf16; rank 1's: fp32
from nmt.cli import main

sys.argv[0] = "nmt"
main()
"""


def test_every_rank_trains_in_the_dtype_rank_0_chose(data, tmp_path):
    """Under torchrun, `--dtype auto`'s race runs on rank 0 alone and the others take its answer:
    two ranks whose races disagree still train in one dtype (rank 0's)."""
    script = tmp_path / "ranks_race_apart.py"
    script.write_text(RANKS_RACE_APART)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29537",
                        str(script), "train", *AUTO, "--train", str(data), "--out", str(tmp_path / "run"),
                        "--max-steps", "2"], cwd=ROOT, capture_output=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert announced_dtypes(r.stderr) == ["bfloat16", "bfloat16"]
    # rank 0's setup refuses the options: every rank ends with its error, none waits for the answer
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29538",
                        str(script), "train", *AUTO, "--threads", "-1", "--train", str(data), "--out",
                        str(tmp_path / "refused"), "--max-steps", "2"], cwd=ROOT, capture_output=True, timeout=120, env=env)
    assert r.returncode != 0
    from nmt.config import max_threads

    expected = f"--threads must be in [0, {max_threads()}] (0: all cores; at most 4 per core here; got -1)"
    assert r.stderr.decode().count(expected) == 2, r.stderr.decode()[-3000:]
