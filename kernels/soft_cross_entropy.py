"""Triton kernel of soft_cross_entropy: per-row loss and, in the same pass, its gradient.

One program per tile of rows (several rows to a program when C is small; or persistent
programs looping over the tiles: softmax_common.ROW_STAGES). When a row fits in one tile
(C <= 4096) it is read once and the gradient comes from registers. Otherwise pass 1
streams each row (online softmax, its statistics per row or per lane: see softmax_common; for
soft targets also the target mass and the target-weighted logits) and pass 2, only when a
gradient is wanted, writes
grad_scale * d loss_i / d logits_i = grad_scale * mask_i * (softmax_i * sum(t'_i) - t'_i)
(grad_scale is 1/N for a mean), so backward is a scale, and none when grad_output is 1.
A row whose mask is 0 gets loss and gradient 0 whatever it holds. A streamed row is then never
read; a one-tile row is loaded together with its mask, its class index and its target rather
than after them (at 1000 classes the kernel is bound by the latency of loads that wait on each
other, not by bandwidth: the H200 took as long in bf16 as in fp32), and the target's logit comes
from the registers instead of a load of its own.
"""
import torch
import triton
import triton.language as tl

from mpl_fast.kernels.softmax_common import (aligned, lane_softmax_combine, lane_softmax_update,
                                             launch, max_sum, max_sum_sum,
                                             online_softmax_update,
                                             reference_logit, row_alignment, safe_max,
                                             tile_for, tile_rows)


@triton.jit
def _load_chunk(x_rows, t_rows, c, ok, keep, off, HARD: tl.constexpr, SMOOTH: tl.constexpr,
                POLICY: tl.constexpr):
    """Logits (fp32, -inf outside the row) and, for soft targets, the smoothed targets; POLICY:
    the L2 eviction hint of the loads (softmax_common.EVICTION_HINTS)."""
    x = tl.load(x_rows + c, mask=ok, other=-float("inf"), eviction_policy=POLICY).to(tl.float32)
    t = x  # hard targets are built from the index where needed
    if not HARD:
        t = tl.load(t_rows + c, mask=ok, other=0.0, eviction_policy=POLICY).to(tl.float32)
        if SMOOTH:
            t = tl.where(ok, keep * t + off, 0.0)
    return x, t


@triton.jit
def _grad_chunk(softmax, t, c, y, sum_t, mk, read, keep, off, grad_scale, HARD: tl.constexpr,
                SMOOTH: tl.constexpr, HAS_MASK: tl.constexpr):
    """grad_scale * mask * (softmax * sum(t') - t') of one chunk; 0 where the mask dropped the
    row (`read` False: nothing was loaded there)."""
    if HARD:
        t = tl.where(c == y[:, None], keep, 0.0)
        if SMOOTH:
            t += off
    g = (softmax * sum_t[:, None] - t) * grad_scale
    if HAS_MASK:
        g = tl.where(read, g * mk[:, None], 0.0)
    return g


@triton.jit
def _soft_cross_entropy_kernel(
        logits_ptr, logits_stride, index_ptr, probs_ptr, probs_stride, mask_ptr,
        loss_ptr, grad_ptr, grad_stride, N, C, label_smoothing, grad_scale,
        HARD: tl.constexpr, SMOOTH: tl.constexpr, HAS_MASK: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
        SINGLE: tl.constexpr, LANES: tl.constexpr, STAGES: tl.constexpr,
        ROW_STAGES: tl.constexpr, ALIGN: tl.constexpr, EVICT: tl.constexpr):
    if ROW_STAGES > 1:  # persistent: the next tiles' rows load while this one is reduced
        for tile in tl.range(tl.program_id(0), tl.cdiv(N, ROWS), tl.num_programs(0),
                             num_stages=ROW_STAGES):
            _soft_cross_entropy_tile(
                tile, logits_ptr, logits_stride, index_ptr, probs_ptr, probs_stride, mask_ptr,
                loss_ptr, grad_ptr, grad_stride, N, C, label_smoothing, grad_scale, HARD,
                SMOOTH, HAS_MASK, COMPUTE_GRAD, ROWS, BLOCK, SINGLE, LANES, STAGES, ALIGN, EVICT)
    else:
        _soft_cross_entropy_tile(
            tl.program_id(0), logits_ptr, logits_stride, index_ptr, probs_ptr, probs_stride,
            mask_ptr, loss_ptr, grad_ptr, grad_stride, N, C, label_smoothing, grad_scale, HARD,
            SMOOTH, HAS_MASK, COMPUTE_GRAD, ROWS, BLOCK, SINGLE, LANES, STAGES, ALIGN, EVICT)


