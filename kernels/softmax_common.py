"""Triton helpers shared by the loss kernels: the online (streaming) softmax update."""
import triton
import triton.language as tl


@triton.jit
def online_softmax_update(m, s, x):
    """Fold a chunk x into the running max m and sum s of exp(x - m) over a row.

    -inf entries (and rows that are -inf so far) are handled without producing NaN.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
    return m_new, s


@triton.jit
def safe_max(m):
    """The running max with an all -inf row mapped to 0, so that exp(x - m) stays finite."""
    return tl.where(m == -float("inf"), 0.0, m)


def block_size(num_classes: int, max_block: int = 4096) -> int:
    """Columns one program reads per loop iteration: the whole row when it fits."""
    return min(triton.next_power_of_2(max(num_classes, 2)), max_block)


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
