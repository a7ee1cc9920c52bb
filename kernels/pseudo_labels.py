"""Triton kernel of pseudo_labels: softmax(logits / T), its max, the confidence mask and the
argmax of each row, from one streaming pass over the logits (plus the write of probs)."""
import torch
import triton
import triton.language as tl

from mpl_fast.kernels.softmax_common import block_size, num_warps, online_softmax_update, safe_max


@triton.jit
def _pseudo_labels_kernel(logits_ptr, logits_stride, probs_ptr, probs_stride, max_prob_ptr,
                          mask_ptr, labels_ptr, C, inv_temperature, threshold,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    cols = tl.arange(0, BLOCK)
    m = -float("inf")
    s = 0.0
    best = 0
    for start in range(0, C, BLOCK):
        c = start + cols
        x = tl.load(x_row + c, mask=c < C, other=-float("inf")).to(tl.float32) * inv_temperature
        chunk_best = tl.argmax(x, 0, tie_break_left=True) + start
        best = tl.where(tl.max(x, 0) > m, chunk_best, best)  # strict: the first maximum wins
        m, s = online_softmax_update(m, s, x)
    m_safe = safe_max(m)
    inv_s = 1.0 / s
    p_row = probs_ptr + row * probs_stride
    for start in range(0, C, BLOCK):
        c = start + cols
        valid = c < C
        x = tl.load(x_row + c, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature
        tl.store(p_row + c, tl.exp(x - m_safe) * inv_s, mask=valid)
    max_prob = tl.exp(m - m_safe) * inv_s
    tl.store(max_prob_ptr + row, max_prob)
    tl.store(mask_ptr + row, (max_prob >= threshold).to(tl.float32))
    tl.store(labels_ptr + row, best.to(tl.int64))


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
    block = block_size(c)
    _pseudo_labels_kernel[(n,)](logits, logits.stride(0), probs, probs.stride(0), max_prob, mask,
                                labels, c, 1.0 / float(temperature), float(threshold),
                                BLOCK=block, num_warps=num_warps(block))
    return probs, max_prob, mask, labels
