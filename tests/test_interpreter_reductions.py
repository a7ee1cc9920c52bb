"""The numpy path the kernels' joint reductions take under the interpreter
(kernels/interpreter_reductions.py) gives what the interpreter's own element-by-element fold of
the same combine functions gives."""
import os

import pytest
import torch

from tests import seeds

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="only the interpreter is patched")


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from mpl_fast.kernels.softmax_common import (  # noqa: E402
    interpreter_quiet, max_max, max_sum, max_sum_sum, sum_sum_sum)


@triton.jit
def _joint(x_ptr, y_ptr, out_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + rows * BLOCK + cols)
    y = tl.load(y_ptr + rows * BLOCK + cols)
    a, b = tl.reduce((x, y), 1, max_max)
    c, d, e = tl.reduce((x, y, x * y), 1, max_sum_sum)
    f, g, h = tl.reduce((y, x, tl.exp(x)), 1, sum_sum_sum)
    i, j = tl.reduce((y, x * y), 1, max_sum)
    r = tl.arange(0, ROWS)
    tl.store(out_ptr + r, a)
    tl.store(out_ptr + ROWS + r, b)
    tl.store(out_ptr + 2 * ROWS + r, c)
    tl.store(out_ptr + 3 * ROWS + r, d)
    tl.store(out_ptr + 4 * ROWS + r, e)
    tl.store(out_ptr + 5 * ROWS + r, f)
    tl.store(out_ptr + 6 * ROWS + r, g)
    tl.store(out_ptr + 7 * ROWS + r, h)
    tl.store(out_ptr + 8 * ROWS + r, i)
    tl.store(out_ptr + 9 * ROWS + r, j)


def test_numpy_joint_reductions_equal_the_interpreters_own(monkeypatch):
    from triton.runtime import interpreter

    from mpl_fast.kernels import interpreter_reductions

    own = interpreter_reductions.interpreters_own()  # installed when softmax_common loaded
    assert own is not None and interpreter.ReduceOps.apply_impl is not own
    g = seeds.generator(0)
    x = torch.randn(4, 16, generator=g)
    y = torch.randn(4, 16, generator=g)
    x[1] = -float("inf")  # a row of nothing but -inf, as the kernels' padding makes
    x[2, :5] = -float("inf")
    outs = []
    for apply_impl in (interpreter.ReduceOps.apply_impl, own):
        monkeypatch.setattr(interpreter.ReduceOps, "apply_impl", apply_impl)
        out = torch.empty(10, 4)
        with interpreter_quiet():  # the NaN the inputs make below
            _joint[(1,)](x, y, out, ROWS=4, BLOCK=16)
        outs.append(out)
    fast, slow = outs
    # (-inf * y summed over both signs of y is NaN, in both paths)
    assert torch.equal(fast.isinf(), slow.isinf()) and torch.equal(fast.isnan(), slow.isnan())
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-6, equal_nan=True)
    # and what they compute: the two maxima, then a max and two sums, then three sums, then a
    # max and a sum
    assert torch.equal(fast[0], x.max(1).values) and torch.equal(fast[1], y.max(1).values)
    assert torch.allclose(fast[3], y.sum(1), atol=1e-5)
    assert torch.allclose(fast[7], torch.exp(x).sum(1), atol=1e-5)
    assert torch.equal(fast[8], y.max(1).values)
    assert torch.equal(fast[9].isnan(), (x * y).sum(1).isnan())
