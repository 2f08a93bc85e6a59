"""Properties of the Transformer that hold for any weights: causality, padding, and learning."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model

from conftest import ROOT
from nmt.config import ModelConfig
from nmt.model import Transformer, sinusoidal_positions


def tiny(vocab=20, pre_norm=True, **kw) -> Transformer:
    torch.manual_seed(0)
    c = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
                    src_vocab_size=vocab, tgt_vocab_size=vocab, pre_norm=pre_norm, **kw)
    return Transformer(c).eval()


def test_changing_a_future_target_token_never_changes_earlier_logits():
    for pre_norm in (True, False):
        model = tiny(pre_norm=pre_norm)
        src = torch.randint(4, 20, (2, 7))
        tgt = torch.randint(4, 20, (2, 9))
        base = model(src, tgt)
        for t in range(tgt.shape[1]):
            changed = tgt.clone()
            changed[:, t] = (changed[:, t] + 1 - 4) % 16 + 4
            out = model(src, changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out[:, t:], base[:, t:])  # the change is visible from t on


@pytest.mark.parametrize("pre_norm", [True, False])
def test_padding_changes_no_real_position(pre_norm):
    model = tiny(pre_norm=pre_norm)
    src = torch.randint(4, 20, (1, 6))
    tgt = torch.randint(4, 20, (1, 5))
    base = model(src, tgt)
    padded_src = torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_tgt = torch.cat([tgt, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    out = model(padded_src, padded_tgt)
    torch.testing.assert_close(out[:, :5], base, rtol=1e-5, atol=1e-5)
    # and inside a batch with a longer neighbour
    other = torch.randint(4, 20, (1, 10))
    batch_src = torch.cat([padded_src, other], dim=0)
    batch_tgt = torch.cat([padded_tgt, torch.randint(4, 20, (1, 8))], dim=0)
    torch.testing.assert_close(model(batch_src, batch_tgt)[:1, :5], base, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_one_matrix_and_separate_vocabularies_do_not():
    joint = tiny()
    assert joint.src_embed.weight is joint.tgt_embed.weight is joint.output.weight
    c = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=1, decoder_layers=1,
                    src_vocab_size=30, tgt_vocab_size=20)
    sep = Transformer(c)
    assert sep.src_embed.weight is not sep.tgt_embed.weight
    assert sep.tgt_embed.weight is sep.output.weight
    # separate vocabularies of the same size: id i is another piece on each side, so two matrices
    same_size = Transformer(ModelConfig(**{**c.__dict__, "src_vocab_size": 20, "joint_vocab": False}))
    assert same_size.src_embed.weight is not same_size.tgt_embed.weight
    assert same_size.tgt_embed.weight is same_size.output.weight


def test_sinusoidal_positions_match_the_paper_formula():
    pe = sinusoidal_positions(50, 16)
    pos, i = 17, 3
    assert abs(pe[pos, 2 * i].item() - torch.sin(torch.tensor(pos / 10000 ** (2 * i / 16))).item()) < 1e-6
    assert abs(pe[pos, 2 * i + 1].item() - torch.cos(torch.tensor(pos / 10000 ** (2 * i / 16))).item()) < 1e-6


def test_tiny_model_learns_the_copy_task_to_exact_match():
    """The annotated-transformer's first test: output = input, on sequences of random symbols."""
    torch.manual_seed(0)
    vocab, bos, eos = 14, 2, 3
    c = ModelConfig(d_model=64, n_heads=4, d_ff=128, encoder_layers=2, decoder_layers=2, dropout=0.0,
                    src_vocab_size=vocab, tgt_vocab_size=vocab)
    model = Transformer(c)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(350):
        seq = torch.randint(4, vocab, (64, 6))
        src = torch.cat([seq, torch.full((64, 1), eos)], 1)
        tgt_in = torch.cat([torch.full((64, 1), bos), seq], 1)
        tgt_out = torch.cat([seq, torch.full((64, 1), eos)], 1)
        loss = F.cross_entropy(model(src, tgt_in).transpose(1, 2), tgt_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    from nmt.config import DecodeConfig
    from nmt.search import greedy

    model.eval()
    seq = torch.randint(4, vocab, (50, 6), generator=torch.Generator().manual_seed(99))
    src = torch.cat([seq, torch.full((50, 1), eos)], 1)
    results = greedy(model, src, DecodeConfig(beam_size=1, max_length_a=1.0, max_length_b=3))
    assert [r.hypotheses[0].tokens for r in results] == seq.tolist()


@pytest.mark.parametrize("tie", [True, False])
def test_embeddings_start_at_the_scale_of_the_model_with_the_padding_row_zero(tie):
    """N(0, d_model^-1/2) (the tables are scaled by √d_model when used), the padding id's row zero,
    and trainable: set by `_init_weights`, not left to nn.Embedding's N(0, 1)."""
    torch.manual_seed(0)
    c = ModelConfig(d_model=64, n_heads=4, d_ff=128, encoder_layers=1, decoder_layers=1, src_vocab_size=3000,
                    tgt_vocab_size=3000 if tie else 2000, tie_embeddings=tie)
    model = Transformer(c)
    for table in (model.src_embed, model.tgt_embed):
        w = table.weight
        assert w.requires_grad and table.padding_idx == c.pad_id
        assert torch.count_nonzero(w[c.pad_id]) == 0
        assert w[1:].std().item() == pytest.approx(64**-0.5, rel=0.05)
        assert w[1:].mean().abs().item() < 0.01
    assert (model.src_embed is model.tgt_embed) == tie


def test_checking_a_weights_file_against_its_config_builds_nothing_slow(tmp_path):
    """`check_weights` builds the model on the meta device for its shapes; computing values there
    (nn.Embedding's normal draw, the position table) ran torch's Python reference kernels, whose first
    use imports torch._dynamo, 1.2 s of every command that loads a model."""
    c = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=1, decoder_layers=1, src_vocab_size=50,
                    tgt_vocab_size=50)
    weights = tmp_path / "model.safetensors"
    save_model(Transformer(c), str(weights))
    script = ("import json, sys\nfrom nmt.checkpoint import check_weights\nfrom nmt.config import ModelConfig\n"
              "check_weights(sys.argv[1], ModelConfig(**json.loads(sys.argv[2])))\n"
              "print('torch._dynamo' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script, str(weights), json.dumps(asdict(c))], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
