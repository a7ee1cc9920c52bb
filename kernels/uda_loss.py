"""Triton kernel of uda_loss: targets q = softmax(weak / T) (no gradient), a confidence mask
max(q) >= threshold, and the masked soft cross-entropy of the strong logits against q, with its
gradient grad_scale * mask * (softmax(strong) - q) written in the same call. A row that fits in
one tile (C <= 4096) of both inputs is read once, both rows loaded together (the strong row does
not wait for the mask its weak row decides: at 1000 classes the kernel is bound by the latency
of loads that wait on each other, not by bandwidth); longer rows are streamed once for the loss
and once more for the gradient, except the rows the mask drops (their gradient is 0: written
without reading them again). A masked row's loss and gradient are 0 whatever it holds."""
import torch
import triton
import triton.language as tl

from mpl_fast.kernels.softmax_common import (aligned, lane_softmax_combine, lane_softmax_update,
                                             lane_weight, launch, max_max, reference_logit,
                                             row_alignment, running_max, safe_max, sum_sum_sum,
                                             tile_for, tile_rows)


@triton.jit
def _confident(mw, sw, threshold, inv_t):
    """The mask, 1.0 where the largest target probability max(q) = exp((mw - mw) / T) / sw
    reaches the threshold (mw: the running max of weak, sw: the sum of exp((weak - mw) / T))."""
    return (tl.exp((mw - safe_max(mw)) * inv_t) / sw >= threshold).to(tl.float32)


@triton.jit
def _lane_weak_update(mw, sw, qs, w, x, inv_t):
    """Per lane ([ROWS, BLOCK] each): the running max mw of weak, the sum sw of
    exp((weak - mw) / T), and qs, those weights times the strong logits; one exp an element, the
    new element's weight (not above the lane's max) or the rescale of the lane's sums (above)."""
    mw_new, e, up = lane_weight(mw, w, inv_t)
    sw = tl.where(up, sw * e + 1.0, sw + e)
    # a zero weight adds nothing, even against a -inf strong logit
    qs = tl.where(up, tl.where(e != 0.0, qs * e, 0.0) + x, qs + tl.where(e != 0.0, e * x, 0.0))
    return mw_new, sw, qs


@triton.jit
def _uda_loss_kernel(weak_ptr, weak_stride, strong_ptr, strong_stride, loss_ptr, mask_ptr,
                     grad_ptr, grad_stride, N, C, inv_temperature, threshold, grad_scale,
                     COMPUTE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     SINGLE: tl.constexpr, LANES: tl.constexpr, STAGES: tl.constexpr,
                     ROW_STAGES: tl.constexpr, ALIGN: tl.constexpr, EVICT: tl.constexpr):
    if ROW_STAGES > 1:  # persistent: the next tiles' rows load while this one is reduced
        for tile in tl.range(tl.program_id(0), tl.cdiv(N, ROWS), tl.num_programs(0),
                             num_stages=ROW_STAGES):
            _uda_loss_tile(tile, weak_ptr, weak_stride, strong_ptr, strong_stride, loss_ptr,
                           mask_ptr, grad_ptr, grad_stride, N, C, inv_temperature, threshold,
                           grad_scale, COMPUTE_GRAD, ROWS, BLOCK, SINGLE, LANES, STAGES, ALIGN,
                           EVICT)
    else:
        _uda_loss_tile(tl.program_id(0), weak_ptr, weak_stride, strong_ptr, strong_stride,
                       loss_ptr, mask_ptr, grad_ptr, grad_stride, N, C, inv_temperature,
                       threshold, grad_scale, COMPUTE_GRAD, ROWS, BLOCK, SINGLE, LANES, STAGES,
                       ALIGN, EVICT)


