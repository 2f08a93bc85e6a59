"""Shared test helpers: the CLI in a subprocess and its error lines (with paths removed, so an
assertion cannot be satisfied by the pytest temporary path), slices of the embedded corpus, a
tiny in-process Transformer, the tiny preset's configs and a tiny model directory from `nmt train`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bible-es-en"

# A fixed decision keeps tests independent of how busy the machine is when the race is run.
os.environ.setdefault("NMT_CPU_BF16_SPEEDUP", "1.0")

# Under pytest-xdist (pyproject: two workers) each worker and every `nmt` it starts uses one
# torch thread: two processes with a thread per core each would oversubscribe the cores, and
# OpenMP's spinning threads then run many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def run_nmt(*args: str, input: bytes | str | None = None, timeout: float = 300, env: dict | None = None):
    """Run the real CLI in a subprocess (as a user would), returning CompletedProcess with bytes."""
    if isinstance(input, str):
        input = input.encode("utf-8")
    return subprocess.run([sys.executable, "-m", "nmt", *args], input=input, capture_output=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def ok(r: subprocess.CompletedProcess) -> str:
    """Assert exit 0 and no traceback; return stdout."""
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert "Traceback" not in err, err
    return r.stdout.decode("utf-8")


_PATH = re.compile(r"(?<![\w./-])/[^\s:,;'\"()]+")  # an absolute path (the tests' files are all under tmp)


def without_paths(message: str) -> str:
    """The message with every absolute file path replaced by <path>: what is left is what the message
    says about the problem (a word from a test's temporary path can no longer match)."""
    return _PATH.sub("<path>", message)


def head_lines(name: str, n: int) -> list[str]:
    """The first n lines of the embedded corpus file `name` (e.g. train.es)."""
    with open(DATA / name, encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def tiny_transformer(vocab: int = 24, seed: int = 0, d_model: int = 32, **options):
    """A small random Transformer in eval mode (2+2 layers, 4 heads, no dropout)."""
    import torch

    from nmt.config import ModelConfig
    from nmt.model import Transformer

    torch.manual_seed(seed)
    c = ModelConfig(**{"d_model": d_model, "n_heads": 4, "d_ff": 64, "encoder_layers": 2, "decoder_layers": 2,
                       "dropout": 0.0, "src_vocab_size": vocab, "tgt_vocab_size": vocab, **options})
    return Transformer(c).eval()


def tiny_configs(train, dev=None, vocab_size: int = 400, **train_fields):
    """(train, model, tokenizer) configs of the `tiny` preset for in-process runs: CPU, one thread,
    float32, batches of 512 tokens, a tokenizer of `vocab_size`; `train_fields` override the rest."""
    from nmt import config as cfg

    model_config, tok_config, preset = cfg.preset("tiny")
    tok_config = cfg.apply(tok_config, {"vocab_size": vocab_size}, "tok")
    fields = {**preset, "batch_tokens": 512, "eval_every": 1000, "log_every": 1, "dtype": "float32", **train_fields}
    train_config = cfg.TrainConfig(preset="tiny", train=[str(train)], dev=str(dev) if dev else None, device="cpu",
                                   threads=1, **fields)
    return train_config, model_config, tok_config


def write_slice(directory: Path, name: str, n: int, start: int = 0, split: str = "train") -> Path:
    """PREFIX.es/PREFIX.en with n lines of the embedded corpus; returns PREFIX."""
    directory.mkdir(parents=True, exist_ok=True)
    for lang in ("es", "en"):
        lines = (DATA / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[start : start + n]
        (directory / f"{name}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory / name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real model directory from `nmt train` (tiny preset, a few steps): exercises the whole
    write path; its weights are near random, which the line-contract tests do not mind."""
    base = tmp_path_factory.mktemp("tiny")
    train = write_slice(base / "data", "train", 1500)
    dev = write_slice(base / "data", "dev", 20, split="dev")
    out = base / "run"
    r = run_nmt("train", "--train", str(train), "--dev", str(dev), "--src", "es", "--tgt", "en", "--out", str(out),
                "--preset", "tiny", "--max-steps", "30", "--eval-every", "30", "--vocab-size", "600",
                "--dtype", "float32")
    assert r.returncode == 0, r.stderr.decode()
    return out


def error_line(r: subprocess.CompletedProcess, code: int, only_line: bool = True) -> str:
    """Assert a one-line `nmt: error: …` on stderr, exit `code`, no traceback; return the message."""
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("nmt: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if only_line:
        assert lines == errors, f"expected only the error line on stderr:\n{err}"
    return errors[0]


def full_device(tmp_path: Path) -> Path:
    """A device that refuses every write with ENOSPC: /dev/full, or one made like it (some
    sandboxes replace /dev/full by a regular file)."""
    if Path("/dev/full").is_char_device():
        return Path("/dev/full")
    try:
        os.mknod(tmp_path / "full", 0o666 | 0o020000, os.makedev(1, 7))  # what /dev/full is
    except OSError:
        pytest.skip("no /dev/full, and no permission to make one")
    return tmp_path / "full"
