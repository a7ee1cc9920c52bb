"""multi_tensor_dot / multi_tensor_axpby against float64 torch references."""
import pytest
import torch

from mpl_fast import ops
from mpl_fast.ops import multi_tensor
from tests import seeds

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16/fp16 inputs are exact in fp32, so the only error is accumulation: relative to the sum
# of |a_i b_i| it stays near fp32 epsilon.
TOL = 1e-5


def _odd_shapes(gen, count):
    shapes = [(), (0,), (1,), (3, 0, 5), (7,), (5, 3), (2, 3, 5), (1, 1, 13), (129,), (4099,)]
    return [shapes[int(torch.randint(len(shapes), (1,), generator=gen))] for _ in range(count)]


def _pairs(shapes, dtype, device, gen, non_contiguous=False):
    a, b = [], []
    for shape in shapes:
        if non_contiguous and len(shape) >= 1:
            # a transposed / strided view of a larger tensor
            big = torch.randn(*shape, 2, generator=gen).to(dtype)[..., 0]
            a.append(big.to(device))
            b.append(torch.randn(*shape[::-1], generator=gen).to(dtype).to(device).permute(
                *reversed(range(len(shape)))))
        else:
            a.append(torch.randn(shape, generator=gen).to(dtype).to(device))
            b.append(torch.randn(shape, generator=gen).to(dtype).to(device))
    return a, b


def _truth(a, b):
    exact = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    scale = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    return exact, max(scale, 1.0)


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return devs


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["odd", "single", "many", "non_contiguous", "empty_tensors"])
def test_dot_matches_float64(device, dtype, case):
    gen = seeds.generator((str(dtype), case))
    if case == "odd":
        shapes = _odd_shapes(gen, 17)
    elif case == "single":
        shapes = [(31, 7)]
    elif case == "many":
        shapes = _odd_shapes(gen, 2100)
    elif case == "non_contiguous":
        shapes = [(5, 3), (2, 3, 5), (129, 2), (33, 17)]
    else:
        shapes = [(0,), (3, 0), (0, 4, 4)]
    a, b = _pairs(shapes, dtype, device, gen, non_contiguous=case == "non_contiguous")
    if case == "non_contiguous":
        assert not all(x.is_contiguous() for x in a + b)
    got = ops.multi_tensor_dot(a, b)
    exact, scale = _truth(a, b)
    assert got.dtype == torch.float32 and got.shape == () and got.device.type == device
    assert abs(float(got) - exact) <= TOL * scale, (float(got), exact)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_dot_gradient_and_its_gradient_are_exact_in_float64(monkeypatch, backend):
    """gradcheck and gradgradcheck, with one input of each list left without gradient; the
    compiled kernels' result once carried autograd's not-implemented node, whose backward gave
    the inputs no gradient at all."""
    monkeypatch.setenv("MPL_FAST_BACKEND", backend)
    gen = seeds.generator(("grad", backend))
    (a0, a1), (b0, b1) = _pairs([(3, 5), (7,)], torch.float64, "cpu", gen)
    a0, a1, b0 = (x.requires_grad_() for x in (a0, a1, b0))

    def dot(a0, a1, b0):
        return ops.multi_tensor_dot([a0, a1], [b0, b1])

    assert torch.autograd.gradcheck(dot, (a0, a1, b0))
    assert torch.autograd.gradgradcheck(dot, (a0, a1, b0))


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_gradients_are_the_other_list_scaled_in_each_inputs_dtype(device, dtype):
    gen = seeds.generator(("grad", str(dtype)))
    a, b = _pairs(_odd_shapes(gen, 9), dtype, device, gen)
    for x in a + b:
        x.requires_grad_()
    scale = float(torch.randn((), generator=gen))
    (ops.multi_tensor_dot(a, b) * scale).backward()
    # one product rounded to the dtype: within half an ulp of the float64 truth, whose spacing
    # among subnormals is absolute (tiny * eps: 6e-8 in float16)
    info = torch.finfo(dtype)
    for x, y in zip(a, b):
        assert x.grad.dtype == dtype and y.grad.dtype == dtype
        for got, other in ((x.grad, y), (y.grad, x)):
            truth = other.detach().double() * scale
            assert torch.allclose(got.double(), truth, rtol=info.eps, atol=info.tiny * info.eps)


