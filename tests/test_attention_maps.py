"""Attention maps: each row is a distribution, and the explicit weights are what the fused kernel applies."""

import torch
import torch.nn.functional as F

import pytest

from nmt.attention_maps import alignment_attention, attention_maps
from nmt.model import attention_weights as weights
from nmt.config import ModelConfig
from nmt.model import Transformer, eval_mode, split_heads


def tiny(pre_norm=True):
    torch.manual_seed(0)
    return Transformer(ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=3, dropout=0.0,
                                   src_vocab_size=30, tgt_vocab_size=30, pre_norm=pre_norm)).eval()


def test_every_attention_row_is_a_distribution_with_masks_respected():
    for pre_norm in (True, False):
        model = tiny(pre_norm)
        src, tgt = torch.randint(4, 30, (1, 7)), torch.randint(4, 30, (1, 5))
        enc, dec, cross = attention_maps(model, src, tgt)
        assert enc.shape == (2, 4, 7, 7) and dec.shape == (3, 4, 5, 5) and cross.shape == (3, 4, 5, 7)
        for w in (enc, dec, cross):
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert torch.all(dec.triu(1) == 0)  # nothing attends to the future


def test_maps_are_drawn_without_dropout_and_a_training_model_stays_in_training():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=3, dropout=0.5,
                                    src_vocab_size=30, tgt_vocab_size=30))  # in training mode, as a trainer holds it
    src, tgt = torch.randint(4, 30, (1, 7)), torch.randint(4, 30, (1, 5))
    first, second = attention_maps(model, src, tgt), attention_maps(model, src, tgt)
    assert model.training and all(m.training for m in model.modules())
    for a, b in zip(first, second):  # dropout at 0.5 would make two draws differ
        torch.testing.assert_close(a, b)
    links = [alignment_attention(model, [src[0].tolist()], [tgt[0].tolist()])[0] for _ in range(2)]
    assert model.training
    torch.testing.assert_close(links[0], links[1])
    model.eval()
    torch.testing.assert_close(attention_maps(model, src, tgt)[2], first[2])  # what an eval-mode model gives
    assert not model.training


def test_eval_mode_gives_the_mode_back_after_an_error():
    model = tiny().train()
    with pytest.raises(ZeroDivisionError), eval_mode(model):
        assert not model.training
        1 / 0
    assert model.training


def test_explicit_weights_reproduce_the_fused_kernel():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    torch.testing.assert_close(weights(q, k, mask) @ v, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_cross_attention_of_a_padded_source_gives_padding_no_weight():
    model = tiny()
    src = torch.cat([torch.randint(4, 30, (1, 5)), torch.zeros(1, 3, dtype=torch.long)], 1)
    _, _, cross = attention_maps(model, src, torch.randint(4, 30, (1, 4)))
    assert torch.all(cross[..., 5:] == 0)


def test_first_layer_encoder_map_matches_a_hand_computation():
    model = tiny()
    src = torch.randint(4, 30, (1, 6))
    enc, _, _ = attention_maps(model, src, torch.randint(4, 30, (1, 3)))
    x = model.embed(model.src_embed, src)
    layer = model.encoder[0]
    q, k, _ = (split_heads(t, 4) for t in layer.attn.qkv(layer.res1.norm(x)).chunk(3, dim=-1))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)[0]
    torch.testing.assert_close(enc[0], expected)


def test_attention_and_plot_commands_draw_pngs_of_the_expected_grid(tiny_model_dir, tmp_path):
    import json

    import pytest

    from conftest import run_nmt

    mpimg = pytest.importorskip("matplotlib.image")
    r = run_nmt("attention", "-m", str(tiny_model_dir), "En el principio creó Dios los cielos.", "-o",
                str(tmp_path / "verse"))
    assert r.returncode == 0, r.stderr.decode()
    model = json.loads((tiny_model_dir / "config.json").read_text())["model"]
    for kind, layers in (("encoder", model["encoder_layers"]), ("decoder", model["decoder_layers"]),
                         ("cross", model["decoder_layers"])):
        image = mpimg.imread(tmp_path / f"verse-{kind}.png")
        height, width = image.shape[:2]
        assert abs(width / height - model["n_heads"] / layers) < 0.05  # a layers × heads grid of square panels
        assert image.std() > 0  # not blank
    r = run_nmt("plot", str(tiny_model_dir), "-o", str(tmp_path / "curves.png"))
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    r = run_nmt("plot", str(tiny_model_dir), "-o", str(tmp_path / "curves.txt"))  # no such picture format
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "matplotlib cannot write .txt (name it .png" in err
    assert not (tmp_path / "curves.txt").exists()
    r = run_nmt("plot", str(tiny_model_dir), "-o", str(tmp_path / "no-such-dir" / "curves.png"))  # cannot be written
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "curves.png: cannot write (" in err
    # a line cut short by a killed run, then the resumed run's records: skipped and counted, not a traceback
    run = tmp_path / "cut"
    run.mkdir()
    lines = (tiny_model_dir / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines[:2], lines[2][:15], *lines[2:]]) + "\n")
    r = run_nmt("plot", str(run), "-o", str(tmp_path / "cut.png"))
    assert r.returncode == 0, r.stderr.decode()
    assert "skipped 1 unreadable line(s) (line 3)" in r.stderr.decode()
    assert (tmp_path / "cut.png").stat().st_size > 1000
    r = run_nmt("attention", "-m", str(tiny_model_dir), "Hola")  # terminal heatmap, no file
    assert r.returncode == 0 and r.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (["Hola", "--beam-size", "0"], "need beam size ≥ 1 and 1 ≤ nbest ≤ beam size (got 0, 1)"),
    (["Hola", "--beam-size", "-3"], "need beam size ≥ 1 and 1 ≤ nbest ≤ beam size (got -3, 1)"),
    (["Hola", "--beam-size", "5000"], "--beam-size must be at most 1024 (got 5000)"),
    (["Hola", "--line", "5"], "--line 5 picks a line of --input FILE; with the sentence given there is none to pick"),
    (["-i", "INPUT", "--line", "0"], "--line must be ≥ 1, the lines of --input are counted from 1 (got 0)"),
])
def test_attention_refuses_what_it_would_ignore_or_cannot_decode(tiny_model_dir, tmp_path, args, message):
    """As translate: decoding options out of range are usage errors; --line picks from --input only."""
    from conftest import error_line, run_nmt

    source = tmp_path / "in.es"
    source.write_text("Hola.\nAdiós.\n", encoding="utf-8")
    r = run_nmt("attention", "-m", str(tiny_model_dir), *[str(source) if a == "INPUT" else a for a in args])
    assert error_line(r, 2) == f"nmt: error: {message}"
    assert r.stdout == b""


def test_attention_line_picks_the_line_of_the_input(tiny_model_dir, tmp_path):
    from conftest import ok, run_nmt

    source = tmp_path / "in.es"
    source.write_text("Hola.\nEn el principio creó Dios los cielos y la tierra.\n", encoding="utf-8")
    second = ok(run_nmt("attention", "-m", str(tiny_model_dir), "-i", str(source), "--line", "2"))
    assert second == ok(run_nmt("attention", "-m", str(tiny_model_dir), "En el principio creó Dios los cielos y la tierra."))
    assert ok(run_nmt("attention", "-m", str(tiny_model_dir), "-i", str(source))) == \
        ok(run_nmt("attention", "-m", str(tiny_model_dir), "Hola."))  # --line 1 by default
