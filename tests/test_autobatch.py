"""Auto batch sizing (`--batch-tokens auto`), checked on CPU with a simulated memory limit: the
search finds the boundary of any limit within its stated precision, the probe batch is the worst
case its budget allows, a failed try leaves no gradients behind, and on CPU the option falls back
to the preset's budget (and says so)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nmt import autobatch
from nmt.config import PRESET_TRAINING, ModelConfig
from nmt.errors import NmtError
from nmt.model import Transformer
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID

from conftest import error_line, run_nmt, write_slice


class Limit:
    """`fits` for a device that holds at most `limit` tokens; counts the tries."""

    def __init__(self, limit: int):
        self.limit, self.tries = limit, []

    def __call__(self, tokens: int) -> bool:
        self.tries.append(tokens)
        return tokens <= self.limit


@pytest.mark.parametrize("limit", [16, 300, 1023, 1024, 1025, 5000, 65_537, 123_456, 999_999])
def test_search_finds_the_limit_within_precision(limit):
    fits = Limit(limit)
    budget = autobatch.search_budget(fits)
    assert budget <= limit * autobatch.MARGIN
    assert budget >= limit * autobatch.MARGIN / (1 + autobatch.PRECISION) - 1
    assert len(fits.tries) <= 2 * math.log2(autobatch.LARGEST) + 2  # logarithmic, not a scan


def test_search_stops_at_the_largest_budget():
    fits = Limit(10**9)
    assert autobatch.search_budget(fits) == int(autobatch.LARGEST * autobatch.MARGIN)
    assert max(fits.tries) == autobatch.LARGEST


def test_nothing_fits_is_an_error():
    with pytest.raises(NmtError, match="out of memory even with a batch of 16 tokens"):
        autobatch.search_budget(Limit(10))


@pytest.mark.parametrize("tokens, longest", [(1000, 50), (1000, 2000), (4096, 250), (7, 7)])
def test_worst_case_batch_is_the_largest_the_budget_holds(tokens, longest):
    b = autobatch.worst_case_batch(tokens, longest, vocab_sizes=(30, 100), device=torch.device("cpu"))
    rows = max(1, tokens // longest)
    assert b.src.shape == b.tgt_in.shape == b.tgt_out.shape == (rows, longest)
    assert rows * longest <= max(tokens, longest)  # within budget (or one pair alone)
    assert (rows + 1) * longest > tokens  # one more pair would not be
    assert not (b.src == PAD_ID).any() and not (b.tgt_out == PAD_ID).any()  # every token is real
    assert (b.src[:, -1] == EOS_ID).all() and (b.tgt_in[:, 0] == BOS_ID).all() and (b.tgt_out[:, -1] == EOS_ID).all()
    assert (b.tgt_in[:, 1:] == b.tgt_out[:, :-1]).all()  # teacher forcing: shifted by one
    assert b.n_tgt_tokens == rows * longest
    assert b.src.max() < 30 and b.tgt_out.max() < 100  # each side's ids from its own vocabulary


def test_probe_on_a_real_model_with_a_simulated_memory_limit():
    """Forward and backward of a real model; a batch over 6,000 tokens 'runs out of memory'
    half-way (after the forward pass). The probe settles below the limit and leaves no
    gradients from any try."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(src_vocab_size=30, tgt_vocab_size=120, joint_vocab=False, d_model=16, n_heads=2,
                                    d_ff=32, encoder_layers=1, decoder_layers=1, dropout=0.0))
    limit, seen = 6000, []

    def step(batch):
        seen.append(batch.src.numel())
        keep = batch.tgt_out != PAD_ID
        loss = model(batch.src, batch.tgt_in, keep, batch.tgt_out[keep])
        if batch.src.numel() > limit:
            raise torch.OutOfMemoryError("simulated")
        loss.backward()

    budget = autobatch.probe(step, model, max_length=40, vocab_sizes=(30, 120), device=torch.device("cpu"))
    assert budget <= limit * autobatch.MARGIN
    assert budget >= limit * autobatch.MARGIN / (1 + autobatch.PRECISION) - 40  # whole rows of 40
    assert any(n > limit for n in seen) and any(n <= limit for n in seen)
    assert all(p.grad is None for p in model.parameters())


def test_cli_auto_on_cpu_uses_the_preset_budget(tmp_path):
    train = write_slice(tmp_path / "data", "train", 300)
    out = tmp_path / "run"
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--out", str(out), "--preset", "tiny",
                "--max-steps", "2", "--vocab-size", "324", "--dtype", "float32", "--batch-tokens", "auto")
    assert r.returncode == 0, r.stderr.decode()
    expected = PRESET_TRAINING["tiny"]["batch_tokens"]
    assert f"on CPU the tiny preset's {expected} is used" in " ".join(r.stderr.decode().split())
    state = torch.load(sorted((out / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    assert json.loads(state["progress"])["batch_tokens"] == expected  # kept for the resume


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_cli_bad_batch_tokens_is_a_usage_error(tmp_path, value):
    r = run_nmt("train", "--out", str(tmp_path / "run"), "--batch-tokens", value)
    assert "--batch-tokens" in error_line(r, 2)
