"""Triton kernel of pseudo_labels: softmax(logits / T), its max, the confidence mask and the
argmax of each row. A row that fits in one tile (C <= 4096) is read once; a longer row is
streamed twice (statistics, then probs), the second time from the L2 cache where it still holds
the row (softmax_common.EVICTION_HINTS, off until a GPU times it, asks the cache to keep it)."""
import torch
import triton
import triton.language as tl

from mpl_fast.kernels.softmax_common import (aligned, lane_softmax_combine, lane_softmax_update,
                                             launch, online_softmax_update, row_alignment,
                                             safe_max, tile_for, tile_rows)


@triton.jit
def _pseudo_labels_kernel(logits_ptr, logits_stride, probs_ptr, probs_stride, max_prob_ptr,
                          mask_ptr, labels_ptr, N, C, inv_temperature, threshold,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                          LANES: tl.constexpr, STAGES: tl.constexpr, ROW_STAGES: tl.constexpr,
                          ALIGN: tl.constexpr, EVICT: tl.constexpr):
    if ROW_STAGES > 1:  # persistent: the next tiles' rows load while this one is reduced
        for tile in tl.range(tl.program_id(0), tl.cdiv(N, ROWS), tl.num_programs(0),
                             num_stages=ROW_STAGES):
            _pseudo_labels_tile(tile, logits_ptr, logits_stride, probs_ptr, probs_stride,
                                max_prob_ptr, mask_ptr, labels_ptr, N, C, inv_temperature,
                                threshold, ROWS, BLOCK, SINGLE, LANES, STAGES, ALIGN, EVICT)
    else:
        _pseudo_labels_tile(tl.program_id(0), logits_ptr, logits_stride, probs_ptr,
                            probs_stride, max_prob_ptr, mask_ptr, labels_ptr, N, C,
                            inv_temperature, threshold, ROWS, BLOCK, SINGLE, LANES, STAGES,
                            ALIGN, EVICT)


@triton.jit
def _pseudo_labels_tile(tile, logits_ptr, logits_stride, probs_ptr, probs_stride, max_prob_ptr,
                        mask_ptr, labels_ptr, N, C, inv_temperature, threshold,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                        LANES: tl.constexpr, STAGES: tl.constexpr, ALIGN: tl.constexpr,
                        EVICT: tl.constexpr):
    """One tile of ROWS rows."""
    C = aligned(C, ALIGN)
    logits_stride = aligned(logits_stride, ALIGN)
    probs_stride = aligned(probs_stride, ALIGN)
    rows, row_ok = tile_rows(tile, N, ROWS)
    x_rows = logits_ptr + rows[:, None] * logits_stride
    p_rows = probs_ptr + rows[:, None] * probs_stride
    cols = tl.arange(0, BLOCK)[None, :]
    if SINGLE:  # the row is one tile: read once, probs written from registers
        ok = row_ok[:, None] & (cols < C)
        # max, argmax and differences of the logits, scaled by 1/T after (softmax_common: a
        # scaled max subtracted would be contracted into an FMA)
        x = tl.load(x_rows + cols, mask=ok, other=-float("inf")).to(tl.float32)
        # the max and its column in one reduction (the first maximum wins)
        m, best = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
        m_safe = safe_max(m)
        e = tl.exp((x - m_safe[:, None]) * inv_temperature)
        inv_s = 1.0 / tl.sum(e, 1)
        tl.store(p_rows + cols, e * inv_s[:, None], mask=ok)
    else:
        m = tl.full([ROWS], -float("inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        best = tl.zeros([ROWS], tl.int32)
        # LANES: max, sum and the column of the max per lane, combined after the loop
        m_lane = tl.full([ROWS, BLOCK], -float("inf"), tl.float32)
        s_lane = tl.zeros([ROWS, BLOCK], tl.float32)
        best_lane = tl.zeros([ROWS, BLOCK], tl.int32) + cols
        for start in tl.range(0, C, BLOCK, num_stages=STAGES):
            c = start + cols
            ok = row_ok[:, None] & (c < C)
            x = tl.load(x_rows + c, mask=ok, other=-float("inf"),  # kept for the second pass
                        eviction_policy="evict_last" if EVICT else "").to(tl.float32)
            if LANES:  # strict: a lane keeps its first maximum
                best_lane = tl.where(x > m_lane, c, best_lane)
                m_lane, s_lane = lane_softmax_update(m_lane, s_lane, x, inv_temperature)
            else:  # the chunk's max and its column in one reduction
                chunk_m, chunk_best = tl.max(x, 1, return_indices=True,
                                             return_indices_tie_break_left=True)
                best = tl.where(chunk_m > m, chunk_best + start, best)  # strict: the first max
                m, s = online_softmax_update(m, s, x, chunk_m, inv_temperature)
        if LANES:  # the first maximum: the lowest column among the lanes' first maxima
            m, s = lane_softmax_combine(m_lane, s_lane, inv_temperature)
            best = tl.min(tl.where(m_lane == m[:, None], best_lane, C), 1)
        m_safe = safe_max(m)
        inv_s = 1.0 / s
        for start in tl.range(0, C, BLOCK, num_stages=STAGES):
            c = start + cols
            ok = row_ok[:, None] & (c < C)
            x = tl.load(x_rows + c, mask=ok, other=-float("inf"),  # its last use
                        eviction_policy="evict_first" if EVICT else "").to(tl.float32)
            tl.store(p_rows + c, tl.exp((x - m_safe[:, None]) * inv_temperature) * inv_s[:, None],
                     mask=ok, eviction_policy="evict_first" if EVICT else "")
    max_prob = tl.exp((m - m_safe) * inv_temperature) * inv_s
    tl.store(max_prob_ptr + rows, max_prob, mask=row_ok)
    tl.store(mask_ptr + rows, (max_prob >= threshold).to(tl.float32), mask=row_ok)
    tl.store(labels_ptr + rows, best.to(tl.int64), mask=row_ok)


def pseudo_labels_forward(logits, temperature, threshold):
    n, c = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    probs = torch.empty(n, c, dtype=torch.float32, device=dev)
    max_prob = torch.empty(n, dtype=torch.float32, device=dev)
    mask = torch.empty(n, dtype=torch.float32, device=dev)
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return probs, max_prob, mask, labels
    tile = tile_for(c)
    launch(
        _pseudo_labels_kernel, tile, n, dev,
        logits, logits.stride(0), probs, probs.stride(0), max_prob, mask, labels, n, c,
        1.0 / float(temperature), float(threshold),
        ROWS=tile.rows, BLOCK=tile.block, SINGLE=tile.single,
        LANES=tile.lanes, STAGES=tile.stages, ROW_STAGES=tile.row_stages,
        ALIGN=row_alignment(c, logits.stride(0), probs.stride(0)), EVICT=tile.evict)
    return probs, max_prob, mask, labels
