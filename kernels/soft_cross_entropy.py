"""Triton kernel of soft_cross_entropy: per-row loss and, in the same pass, its gradient.

One program per row. Pass 1 streams the row once (online softmax; for soft targets also the
target mass and the target-weighted logits); pass 2, only when a gradient is wanted, writes
d loss_i / d logits_i = mask_i * (softmax_i * sum(t'_i) - t'_i), so backward is a scale.
"""
import torch
import triton
import triton.language as tl

from mpl_fast.kernels.softmax_common import block_size, num_warps, online_softmax_update, safe_max


@triton.jit
def _soft_cross_entropy_kernel(
        logits_ptr, logits_stride, index_ptr, probs_ptr, probs_stride, mask_ptr,
        loss_ptr, grad_ptr, grad_stride, C, label_smoothing,
        HARD: tl.constexpr, SMOOTH: tl.constexpr, HAS_MASK: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    t_row = probs_ptr + row * probs_stride
    cols = tl.arange(0, BLOCK)
    off = label_smoothing / C
    keep = 1.0 - label_smoothing

    m = -float("inf")
    s = 0.0
    sum_t = 0.0
    sum_tx = 0.0
    sum_x = 0.0
    for start in range(0, C, BLOCK):
        c = start + cols
        valid = c < C
        x = tl.load(x_row + c, mask=valid, other=-float("inf")).to(tl.float32)
        m, s = online_softmax_update(m, s, x)
        if HARD:
            if SMOOTH:
                sum_x += tl.sum(tl.where(valid, x, 0.0), 0)
        else:
            t = tl.load(t_row + c, mask=valid, other=0.0).to(tl.float32)
            if SMOOTH:
                t = tl.where(valid, keep * t + off, 0.0)
            sum_t += tl.sum(t, 0)
            # a zero target weight contributes nothing, even against a -inf logit
            sum_tx += tl.sum(tl.where(t != 0.0, t * x, 0.0), 0)

    lse = safe_max(m) + tl.log(s)
    if HARD:
        y = tl.load(index_ptr + row)
        in_range = (y >= 0) & (y < C)
        x_y = tl.load(x_row + tl.where(in_range, y, 0)).to(tl.float32)
        sum_t = 1.0
        if SMOOTH:
            sum_tx = keep * x_y + off * sum_x
        else:
            sum_tx = x_y
    loss = lse * sum_t - sum_tx
    if HARD:
        loss = tl.where(in_range, loss, float("nan"))
    if HAS_MASK:
        mk = tl.load(mask_ptr + row).to(tl.float32)
        loss = tl.where(mk != 0.0, loss * mk, 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        g_row = grad_ptr + row * grad_stride
        for start in range(0, C, BLOCK):
            c = start + cols
            valid = c < C
            x = tl.load(x_row + c, mask=valid, other=-float("inf")).to(tl.float32)
            p = tl.exp(x - lse)
            if HARD:
                t = tl.where(c == y, keep, 0.0)
                if SMOOTH:
                    t += off
            else:
                t = tl.load(t_row + c, mask=valid, other=0.0).to(tl.float32)
                if SMOOTH:
                    t = keep * t + off
            g = p * sum_t - t
            if HAS_MASK:
                g = g * mk
            tl.store(g_row + c, g.to(grad_ptr.dtype.element_ty), mask=valid)


def soft_cross_entropy_forward(logits, target_index, target_probs, mask, label_smoothing,
                               compute_grad):
    """Launch the kernel: (per-row loss float32 [N], grad like logits or an empty tensor)."""
    n, c = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    hard = target_index is not None
    # the kernel indexes targets and mask by row: make strided views dense
    if hard:
        target_index = target_index.contiguous()
    elif target_probs.stride(1) != 1:
        target_probs = target_probs.contiguous()
    if mask is not None:
        mask = mask.contiguous()
    if n == 0:
        return loss, grad
    block = block_size(c)
    dummy = loss
    _soft_cross_entropy_kernel[(n,)](
        logits, logits.stride(0),
        target_index if hard else dummy,
        dummy if hard else target_probs, 0 if hard else target_probs.stride(0),
        mask if mask is not None else dummy,
        loss, grad if compute_grad else dummy, grad.stride(0) if compute_grad else 0,
        c, float(label_smoothing),
        HARD=hard, SMOOTH=label_smoothing > 0, HAS_MASK=mask is not None,
        COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=num_warps(block))
    return loss, grad
