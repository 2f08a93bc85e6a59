"""The blocked training loss and the CPU dropout, each against PyTorch's own computation."""

import math

import pytest
import torch
import torch.nn.functional as F

import nmt.cpu_kernels as loss_mod
from nmt.config import ModelConfig
from nmt.cpu_kernels import linear_cross_entropy
from nmt.model import Dropout, Transformer


def _reference(h, w, y, eps):
    return F.cross_entropy(F.linear(h, w).float(), y, label_smoothing=eps, reduction="sum")


def _loss_and_grads(fn, h0, w0, y, eps, dtype=torch.float32, scale=0.37):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = fn(h, w, y, eps)
    (loss * scale).backward()  # a non-unit upstream gradient, as training's 1 / n_tokens
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("n", [1, 63, 64, 150, 257])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("span_blocks", [1, 2, 100])  # the weight's gradient: one product per 1, 2, all blocks
def test_blocked_loss_and_gradients_equal_plain_cross_entropy(monkeypatch, n, eps, span_blocks):
    monkeypatch.setattr(loss_mod, "BLOCK_BYTES", 64 * 4 * 300)  # 64-row blocks: several, the last padded
    monkeypatch.setattr(loss_mod, "GRAD_BYTES", span_blocks * 64 * 4 * 300)
    torch.manual_seed(n)
    h0, w0 = torch.randn(n, 24), torch.randn(300, 24) * 0.3
    y = torch.randint(0, 300, (n,))
    ref = _loss_and_grads(_reference, h0, w0, y, eps)
    got = _loss_and_grads(linear_cross_entropy, h0, w0, y, eps)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("span_blocks", [1, 3, 100])