def test_dot_empty_list_is_zero():
    got = ops.multi_tensor_dot([], [])
    assert got.dtype == torch.float32 and float(got) == 0.0


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_dot_backends_agree(monkeypatch, backend):
    monkeypatch.setenv("MPL_FAST_BACKEND", backend)
    gen = seeds.generator(3)
    a, b = _pairs([(17, 3), (5,), (1000,)], torch.float32, "cpu", gen)
    exact, scale = _truth(a, b)
    assert abs(float(ops.multi_tensor_dot(a, b)) - exact) <= TOL * scale


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("bad, message", [
    (lambda: ([torch.ones(3)], [torch.ones(3), torch.ones(2)]), "same length"),
    (lambda: ([torch.ones(3)], [torch.ones(4)]), "differ in shape"),
    (lambda: ([torch.ones(3)], [torch.ones(3, dtype=torch.float16)]), "differ in dtype"),
    (lambda: ([torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)]),
     "only float32"),
    (lambda: ([torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(2, device="meta")]),
     "one device"),
    (lambda: ([], [torch.ones(2)]), "same length"),
])
def test_dot_bad_input(monkeypatch, backend, bad, message):
    monkeypatch.setenv("MPL_FAST_BACKEND", backend)
    a, b = bad()
    with pytest.raises(ValueError, match=message):
        ops.multi_tensor_dot(a, b)


def test_dot_rejects_non_lists():
    with pytest.raises(TypeError):
        ops.multi_tensor_dot(torch.ones(3), torch.ones(3))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("MPL_FAST_BACKEND", "numpy")
    with pytest.raises(ValueError, match="MPL_FAST_BACKEND"):
        ops.multi_tensor_dot([torch.ones(2)], [torch.ones(2)])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpby_matches_float64(device, dtype):
    gen = seeds.generator(11)
    shapes = _odd_shapes(gen, 40) + [(70000,)]
    y, x = _pairs(shapes, dtype, device, gen)
    y.append(torch.randn(6, 4, generator=gen).to(dtype).to(device).t())  # strided target
    x.append(torch.randn(4, 6, generator=gen).to(dtype).to(device))
    alpha, beta = 0.37, -1.25
    want = [(alpha * xi.double() + beta * yi.double()) for yi, xi in zip(y, x)]
    ops.multi_tensor_axpby(y, x, alpha, beta)
    eps = torch.finfo(dtype).eps
    for yi, wi in zip(y, want):
        assert yi.dtype == dtype
        # one rounding to the storage dtype (plus fp32 arithmetic)
        assert torch.allclose(yi.double(), wi, rtol=eps, atol=eps * 4)


def test_axpby_perturb_and_restore_is_near_exact():
    gen = seeds.generator(5)
    theta = [torch.randn(33, 7, generator=gen), torch.randn(101, generator=gen)]
    v = [torch.randn_like(t) for t in theta]
    original = [t.clone() for t in theta]
    eps = 1e-3
    ops.multi_tensor_axpby(theta, v, eps, 1.0)
    assert not torch.equal(theta[0], original[0])
    ops.multi_tensor_axpby(theta, v, -2 * eps, 1.0)
    ops.multi_tensor_axpby(theta, v, eps, 1.0)
    for t, o in zip(theta, original):
        assert torch.allclose(t, o, rtol=0, atol=1e-6)


def test_axpby_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        ops.multi_tensor_axpby([torch.ones(3)], [torch.ones(2)], 1.0, 1.0)


def test_opcheck_dot():
    gen = seeds.generator(0)
    for dtype in DTYPES:
        a, b = _pairs([(3, 5), (7,), (0,)], dtype, "cpu", gen)
        torch.library.opcheck(torch.ops.mpl_fast.multi_tensor_dot.default, (a, b))
        # with gradients wanted: the autograd registration and its traced backward
        a = [x.requires_grad_() for x in a]
        torch.library.opcheck(torch.ops.mpl_fast.multi_tensor_dot.default, (a, b))


def test_opcheck_axpby():
    gen = seeds.generator(1)
    y, x = _pairs([(3, 5), (7,)], torch.float32, "cpu", gen)
    torch.library.opcheck(torch.ops.mpl_fast.multi_tensor_axpby.default, (y, x, 0.5, 2.0))


def test_dot_under_torch_compile():
    a = [torch.randn(5, 3), torch.randn(9)]
    b = [torch.randn(5, 3), torch.randn(9)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        return torch.ops.mpl_fast.multi_tensor_dot(a, b) * 2

    exact, _ = _truth(a, b)
    assert abs(float(f(a, b)) - 2 * exact) < 1e-4


def test_reference_matches_compiled():
    gen = seeds.generator(9)
    a, b = _pairs(_odd_shapes(gen, 30), torch.bfloat16, "cpu", gen)
    assert torch.allclose(multi_tensor.multi_tensor_dot_reference(a, b),
                          torch.ops.mpl_fast.multi_tensor_dot(a, b), rtol=1e-5, atol=1e-4)


def test_extension_is_loaded_after_torch():
    """_C links libtorch and the CUDA runtime; loaded before torch's Python module it aborted on
    the GPU machine ("free(): invalid pointer")."""
    import subprocess
    import sys

    # sys.modules keeps insertion order; an extension module enters it after its dlopen
    code = "import sys, mpl_fast._C; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    order = done.stdout.split()
    assert "mpl_fast._C" in order and "torch" in order
    assert order.index("torch") < order.index("mpl_fast._C")
