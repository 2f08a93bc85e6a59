"""Shared fixtures: small slices of the embedded corpus and a tiny model directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bible-es-en"

# A fixed decision keeps tests independent of how busy the machine is when the race is run.
os.environ.setdefault("NMT_CPU_BF16_SPEEDUP", "1.0")


def run_nmt(*args: str, input: bytes | str | None = None, timeout: float = 300, env: dict | None = None):
    """Run the real CLI in a subprocess (as a user would), returning CompletedProcess with bytes."""
    if isinstance(input, str):
        input = input.encode("utf-8")
    return subprocess.run([sys.executable, "-m", "nmt", *args], input=input, capture_output=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


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
