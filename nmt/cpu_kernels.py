"""CPU speed kernels, kept out of the model's code: the training loss in blocks of rows, and
dropout masks from 64-bit random words. The model calls `linear_cross_entropy`, `dropout` and
`dropout_add` as plain functions; on other devices they are the plain PyTorch operations.

The training loss: label-smoothed cross-entropy of the output layer, summed over target tokens.

    loss = Σ_i (1 − ε)·(−log p_i[y_i]) + ε·mean_v(−log p_i[v]),   p_i = softmax(z_i),  z_i = W h_i

(PyTorch's `label_smoothing=ε`; Szegedy et al. 2016). Its gradient with respect to the logits
is p_i − (1 − ε)·onehot(y_i) − ε/V.

On CPU the loss and its gradients are computed one block of rows at a time, in the forward pass,
so the [N, V] logits never exist whole (`_BlockedLinearCrossEntropy`). Measured on the small
preset (2 cores, bf16): the plain path spent about a third of each step in memory-bound passes
over [N, V] fp32 tensors (the fp32 copy of the logits, log-softmax and its backward, the
zero-filled one-hot gradient, their sum), each freshly allocated, so most of that time was the
kernel zeroing new pages. A block of rows stays in the cache and its buffers are reused. Within a
block, exp(z − max) is computed once, in place, for both the loss and the softmax of the gradient;
the gradients of many blocks' logits are kept in the products' dtype and meet the hidden states in
one product for the weight's gradient (`benchmarks/bench_loss.py`). On CUDA the plain path is kept
(fused kernels and a caching allocator; the blocked path is not measured there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROWS_MULTIPLE = 64  # blocks padded to a multiple of this many rows: few distinct matrix shapes
BLOCK_BYTES = 8 << 20  # fp32 logits of one block (256 rows at V = 8000: measured fastest of 1–16 MiB)
GRAD_BYTES = 24 << 20  # logits' gradients kept for one product with the hidden states (under glibc's
# mmap threshold as `runtime.keep_freed_memory` sets it, so the buffer is reused, not zeroed anew)


def dropout(x: Tensor, p: float) -> Tensor:
    """Dropout (Srivastava et al. 2014) in training mode: zero each element with probability p,
    scale the rest by 1 / (1 − p). On CPU the mask comes from 16-bit slices of 64-bit random
    integers, because torch's `bernoulli_` draws one number per element: measured on
    [3000, 256] bf16 (2 cores) 1.6 ms against F.dropout's 4.8 ms, and 12% of a small-preset
    training step before. p is quantised to a multiple of 1/65536. Same generator as torch's
    (seeded, saved in checkpoints)."""
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True) if p else x
    threshold = _threshold(p)
    if threshold is None:
        return x
    return x.masked_fill(_uniform16(x.shape) < threshold, 0) * (1.0 / (1.0 - p))


def dropout_add(x: Tensor, y: Tensor, p: float) -> Tensor:
    """x + dropout(y, p), the residual connection's sum, in one op: on CPU
    `addcmul(x, y, keep, value=1 / (1 − p))` with the same mask `dropout` draws from the same
    generator state, where `dropout` then `+` makes three (zero, scale, add) and its backward two.
    `addcmul` still copies a bf16 y and the bool mask to x's dtype before its one pass. The scale
    is applied in x's dtype (fp32 under autocast), not rounded to y's bf16."""
    if y.device.type != "cpu":
        return x + F.dropout(y, p, training=True) if p else x + y
    threshold = _threshold(p)
    if threshold is None:
        return x + y
    return torch.addcmul(x, y, _uniform16(y.shape) >= threshold, value=1.0 / (1.0 - p))


def _uniform16(shape: torch.Size) -> Tensor:
    """int16 uniform on [−32768, 32767], one per element: 16-bit slices of 64-bit random words."""
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    return bits.view(torch.int16)[:n].view(shape)


def _threshold(p: float) -> int | None:
    """The int16 value under which an element of `_uniform16` is dropped with probability p, p
    rounded to a multiple of 1/65536 within [1/65536, 65535/65536]; None where p rounds to 0
    (under 2⁻¹⁷: nothing to drop)."""
    count = min(round(p * 65536), 65535)  # (p ≥ 1 − 2⁻¹⁷ would be 32768, beyond int16)
    return count - 32768 if count else None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Σ over rows of the label-smoothed cross-entropy of `hidden` [N, D] @ `weight`ᵀ [D, V]
    against `targets` [N]; a scalar (fp32). Under autocast the products run in its dtype."""
    if hidden.device.type == "cuda":
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="sum")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = max(ROWS_MULTIPLE, BLOCK_BYTES // (4 * weight.shape[0]) // ROWS_MULTIPLE * ROWS_MULTIPLE)
    with torch.autocast(device, enabled=False):
        return _BlockedLinearCrossEntropy.apply(hidden, weight, targets, label_smoothing, dtype, rows)


class _BlockedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when gradients are wanted, both gradients too (the loss is
    a scalar, so backward only scales them): no logits are kept and none are recomputed."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, smoothing: float, dtype: torch.dtype,
                rows: int) -> Tensor:
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        h, w = hidden.to(dtype), weight.to(dtype)
        # Wᵀ made contiguous once: given a transposed operand, the CPU matrix product copied it
        # for every block (measured: 30 copies of [8000, 256] a step, 166 ms of a 540 ms step).
        # The weight's gradient is accumulated transposed, as Hᵀ G, for the same reason.
        wt = w.T.contiguous()  # [D, V]
        n, vocab = h.shape[0], w.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        grad_wt = torch.zeros(wt.shape, dtype=torch.float32, device=h.device) if want_grad else None
        # The logits' gradients of up to `span` rows are kept (in the products' dtype) and meet
        # the hidden states in one product, Hᵀ G, per span instead of one per block: fewer, larger
        # products, and one rounding to the dtype per span instead of one per block.
        span = max(rows, GRAD_BYTES // (h.element_size() * vocab) // rows * rows)
        g_rows = torch.empty((min(span, n) + ROWS_MULTIPLE, vocab), dtype=dtype, device=h.device) if want_grad else None
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            m = stop - start
            block = F.pad(h[start:stop], (0, 0, 0, -m % ROWS_MULTIPLE))  # [M, D], zero rows at the end
            if want_grad:
                at = start % span  # this block's rows in g_rows
                g = g_rows[at:at + block.shape[0]]  # [M, V]
            if want_grad and dtype == torch.float32:
                z = torch.matmul(block, wt, out=g)[:m]  # [m, V] logits, computed in place into G
            else:
                z = (block @ wt).float()[:m]  # [m, V] logits, fp32
            y = targets[start:stop, None]
            z_y = z.gather(1, y)
            z_mean = z.mean(dim=-1, keepdim=True)
            z_max = z.amax(dim=-1, keepdim=True)
            e = z.sub_(z_max).exp_()  # in place: exp(z − max), once for the loss and its gradient
            e_sum = e.sum(dim=-1, keepdim=True)
            lse = z_max + e_sum.log()  # [m, 1]
            total += ((1 - smoothing) * (lse - z_y) + smoothing * (lse - z_mean)).sum()
            if want_grad:  # in place: softmax − ε/V − (1 − ε)·onehot
                e.mul_(e_sum.reciprocal()).sub_(smoothing / vocab)
                e.scatter_add_(1, y, torch.full_like(lse, smoothing - 1))
                if e.data_ptr() != g.data_ptr():
                    g[:m] = e  # in the products' dtype
                g[m:].zero_()  # the padding rows (last block only): they meet only sliced-off rows; kept finite
                grad_h[start:stop] = (g @ w)[:m]
                if stop == n or (at + rows) % span == 0:
                    first = start - at
                    grad_wt += h[first:stop].T @ g_rows[:stop - first]
        grad_w = grad_wt.T.contiguous() if want_grad else None
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.to(h_dtype) * grad_total, (grad_w * grad_total).to(w_dtype), None, None, None, None)