@triton.jit
def _soft_cross_entropy_tile(
        tile, logits_ptr, logits_stride, index_ptr, probs_ptr, probs_stride, mask_ptr,
        loss_ptr, grad_ptr, grad_stride, N, C, label_smoothing, grad_scale,
        HARD: tl.constexpr, SMOOTH: tl.constexpr, HAS_MASK: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
        SINGLE: tl.constexpr, LANES: tl.constexpr, STAGES: tl.constexpr,
        ALIGN: tl.constexpr, EVICT: tl.constexpr):
    """One tile of ROWS rows."""
    C = aligned(C, ALIGN)
    logits_stride = aligned(logits_stride, ALIGN)
    probs_stride = aligned(probs_stride, ALIGN)
    grad_stride = aligned(grad_stride, ALIGN)
    rows, row_ok = tile_rows(tile, N, ROWS)
    x_rows = logits_ptr + rows[:, None] * logits_stride
    t_rows = probs_ptr + rows[:, None] * probs_stride
    cols = tl.arange(0, BLOCK)[None, :]
    off = label_smoothing / C
    keep = 1.0 - label_smoothing
    # rows to read: a row whose mask is 0 has loss and gradient 0, and is never read
    todo = row_ok
    mk = tl.zeros([ROWS], tl.float32)  # stands in for the mask when there is none
    if HAS_MASK:
        mk = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        todo = row_ok & (mk != 0.0)

    y = rows  # stands in for the class index when the targets are soft
    if HARD:
        y = tl.load(index_ptr + rows, mask=row_ok, other=0)
        in_range = (y >= 0) & (y < C)
    # the reference the target sums are taken against; plain class indices need none (their
    # loss is (m - x_y) + log(s), both terms small)
    ref = tl.zeros([ROWS], tl.float32)
    if SMOOTH or not HARD:
        ref_rows = row_ok  # a one-tile row's first logit loads with its row, not after the mask
        if not SINGLE:
            ref_rows = todo  # a streamed row the mask drops is never read
        ref = reference_logit(logits_ptr + rows * logits_stride, ref_rows)

    if SINGLE:  # the row is one tile: read once, the gradient comes from registers
        read = todo[:, None] & (cols < C)  # where the values count
        # loaded whatever the mask (not waiting for it); a masked row's values are dropped
        x, t = _load_chunk(x_rows, t_rows, cols, row_ok[:, None] & (cols < C), keep, off, HARD,
                           SMOOTH, "")
        # two reductions across the warps, not four: the max with the two target sums, then
        # the sum of exp
        if HARD and not SMOOTH:  # the target's logit (from the registers) alone
            m, row_a = tl.reduce((x, tl.where(cols == y[:, None], x, 0.0)), 1, max_sum)
            row_b = tl.zeros([ROWS], tl.float32)
        else:
            if HARD:  # the target's logit and the row's sum (for the smoothing)
                part_a = tl.where(cols == y[:, None], x, 0.0)
                part_b = tl.where(read, x - ref[:, None], 0.0)
            else:  # the target mass and the target-weighted logits
                part_a = t
                part_b = tl.where(t != 0.0, t * (x - ref[:, None]), 0.0)
            m, row_a, row_b = tl.reduce((x, part_a, part_b), 1, max_sum_sum)
        e = tl.exp(x - safe_max(m)[:, None])  # kept: the gradient's softmax is e / s
        s = tl.sum(e, 1)
    else:
        m = tl.full([ROWS], -float("inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        m_lane = tl.full([ROWS, BLOCK], -float("inf"), tl.float32)  # LANES: per-lane stats
        s_lane = tl.zeros([ROWS, BLOCK], tl.float32)
        # the target sums accumulate per lane and are reduced once after the loop: fewer
        # reductions per chunk, and triton 3.6 fails to compile loop-carried row sums in the
        # 1-row fp32 case
        acc_t = tl.zeros([ROWS, BLOCK], tl.float32)
        acc_tx = tl.zeros([ROWS, BLOCK], tl.float32)
        acc_x = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in tl.range(0, C, BLOCK, num_stages=STAGES):
            c = start + cols
            read = todo[:, None] & (c < C)
            # kept in L2 for the gradient's pass
            x, t = _load_chunk(x_rows, t_rows, c, read, keep, off, HARD, SMOOTH,
                               "evict_last" if EVICT and COMPUTE_GRAD else "")
            if LANES:
                m_lane, s_lane = lane_softmax_update(m_lane, s_lane, x, 1.0)
            else:
                m, s = online_softmax_update(m, s, x, tl.max(x, 1), 1.0)
            if HARD:
                if SMOOTH:
                    acc_x += tl.where(read, x - ref[:, None], 0.0)
            else:
                acc_t += t
                # a zero target weight contributes nothing, even against a -inf logit
                acc_tx += tl.where(t != 0.0, t * (x - ref[:, None]), 0.0)
        if LANES:
            m, s = lane_softmax_combine(m_lane, s_lane, 1.0)
        if HARD:
            row_a = tl.load(logits_ptr + rows * logits_stride + tl.where(in_range, y, 0),
                            mask=todo, other=0.0).to(tl.float32)
            row_b = tl.zeros([ROWS], tl.float32)
            if SMOOTH:
                row_b = tl.sum(acc_x, 1)
        else:
            row_a = tl.sum(acc_t, 1)
            row_b = tl.sum(acc_tx, 1)

    # sum_tx: the targets' weighted sum of (logit - ref); loss = sum_t * (m - ref + log(s)) -
    # sum_tx, so that no large logit meets a small term: m + log(s) rounds log(s) away at
    # |m| ~ 4000
    if HARD:  # row_a: the target's logit, row_b: the sum of the row's logits less ref
        sum_t = tl.full([ROWS], 1.0, tl.float32)
        if SMOOTH:
            sum_tx = keep * (row_a - ref) + off * row_b
        else:
            sum_tx = row_a - ref
    else:  # row_a: the target mass, row_b: the target-weighted sum of the logits less ref
        sum_t = row_a
        sum_tx = row_b
    m_safe = safe_max(m)
    log_s = tl.log(s)
    loss = ((m_safe - ref) * sum_t - sum_tx) + log_s * sum_t
    if HARD:
        loss = tl.where(in_range, loss, float("nan"))
    if HAS_MASK:  # a masked row was not read: its loss is 0 whatever was computed from nothing
        loss = tl.where(todo, loss * mk, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)

    if COMPUTE_GRAD:
        g_rows = grad_ptr + rows[:, None] * grad_stride
        if SINGLE:  # the softmax from the exponentials already in registers: no exp here
            g = _grad_chunk(e * (1.0 / s)[:, None], t, cols, y, sum_t, mk, read, keep, off,
                            grad_scale, HARD, SMOOTH, HAS_MASK)
            tl.store(g_rows + cols, g.to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < C))
        else:  # exp((x - m) - log(s)), not exp(x - (m + log(s))): torch's log_softmax's rounding
            for start in tl.range(0, C, BLOCK, num_stages=STAGES):
                c = start + cols
                read = todo[:, None] & (c < C)
                x, t = _load_chunk(x_rows, t_rows, c, read, keep, off, HARD, SMOOTH,
                                   "evict_first" if EVICT else "")  # their last use
                softmax = tl.exp((x - m_safe[:, None]) - log_s[:, None])
                g = _grad_chunk(softmax, t, c, y, sum_t, mk, read, keep, off, grad_scale, HARD,
                                SMOOTH, HAS_MASK)
                tl.store(g_rows + c, g.to(grad_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & (c < C),
                         eviction_policy="evict_first" if EVICT else "")


def soft_cross_entropy_forward(logits, target_index, target_probs, mask, label_smoothing,
                               compute_grad, grad_scale=1.0):
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
    tile = tile_for(c)
    # the row strides the kernel gets (0 where it reads no such rows: divides nothing away)
    probs_stride = 0 if hard else target_probs.stride(0)
    grad_stride = grad.stride(0) if compute_grad else 0
    dummy = loss
    launch(
        _soft_cross_entropy_kernel, tile, n, logits.device,
        logits, logits.stride(0),
        target_index if hard else dummy,
        dummy if hard else target_probs, probs_stride,
        mask if mask is not None else dummy,
        loss, grad if compute_grad else dummy, grad_stride,
        n, c, float(label_smoothing), float(grad_scale),
        HARD=hard, SMOOTH=label_smoothing > 0, HAS_MASK=mask is not None,
        COMPUTE_GRAD=compute_grad, ROWS=tile.rows, BLOCK=tile.block, SINGLE=tile.single,
        LANES=tile.lanes, STAGES=tile.stages, ROW_STAGES=tile.row_stages,
        ALIGN=row_alignment(c, logits.stride(0), probs_stride, grad_stride), EVICT=tile.evict)
    return loss, grad