def test_blocked_loss_under_bf16_autocast_stays_close_to_fp32(monkeypatch, span_blocks):
    monkeypatch.setattr(loss_mod, "BLOCK_BYTES", 64 * 4 * 1000)
    monkeypatch.setattr(loss_mod, "GRAD_BYTES", span_blocks * 64 * 2 * 1000)
    torch.manual_seed(1)
    h0, w0 = torch.randn(500, 64), torch.randn(1000, 64) * 0.1
    y = torch.randint(0, 1000, (500,))
    exact = _loss_and_grads(_reference, h0, w0, y, 0.1)
    bf16 = _loss_and_grads(linear_cross_entropy, h0, w0, y, 0.1, dtype=torch.bfloat16)
    assert math.isclose(bf16[0].item(), exact[0].item(), rel_tol=1e-2)
    for a, b in zip(bf16[1:], exact[1:]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_blocked_loss_without_gradients():
    torch.manual_seed(2)
    h, w, y = torch.randn(70, 16), torch.randn(50, 16), torch.randint(0, 50, (70,))
    with torch.no_grad():
        got = linear_cross_entropy(h, w, y, 0.1)
    assert not got.requires_grad
    torch.testing.assert_close(got, _reference(h, w, y, 0.1))


def test_model_loss_path_equals_logits_then_cross_entropy(monkeypatch):
    """Training's path (loss inside the model, output weight tied to the embeddings) gives the
    same loss and the same gradient on every parameter as logits followed by F.cross_entropy."""
    monkeypatch.setattr(loss_mod, "BLOCK_BYTES", 64 * 4 * 40)
    torch.manual_seed(0)
    c = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
                    src_vocab_size=40, tgt_vocab_size=40)
    model = Transformer(c).train()
    assert model.output.weight is model.tgt_embed.weight
    with pytest.raises(ValueError, match=r"^keep and targets go together$"):
        model(torch.randint(4, 40, (1, 3)), torch.randint(4, 40, (1, 3)), torch.ones(1, 3, dtype=torch.bool))
    src = torch.randint(4, 40, (6, 9))
    tgt = torch.randint(4, 40, (6, 12))
    tgt[0, 8:] = 0  # padding
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    keep = tgt_out != 0
    results = []
    for fused in (False, True):
        model.zero_grad()
        if fused:
            loss = model(src, tgt_in, keep, tgt_out[keep], 0.1)
        else:
            loss = F.cross_entropy(model(src, tgt_in)[keep], tgt_out[keep], label_smoothing=0.1, reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_zeroes_p_of_the_elements_and_scales_the_rest():
    torch.manual_seed(0)
    for p in (0.1, 0.3):
        x = torch.rand(1000, 1001) + 0.5  # no zeros of its own; an odd size (not a multiple of 4)
        y = Dropout(p).train()(x)
        dropped = y == 0
        n = x.numel()
        assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
        torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
        # neighbouring elements (16-bit slices of one random word) are independent
        d = dropped.flatten().float()
        corr = torch.corrcoef(torch.stack([d[:-1], d[1:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)


def test_dropout_at_the_ends_of_its_range_neither_overflows_nor_scales_what_it_keeps_whole():
    """p is rounded to a multiple of 1/65536: under 2⁻¹⁷ nothing is dropped (and nothing scaled);
    from 1 − 2⁻¹⁷ the cutoff (32768) did not fit the int16 it is compared with."""
    from nmt.cpu_kernels import dropout, dropout_add

    torch.manual_seed(0)
    x = torch.rand(300, 301) + 0.5
    assert torch.equal(dropout(x, 1e-6), x) and torch.equal(dropout_add(x, x, 1e-6), x + x)
    for y in (dropout(x, 1 - 1e-8), dropout_add(torch.zeros_like(x), x, 1 - 1e-8)):
        assert (y == 0).float().mean().item() > 0.999


def test_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = (torch.rand(300, 7) + 0.5).requires_grad_()
    y = Dropout(0.25).train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.75)


def test_dropout_is_identity_in_eval_or_at_zero_and_follows_the_seed():
    x = torch.randn(50, 50)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    torch.manual_seed(5)
    a = Dropout(0.3).train()(x)
    b = Dropout(0.3).train()(x)
    torch.manual_seed(5)
    assert torch.equal(Dropout(0.3).train()(x), a) and not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"^dropout probability 1\.0 is not in \[0, 1\)$"):
        Dropout(1.0)


def test_dropout_add_is_the_sum_with_the_same_mask_and_gradients():
    """x + Dropout(y) in one op: the same draws as `dropout` from the same generator state, the
    same values and gradients as the two-step sum; bf16 y under an fp32 x is scaled in fp32."""
    from nmt.cpu_kernels import dropout, dropout_add

    p = 0.2
    x0, y0 = torch.randn(37, 3, 11), torch.randn(37, 3, 11)  # odd size: not a multiple of 4
    grads = []
    for fused in (False, True):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        torch.manual_seed(3)
        out = dropout_add(x, y, p) if fused else x + dropout(y, p)
        (out * torch.arange(out.numel()).view(out.shape)).sum().backward()  # a non-uniform upstream gradient
        grads.append((out.detach(), x.grad, y.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert 0 < (grads[1][2] == 0).sum() < y0.numel()  # some dropped, not all
    yb = y0.to(torch.bfloat16)
    torch.manual_seed(3)
    keep = dropout(torch.ones(y0.shape), p) != 0
    torch.manual_seed(3)
    out = dropout_add(x0, yb, p)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0 + yb.float() * keep / (1 - p), rtol=1e-6, atol=1e-6)
    assert torch.equal(dropout_add(x0, y0, 0.0), x0 + y0)


def test_residual_uses_dropout_only_while_training():
    from nmt.model import Residual

    res = Residual(8, 0.5, pre_norm=True)
    x = torch.randn(4, 8)
    f = torch.nn.Linear(8, 8)
    assert torch.equal(res.eval()(x, f), x + f(res.norm(x)))
    torch.manual_seed(0)
    trained = res.train()(x, f) - x
    assert (trained == 0).float().mean() > 0.2  # about half the branch dropped


# --- allocator ---------------------------------------------------------------------------------

_FAULTS = r"""
import resource, sys, torch
from nmt.runtime import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.empty(2_000_000).fill_(1.0)  # 8 MB: faulted in whatever the setting
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(1, 11):  # temporaries a little larger each step, as batch shapes vary
    x = torch.empty(2_000_000 + step * 16_384).fill_(1.0)
    del x
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_large_temporaries_from_faulting_in_fresh_pages():
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    faults = {}
    for mode in ("default", "keep"):  # each in its own process: the setting is process-wide
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        ok, n = out.stdout.split()
        faults[mode] = int(n)
        assert ok == ("True" if mode == "keep" else "None")
    pages = 8_000_000 // 4096  # one temporary's pages
    assert faults["default"] > 8 * pages  # each a fresh mapping, zeroed by the kernel (measured: 10 × pages)
    assert faults["keep"] < 0.75 * faults["default"]  # measured: half as many


@pytest.mark.parametrize("value", ["1.0", "-0.1", "2"])
def test_cli_bad_dropout_is_a_usage_error_before_any_work(tmp_path, value):
    from conftest import error_line, run_nmt

    r = run_nmt("train", "--out", str(tmp_path / "run"), "--dropout", value)
    assert "dropout must be in [0, 1)" in error_line(r, 2)
    assert not (tmp_path / "run").exists()  # refused before the tokenizer or cache is built