@triton.jit
def _uda_loss_tile(tile, weak_ptr, weak_stride, strong_ptr, strong_stride, loss_ptr, mask_ptr,
                   grad_ptr, grad_stride, N, C, inv_temperature, threshold, grad_scale,
                   COMPUTE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                   SINGLE: tl.constexpr, LANES: tl.constexpr, STAGES: tl.constexpr,
                   ALIGN: tl.constexpr, EVICT: tl.constexpr):
    """One tile of ROWS rows."""
    C = aligned(C, ALIGN)
    weak_stride = aligned(weak_stride, ALIGN)
    strong_stride = aligned(strong_stride, ALIGN)
    grad_stride = aligned(grad_stride, ALIGN)
    rows, row_ok = tile_rows(tile, N, ROWS)
    w_rows = weak_ptr + rows[:, None] * weak_stride
    s_rows = strong_ptr + rows[:, None] * strong_stride
    cols = tl.arange(0, BLOCK)[None, :]
    if SINGLE:  # the row is one tile: both inputs read once, the gradient from registers
        ok = row_ok[:, None] & (cols < C)
        # the weak row decides the mask; the strong row is loaded with it, before the first
        # reduction (a load placed after one waits for its barriers: two memory latencies a
        # row instead of one), and dropped where the mask is 0
        # the weak logits' differences are scaled by 1/T after the max is subtracted, never
        # before (softmax_common: a scaled max subtracted would be contracted into an FMA)
        w = tl.load(w_rows + cols, mask=ok, other=-float("inf")).to(tl.float32)
        x = tl.load(s_rows + cols, mask=ok, other=-float("inf")).to(tl.float32)
        # two joint reductions (both maxima, then the three sums) instead of five in a row
        mw, ms = tl.reduce((w, x), 1, max_max)
        e = tl.exp((w - safe_max(mw)[:, None]) * inv_temperature)
        ref = safe_max(ms)  # qs sums the target weights times strong - ref: see below
        p = tl.exp(x - ref[:, None])  # kept: the gradient's softmax is p / ss
        sw, qs, ss = tl.reduce((e, tl.where(e != 0.0, e * (x - ref[:, None]), 0.0), p), 1,
                               sum_sum_sum)
        mk = _confident(mw, sw, threshold, inv_temperature)
        read = ok & (mk != 0.0)[:, None]
    else:
        mw = tl.full([ROWS], -float("inf"), tl.float32)
        sw = tl.zeros([ROWS], tl.float32)
        ms = tl.full([ROWS], -float("inf"), tl.float32)
        ss = tl.zeros([ROWS], tl.float32)
        # sum_c exp((w_c - mw) / T) * (strong_c - ref), rescaled with mw; ref: the strong row's
        # first logit (0 if not finite), so that large logits lose no precision to the sum
        qs = tl.zeros([ROWS], tl.float32)
        ref = reference_logit(strong_ptr + rows * strong_stride, row_ok)
        # LANES: the same statistics per lane, combined after the loop
        mw_l = tl.full([ROWS, BLOCK], -float("inf"), tl.float32)
        sw_l = tl.zeros([ROWS, BLOCK], tl.float32)
        qs_l = tl.zeros([ROWS, BLOCK], tl.float32)
        ms_l = tl.full([ROWS, BLOCK], -float("inf"), tl.float32)
        ss_l = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in tl.range(0, C, BLOCK, num_stages=STAGES):
            c = start + cols
            ok = row_ok[:, None] & (c < C)
            # kept in L2 for the gradient's pass
            w = tl.load(w_rows + c, mask=ok, other=-float("inf"),
                        eviction_policy="evict_last" if EVICT and COMPUTE_GRAD else "").to(
                            tl.float32)
            x = tl.load(s_rows + c, mask=ok, other=-float("inf"),
                        eviction_policy="evict_last" if EVICT and COMPUTE_GRAD else "").to(
                            tl.float32)
            if LANES:
                mw_l, sw_l, qs_l = _lane_weak_update(mw_l, sw_l, qs_l, w, x - ref[:, None],
                                                     inv_temperature)
                ms_l, ss_l = lane_softmax_update(ms_l, ss_l, x, 1.0)
            else:  # two joint reductions a chunk (the maxima, then the sums), not five
                chunk_mw, chunk_ms = tl.reduce((w, x), 1, max_max)
                mw, mw_safe, w_scale = running_max(mw, chunk_mw, inv_temperature)
                ms, ms_safe, s_scale = running_max(ms, chunk_ms, 1.0)
                e = tl.exp((w - mw_safe[:, None]) * inv_temperature)
                chunk_sw, chunk_qs, chunk_ss = tl.reduce(
                    (e, tl.where(e != 0.0, e * (x - ref[:, None]), 0.0),
                     tl.exp(x - ms_safe[:, None])), 1, sum_sum_sum)
                sw = sw * w_scale + chunk_sw
                qs = qs * w_scale + chunk_qs
                ss = ss * s_scale + chunk_ss
        if LANES:
            mw = tl.max(mw_l, 1)
            f = tl.exp((mw_l - safe_max(mw)[:, None]) * inv_temperature)
            sw = tl.sum(sw_l * f, 1)
            qs = tl.sum(tl.where(f != 0.0, qs_l * f, 0.0), 1)
            ms, ss = lane_softmax_combine(ms_l, ss_l, 1.0)
    mw_safe = safe_max(mw)
    if not SINGLE:
        mk = _confident(mw, sw, threshold, inv_temperature)
    # loss = max + log(ss) - sum(q * strong), written so that no large logit meets a small term
    # (max + log(ss) rounds log(ss) away at |max| ~ 4000; torch's log_softmax does not)
    strong_max = safe_max(ms)
    log_ss = tl.log(ss)
    loss = ((strong_max - ref) - qs / sw) + log_ss
    tl.store(loss_ptr + rows, tl.where(mk != 0.0, loss, 0.0), mask=row_ok)
    tl.store(mask_ptr + rows, mk, mask=row_ok)
    if COMPUTE_GRAD:
        g_rows = grad_ptr + rows[:, None] * grad_stride
        inv_sw = 1.0 / sw
        row_scale = (mk * grad_scale)[:, None]
        if SINGLE:  # from the exponentials already in registers: no exp here
            g = (p * (1.0 / ss)[:, None] - e * inv_sw[:, None]) * row_scale
            g = tl.where(read, g, 0.0)
            tl.store(g_rows + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)
        else:
            # a masked row's gradient is 0: it is written without reading the row again
            keep = row_ok & (mk != 0.0)
            for start in tl.range(0, C, BLOCK, num_stages=STAGES):
                c = start + cols
                ok = row_ok[:, None] & (c < C)
                read = keep[:, None] & (c < C)
                w = tl.load(w_rows + c, mask=read, other=-float("inf"),  # their last use
                            eviction_policy="evict_first" if EVICT else "").to(tl.float32)
                x = tl.load(s_rows + c, mask=read, other=-float("inf"),
                            eviction_policy="evict_first" if EVICT else "").to(tl.float32)
                q = tl.exp((w - mw_safe[:, None]) * inv_temperature) * inv_sw[:, None]
                # exp((x - max) - log(ss)), not exp(x - (max + log(ss))): torch's log_softmax's
                # rounding
                g = (tl.exp((x - strong_max[:, None]) - log_ss[:, None]) - q) * row_scale
                g = tl.where(read, g, 0.0)
                tl.store(g_rows + c, g.to(grad_ptr.dtype.element_ty), mask=ok,
                         eviction_policy="evict_first" if EVICT else "")


def uda_loss_forward(weak, strong, temperature, threshold, compute_grad, grad_scale=1.0):
    n, c = strong.shape
    if weak.stride(1) != 1:
        weak = weak.contiguous()
    if strong.stride(1) != 1:
        strong = strong.contiguous()
    dev = strong.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    mask = torch.empty(n, dtype=torch.float32, device=dev)
    grad = torch.empty_like(strong) if compute_grad else strong.new_empty(0)
    if n == 0:
        return loss, mask, grad
    tile = tile_for(c)
    grad_stride = grad.stride(0) if compute_grad else 0  # 0: no rows (divides nothing away)
    launch(
        _uda_loss_kernel, tile, n, dev,
        weak, weak.stride(0), strong, strong.stride(0), loss, mask,
        grad if compute_grad else loss, grad_stride,
        n, c, 1.0 / float(temperature), float(threshold), float(grad_scale),
        COMPUTE_GRAD=compute_grad, ROWS=tile.rows, BLOCK=tile.block, SINGLE=tile.single,
        LANES=tile.lanes, STAGES=tile.stages, ROW_STAGES=tile.row_stages,
        ALIGN=row_alignment(c, weak.stride(0), strong.stride(0), grad_stride), EVICT=tile.evict)
    return loss, mask, grad
