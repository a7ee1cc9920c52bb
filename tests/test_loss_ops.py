"""Fused loss ops (pseudo_labels, soft_cross_entropy, uda_loss) against float64 truth, through
the plain-torch backend and the Triton kernels (interpreted on CPU; compiled on a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from mpl_fast import ops
from tests import loss_truth, seeds

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, C): C from the op contract; large C only with few rows to keep the interpreter quick.
# (130, 11) and (37, 100) pack 64 and 8 rows to a program: several programs, a partial last one.
# Up to C = 4096 a row is one tile (read once); from (3, 32000) on, rows are streamed in chunks.
SHAPES = [(7, 2), (9, 10), (130, 11), (37, 100), (5, 1000), (4, 3001), (3, 32000), (2, 50257),
          (1, 65537)]
SLACK = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _backends(pipelined=False):
    """torch; the Triton kernels as shipped; "triton-lanes", the same kernels with a streamed
    row's statistics kept per lane (softmax_common.LANE_STATS); and, for the tests of every row
    length (pipelined=True) on a GPU, the launch settings a sweep may ship: "triton-staged", a
    streamed row's chunks software-pipelined (STREAM_STAGES 2), "triton-persistent",
    one-tile rows by persistent programs with 2 tiles in flight (ROW_STAGES 2), and
    "triton-evict", streamed rows with L2 eviction hints (EVICTION_HINTS); the interpreter
    runs pipelined loops as plain ones (the persistent programs' loop itself is tested on the CPU
    below). The register cap has a test of its own (test_register_capped_kernels_...)."""
    out = [("torch", "cpu"), ("triton", "cpu"), ("triton-lanes", "cpu")]
    out.append(pytest.param("triton", "cuda", marks=pytest.mark.gpu))
    out.append(pytest.param("triton-lanes", "cuda", marks=pytest.mark.gpu))
    if pipelined:
        out.append(pytest.param("triton-staged", "cuda", marks=pytest.mark.gpu))
        out.append(pytest.param("triton-persistent", "cuda", marks=pytest.mark.gpu))
        out.append(pytest.param("triton-evict", "cuda", marks=pytest.mark.gpu))
    return out


@pytest.fixture
def use(monkeypatch):
    def set_backend(name):
        from mpl_fast.kernels import softmax_common

        monkeypatch.setenv("MPL_FAST_BACKEND", name.split("-")[0])
        monkeypatch.setattr(softmax_common, "LANE_STATS", name == "triton-lanes")
        if name == "triton-staged":  # else the shipped setting
            monkeypatch.setattr(softmax_common, "STREAM_STAGES", 2)
        if name == "triton-persistent":
            monkeypatch.setattr(softmax_common, "ROW_STAGES", 2)
        if name == "triton-evict":
            monkeypatch.setattr(softmax_common, "EVICTION_HINTS", True)
    return set_backend


def _logits(n, c, dtype, device, seed, scale=3.0):
    g = seeds.generator(seed)
    return (torch.randn(n, c, generator=g) * scale).to(dtype).to(device)


def _truncation(backend, device, dtype):
    """Triton's interpreter converts float32 to bf16 by truncation, not to nearest as the GPU
    does (0.99988 becomes 0.99609, not 1; fp16 it rounds to nearest): a bf16 gradient may be one
    unit in the last place further from the truth there than torch's."""
    interpreted = backend.startswith("triton") and device == "cpu"
    return torch.finfo(dtype).eps if interpreted and dtype == torch.bfloat16 else 0.0


def _no_worse_than_torch(ours, torch_own, truth, dtype, extra=0.0):
    err = (ours.double() - truth).abs().max().item() if truth.numel() else 0.0
    ref = (torch_own.double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = max(truth.abs().max().item() if truth.numel() else 0.0, 1.0)
    if not ref < float("inf"):  # torch itself overflowed (fp16 sums over 50k classes)
        ref = 0.0
    assert err <= ref + (SLACK[dtype] + extra) * scale, (err, ref)


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("hard", [True, False])
def test_soft_cross_entropy_values_and_grads(use, backend, device, dtype, n, c, hard):
    use(backend)
    seed = n * 1000 + c + hard
    ls = 0.15 if (c % 2) else 0.0
    x = _logits(n, c, dtype, device, seed)
    g = seeds.generator(seed + 1)
    if hard:
        target = torch.randint(0, c, (n,), generator=g).to(device)
    else:
        target = torch.softmax(torch.randn(n, c, generator=g) * 2, 1).to(device)
    mask = (torch.rand(n, generator=g) > 0.3).float().to(device)

    x_ours = x.clone().requires_grad_()
    loss = ops.soft_cross_entropy(x_ours, target, label_smoothing=ls, mask=mask)
    loss.backward()
    assert loss.dtype == torch.float32 and x_ours.grad.dtype == dtype

    x64 = x.double().cpu().requires_grad_()
    truth = loss_truth.reduce(loss_truth.soft_ce_rows(x64, target.cpu(), ls, mask.cpu()), "mean")
    truth.backward()

    x_torch = x.clone().requires_grad_()  # torch's own op, in the same dtype
    rows = F.cross_entropy(x_torch, target, label_smoothing=ls, reduction="none") * mask.to(dtype)
    own = rows.sum() / n
    own.backward()
    _no_worse_than_torch(loss.detach().cpu(), own.detach().cpu(), truth.detach(), dtype)
    _no_worse_than_torch(x_ours.grad.cpu(), x_torch.grad.cpu(), x64.grad, dtype,
                         _truncation(backend, device, dtype))


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_cross_entropy_reductions(use, backend, device, reduction):
    use(backend)
    x = _logits(11, 17, torch.float32, device, 4)
    y = torch.arange(11, device=device) % 17
    got = ops.soft_cross_entropy(x, y, reduction=reduction)
    want = loss_truth.reduce(loss_truth.soft_ce_rows(x.double().cpu(), y.cpu()), reduction)
    assert got.shape == want.shape
    assert torch.allclose(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scales_by_grad_output(use, backend, device, dtype):
    """The forward-written gradient is scaled in place by grad_output: 1 (left as is), a scalar
    weight, per-row weights with some rows exactly 1, and several ops summed into one input."""
    use(backend)
    n, c = 70, 11  # five programs of 16 rows for the Triton kernels, the last one partial
    x = _logits(n, c, dtype, device, 21)
    weak = _logits(n, c, dtype, device, 22)
    g = seeds.generator(23)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    t = torch.softmax(torch.randn(n, c, generator=g), 1).to(device)
    w = torch.where(torch.rand(n, generator=g) > 0.5, 1.0, torch.rand(n, generator=g) * 3)
    w = w.to(device)

    def total(x, sce, uda):
        return (sce(x, y, label_smoothing=0.1)                            # grad_output 1
                + 2.5 * sce(x, t, reduction="sum")                        # scalar weight
                + (sce(x, y, reduction="none") * w).sum()                 # per-row weights
                + 0.3 * uda(weak, x))

    xg = x.clone().requires_grad_()
    got = total(xg, ops.soft_cross_entropy,
                lambda a, b: ops.uda_loss(a, b, temperature=0.7, threshold=0.2)[0])
    got.backward()

    x64 = x.double().cpu().requires_grad_()

    def sce64(a, target, label_smoothing=0.0, reduction="mean"):
        return loss_truth.reduce(loss_truth.soft_ce_rows(a, target.cpu(), label_smoothing),
                                 reduction)

    def uda64(a, b):
        return loss_truth.uda_rows(a.double().cpu(), b, 0.7, 0.2)[0].mean()

    w, y, t = w.cpu().double(), y.cpu(), t.cpu().double()
    want = total(x64, sce64, uda64)
    want.backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.cpu().double(), want, rtol=tol, atol=tol)
    assert torch.allclose(xg.grad.cpu().double(), x64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_backward_hands_on_the_forward_gradient_without_a_copy(use, backend, device, weight):
    """x.grad is the very buffer the forward wrote (scaled in place when weighted): backward
    allocates and copies nothing."""
    use(backend)
    x = _logits(9, 5, torch.float32, device, 41).requires_grad_()
    y = torch.arange(9, device=device) % 5
    loss, g = torch.ops.mpl_fast.soft_cross_entropy(x, y, None, None, 0.0, "mean", True)
    ptr = g.data_ptr()
    del g
    (weight * loss).backward()
    assert x.grad.data_ptr() == ptr
    x.grad = None
    loss, _, g = torch.ops.mpl_fast.uda_loss(x.detach(), x, 0.7, 0.0, "sum", True)
    ptr = g.data_ptr()
    del g, _
    (weight * loss).backward()
    assert x.grad.data_ptr() == ptr


@pytest.mark.parametrize("backend,device", _backends())
def test_second_backward_through_a_loss_op_fails_loudly(use, backend, device):
    """Backward scales the saved gradient in place, so a retained graph cannot be reused: autograd
    must refuse (the in-place op bumps the version) rather than scale twice."""
    use(backend)
    xg = _logits(5, 7, torch.float32, device, 31).requires_grad_()
    y = torch.arange(5, device=device)
    loss = 2.0 * ops.soft_cross_entropy(xg, y)
    loss.backward(retain_graph=True)
    first = xg.grad.clone()
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
    assert torch.equal(xg.grad, first)
    loss_u = 3.0 * ops.uda_loss(xg.detach(), xg, temperature=0.7)[0]
    loss_u.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss_u.backward()


@pytest.mark.parametrize("backend,device", _backends())
def test_soft_cross_entropy_edge_cases(use, backend, device):
    use(backend)
    # N = 0 and N = 1
    empty = torch.zeros(0, 10, device=device, requires_grad=True)
    out = ops.soft_cross_entropy(empty, torch.zeros(0, dtype=torch.int64, device=device))
    out.backward()
    assert float(out.detach()) == 0.0 and empty.grad.shape == (0, 10)
    one = _logits(1, 10, torch.float32, device, 1)
    y1 = torch.tensor([3], device=device)
    assert torch.allclose(ops.soft_cross_entropy(one, y1).cpu().double(),
                          loss_truth.soft_ce_rows(one.double().cpu(), y1.cpu()).mean(), atol=1e-5)
    # -inf logits: a zero target weight contributes nothing; the gradient stays finite
    x = _logits(4, 9, torch.float32, device, 2)
    x[:, 0] = -float("inf")
    x[1, 5] = -float("inf")
    y = torch.tensor([1, 2, 3, 4], device=device)
    xg = x.clone().requires_grad_()
    loss = ops.soft_cross_entropy(xg, y)
    loss.backward()
    x64 = x.double().cpu().requires_grad_()
    truth = loss_truth.soft_ce_rows(x64, y.cpu()).mean()
    truth.backward()
    assert torch.isfinite(loss) and torch.allclose(loss.cpu().double(), truth, atol=1e-5)
    assert torch.allclose(xg.grad.cpu().double(), x64.grad, atol=1e-6)
    # a -inf logit under label smoothing has positive target weight: the loss is infinite
    assert torch.isinf(ops.soft_cross_entropy(x, y, label_smoothing=0.1))
    # every row masked: zero loss and zero gradient, and the divisor stays N
    xg = _logits(5, 6, torch.float32, device, 3).requires_grad_()
    loss = ops.soft_cross_entropy(xg, torch.zeros(5, dtype=torch.int64, device=device),
                                  mask=torch.zeros(5, device=device))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(xg.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(use, backend, device, dtype):
    use(backend)
    wide = _logits(6, 40, dtype, device, 8)
    x = wide[:, 3:33]  # row stride 40, unit column stride
    xc = wide[:, ::2][:, :15]  # column stride 2
    for view in (x, xc):
        v = view.detach().requires_grad_()
        y = torch.arange(6, device=device) % view.shape[1]
        loss = ops.soft_cross_entropy(v, y, label_smoothing=0.15)
        loss.backward()
        d = v.detach().contiguous().requires_grad_()
        want = ops.soft_cross_entropy(d, y, label_smoothing=0.15)
        want.backward()
        assert torch.equal(loss, want) and torch.equal(v.grad, d.grad)


def test_row_alignment_is_the_largest_power_of_two_dividing_classes_and_strides():
    from mpl_fast.kernels.softmax_common import row_alignment

    assert row_alignment(1000, 1000) == 8
    assert row_alignment(1000, 1000, 1003) == 1
    assert row_alignment(32000, 32000, 64000) == 16  # capped at 16 (16 bytes of fp8 at most)
    assert row_alignment(100, 100) == 4 and row_alignment(10, 10) == 2
    assert row_alignment(1000, 0) == 8  # a stride of 0 (one broadcast row) divides nothing away
    assert row_alignment(1024) == 16


def test_pipelined_stages_reach_their_rows_only_and_the_shipped_tile_comes_back():
    """STREAM_STAGES is a streamed row's setting: a one-tile row is read once, with nothing to
    pipeline, so its launch keeps one stage (one compiled variant fewer); ROW_STAGES is a
    one-tile row's (persistent programs over the tiles); a sweep's setting is undone after
    it."""
    from mpl_fast.kernels import softmax_common as sc

    shipped = sc.tile_for(32000)
    with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS, stages=3):
        assert sc.tile_for(32000).stages == 3 and not sc.tile_for(32000).single
        assert sc.tile_for(1000).stages == 1 and sc.tile_for(1000).single
    assert sc.tile_for(32000) == shipped and shipped.stages == sc.STREAM_STAGES
    with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS, row_stages=2):
        assert sc.tile_for(1000).row_stages == 2 and sc.tile_for(32000).row_stages == 1
        # a persistent grid: at most 64 programs off CUDA, fewer when there are fewer tiles
        assert sc.grid(sc.tile_for(1000), 1000, torch.device("cpu")) == (64,)
        assert sc.grid(sc.tile_for(1000), 5, torch.device("cpu")) == (5,)
    with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS, row_stages=1):
        assert sc.grid(sc.tile_for(1000), 1000, torch.device("cpu")) == (1000,)  # a tile each


@pytest.mark.parametrize("c", [10, 1000])
def test_persistent_programs_give_the_shipped_results_bit_for_bit(use, monkeypatch, c):
    """One-tile rows by persistent programs (ROW_STAGES 2: 8 programs here, each looping over
    several tiles, the last one partial) against a program a tile: the same arithmetic a row, so
    the same bits, for the three ops, their gradients and masks."""
    from mpl_fast.kernels import softmax_common

    use("triton")
    monkeypatch.setattr(softmax_common, "PERSISTENT_PROGRAMS_OFF_CUDA", 8)
    rows_per_tile = softmax_common.tile_for(c).rows
    n = 8 * rows_per_tile * 2 + rows_per_tile // 2 + 3  # > 2 tiles a program, the last partial
    x = _logits(n, c, torch.bfloat16, "cpu", 81)
    weak = _logits(n, c, torch.bfloat16, "cpu", 82, scale=6.0)
    g = seeds.generator(83)
    y = torch.randint(0, c, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).float()
    # UDA's and pseudo_labels' confidence masks keep about half the rows
    threshold = float(torch.softmax(weak.float() / 0.7, 1).max(1).values.median())

    def run():
        xg = x.clone().requires_grad_()
        ce = ops.soft_cross_entropy(xg, y, label_smoothing=0.1, mask=mask, reduction="none")
        uda, uda_mask = ops.uda_loss(weak, xg, temperature=0.7, threshold=threshold,
                                     reduction="none")
        (ce.sum() + 0.5 * uda.sum()).backward()
        pl = ops.pseudo_labels(weak, temperature=0.7, threshold=threshold)
        return [ce, uda, uda_mask, xg.grad, *pl]

    shipped = run()
    assert softmax_common.grid(softmax_common.tile_for(c), n, x.device)[0] > 16
    monkeypatch.setattr(softmax_common, "ROW_STAGES", 2)
    assert softmax_common.grid(softmax_common.tile_for(c), n, x.device) == (8,)
    persistent = run()
    assert 0.2 < float(shipped[2].mean()) < 0.8  # the UDA mask keeps some rows, not all
    for a, b in zip(shipped, persistent):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eviction_hints_give_the_shipped_results_bit_for_bit(use, monkeypatch, device, dtype):
    """L2 eviction hints on a streamed row's two passes (EVICTION_HINTS) say what the cache
    keeps, not what is computed: the three ops with hard and soft targets, their gradients and
    masks, bit for bit as without them, on rows streamed in several chunks (the last partial)
    and an odd row count."""
    from mpl_fast.kernels import softmax_common

    use("triton")
    n, c = (5, 9001) if device == "cpu" else (37, 32000)
    assert not softmax_common.tile_for(c).single
    x = _logits(n, c, dtype, device, 95)
    weak = _logits(n, c, dtype, device, 96, scale=6.0)
    g = seeds.generator(97)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    soft = torch.softmax(torch.randn(n, c, generator=g), 1).to(dtype).to(device)
    mask = (torch.rand(n, generator=g) > 0.3).float().to(device)

    def run():
        xg = x.clone().requires_grad_()
        ce = ops.soft_cross_entropy(xg, y, label_smoothing=0.1, mask=mask, reduction="none")
        ce_soft = ops.soft_cross_entropy(xg, soft, reduction="none")
        uda, uda_mask = ops.uda_loss(weak, xg, temperature=0.7, threshold=0.0,
                                     reduction="none")
        (ce.sum() + ce_soft.sum() + 0.5 * uda.sum()).backward()
        return [ce, ce_soft, uda, uda_mask, xg.grad, *ops.pseudo_labels(weak, temperature=0.7)]

    shipped = run()
    monkeypatch.setattr(softmax_common, "EVICTION_HINTS", True)
    assert softmax_common.tile_for(c).evict and not softmax_common.tile_for(1000).evict
    hinted = run()
    for a, b in zip(shipped, hinted):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [10, 1000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_register_capped_kernels_give_the_shipped_results(monkeypatch, c, dtype):
    """A register cap (MAX_REGISTERS 40: spills where the kernel wants more) changes where
    values live, not the arithmetic: the three ops, gradients and masks as the uncapped kernels
    give them (to float32 rounding), on odd row counts."""
    from mpl_fast.kernels import softmax_common

    monkeypatch.setenv("MPL_FAST_BACKEND", "triton")
    n = 517 if c < 32000 else 37
    x = _logits(n, c, dtype, "cuda", 91)
    weak = _logits(n, c, dtype, "cuda", 92, scale=6.0)
    y = torch.randint(0, c, (n,), generator=seeds.generator(93)).cuda()
    mask = (torch.rand(n, generator=seeds.generator(94)) > 0.3).float().cuda()

    def run():
        xg = x.clone().requires_grad_()
        ce = ops.soft_cross_entropy(xg, y, label_smoothing=0.1, mask=mask, reduction="none")
        uda, uda_mask = ops.uda_loss(weak, xg, temperature=0.7, threshold=0.6,
                                     reduction="none")
        (ce.sum() + 0.5 * uda.sum()).backward()
        return [ce, uda, uda_mask, xg.grad, *ops.pseudo_labels(weak, temperature=0.7,
                                                                 threshold=0.6)]

    shipped = run()
    monkeypatch.setattr(softmax_common, "MAX_REGISTERS", 40)
    capped = run()
    for a, b in zip(shipped, capped):
        if a.is_floating_point():  # a bf16/fp16 gradient to one ulp
            rtol = max(torch.finfo(a.dtype).eps, 1e-5)
            torch.testing.assert_close(b.float(), a.float(), rtol=rtol, atol=1e-6)
        else:
            assert torch.equal(a, b)

@pytest.mark.gpu
def test_a_persistent_grid_is_sized_from_the_compiled_kernel(monkeypatch):
    """On the device's triton, a launch hands back the compiled kernel with its registers and
    shared memory: the second launch's persistent grid holds only the programs an SM has room
    for (and the results do not depend on the grid)."""
    from mpl_fast.kernels import soft_cross_entropy as ce_kernels
    from mpl_fast.kernels import softmax_common as sc

    class Recording:
        def __init__(self, kernel):
            self.kernel, self.grids = kernel, []

        def __getitem__(self, grid):
            self.grids.append(grid)
            return self.kernel[grid]

    kernel = Recording(ce_kernels._soft_cross_entropy_kernel)
    monkeypatch.setattr(ce_kernels, "_soft_cross_entropy_kernel", kernel)
    monkeypatch.setattr(sc, "_resident", {})
    monkeypatch.setattr(sc, "ROW_STAGES", 2)
    monkeypatch.setenv("MPL_FAST_BACKEND", "triton")
    x = _logits(15360, 1000, torch.bfloat16, "cuda", 95)
    y = torch.randint(0, 1000, (15360,), generator=seeds.generator(96)).cuda()
    losses = [ops.soft_cross_entropy(x, y, label_smoothing=0.1) for _ in range(2)]
    (programs,) = sc._resident.values()
    sms = sc.sm_count(torch.cuda.current_device())
    assert 1 <= programs <= sc.SM90_LIMITS.programs
    assert kernel.grids == [(sc.PERSISTENT_PROGRAMS_PER_SM * sms,),
                            (min(programs, sc.PERSISTENT_PROGRAMS_PER_SM) * sms,)]
    assert torch.equal(losses[0], losses[1])

def test_resident_programs_counts_what_an_sm_holds():
    """Occupancy as CUDA computes it: registers in blocks of 256 a warp, 1 KiB of shared memory
    reserved a program, and the SM's caps on threads and programs."""
    from mpl_fast.kernels.softmax_common import SM90_LIMITS, SmLimits, resident_programs

    # two warps a program at 1000 classes: the cross-entropy with its gradient (55 registers,
    # given as 56) against pseudo_labels (32); a persistent variant with 69 and 4 KiB of buffers
    assert resident_programs(55, 2, 24) == 65536 // (56 * 32 * 2) == 18
    assert resident_programs(32, 2, 24) == 32  # every program slot
    assert resident_programs(40, 2, 24) == 25
    assert resident_programs(69, 2, 4132) == 65536 // (72 * 32 * 2) == 14
    assert resident_programs(64, 8, 0) == 4
    assert resident_programs(16, 1, 0) == 32  # the program cap, not the 64 warps
    assert resident_programs(32, 16, 0) == 4  # 2048 threads
    assert resident_programs(32, 2, 100 * 1024) == 2  # shared memory
    assert resident_programs(255, 32, 200 * 1024) == 1  # never 0
    assert resident_programs(16, 1, 0, SmLimits(65536, 1536, 102400, 16)) == 16
    assert SM90_LIMITS.programs == 32


class _FakeKernel:
    """Stands in for a @triton.jit kernel: records each launch's grid and options and returns a
    compiled kernel of the given registers and shared memory, as triton's launch does."""

    def __init__(self, n_regs, shared):
        from types import SimpleNamespace

        self.compiled = SimpleNamespace(n_regs=n_regs, metadata=SimpleNamespace(shared=shared))
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.compiled
        return run


def test_a_register_cap_reaches_the_launch_only_when_set():
    """MAX_REGISTERS 0 launches exactly as before there was a cap (no maxnreg option: the same
    compiled variants); a cap is passed as ptxas' maxnreg."""
    from mpl_fast.kernels import softmax_common as sc

    kernel = _FakeKernel(40, 24)
    x = torch.zeros(3, 1000)
    assert sc.tile_for(1000).max_registers == sc.MAX_REGISTERS == 0
    sc.launch(kernel, sc.tile_for(1000), 3, x.device, x, 7, ROWS=1)
    with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS, max_registers=40):
        sc.launch(kernel, sc.tile_for(1000), 3, x.device, x, 7, ROWS=1)
        sc.launch(kernel, sc.tile_for(32000), 3, x.device, x, 7, ROWS=1)
    assert sc.MAX_REGISTERS == 0  # the sweep's setting undone
    fusion = {"enable_fp_fusion": True}  # asked for by name (see softmax_common.FP_FUSION)
    assert kernel.launches == [((3,), {"ROWS": 1, "num_warps": 2, **fusion}),
                               ((3,), {"ROWS": 1, "num_warps": 2, **fusion, "maxnreg": 40}),
                               ((3,), {"ROWS": 1, "num_warps": 8, **fusion, "maxnreg": 40})]


def test_a_persistent_grid_holds_only_the_programs_an_sm_has_room_for(monkeypatch):
    """A persistent program that finds no room on an SM starts only when another has looped
    over all its tiles: from a variant's second launch on, the grid is the programs an SM holds
    of the compiled kernel (its registers and shared memory), at most
    PERSISTENT_PROGRAMS_PER_SM, times the SMs. Kept per variant (dtypes, constexprs, options)."""
    from types import SimpleNamespace

    from mpl_fast.kernels import softmax_common as sc

    monkeypatch.setattr(sc, "_resident", {})
    monkeypatch.setattr(sc, "sm_count", lambda index: 132)
    monkeypatch.setattr(sc, "sm_limits", lambda index: sc.SM90_LIMITS)
    monkeypatch.setattr(sc, "ROW_STAGES", 2)
    cuda = SimpleNamespace(type="cuda", index=0)  # the launch path of a GPU, run by fakes
    tile = sc.tile_for(1000)
    x = torch.zeros(1, dtype=torch.bfloat16)
    starved, roomy = _FakeKernel(69, 4132), _FakeKernel(32, 4120)
    for _ in range(2):
        for kernel in (starved, roomy):
            sc.launch(kernel, tile, 15360, cuda, x, 15360, ROWS=1, ROW_STAGES=2)
    assert [g for g, _ in starved.launches] == [(16 * 132,), (14 * 132,)]
    assert [g for g, _ in roomy.launches] == [(16 * 132,), (16 * 132,)]  # at most 16 an SM
    sc.launch(starved, tile, 100, cuda, x, 100, ROWS=1, ROW_STAGES=2)  # fewer tiles than room
    assert starved.launches[-1][0] == (100,)
    # another dtype is another compiled variant: sized afresh
    sc.launch(starved, tile, 15360, cuda, x.float(), 15360, ROWS=1, ROW_STAGES=2)
    assert starved.launches[-1][0] == (16 * 132,)
    assert sorted(sc._resident.values()) == [14, 14, 32]


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,offset", [(1008, 8), (1003, 0), (1000, 0), (1016, 5)])
def test_rows_aligned_or_not_give_the_contiguous_results(use, backend, device, dtype, width,
                                                         offset):
    """C = 1000 (a multiple of 8, not of 16: the kernels tell the compiler so, and it moves 16
    bytes an instruction) inside wider rows: aligned row starts (1008, offset 8), odd strides
    (1003) and a misaligned start (offset 5) must all give what the contiguous rows give, to
    rounding."""
    use(backend)
    n, c = 5, 1000
    wide = _logits(n, width, dtype, device, 31)
    wide_weak = _logits(n, width + 3, dtype, device, 32)  # another stride for the weak view
    x = wide[:, offset:offset + c]
    w = wide_weak[:, :c]
    probs = torch.softmax(_logits(n, c, torch.float32, device, 33), 1)
    wide_probs = torch.zeros(n, width, device=device)
    wide_probs[:, offset:offset + c] = probs
    t = wide_probs[:, offset:offset + c]
    y = torch.arange(n, device=device) * 7 % c

    def run(x, w, t):
        xg = x.detach().requires_grad_()
        hard = ops.soft_cross_entropy(xg, y, label_smoothing=0.15, reduction="sum")
        soft = ops.soft_cross_entropy(xg, t, reduction="sum")
        uda, mask = ops.uda_loss(w, xg, temperature=0.7, threshold=0.0, reduction="sum")
        (hard + soft + uda).backward()
        return (hard, soft, uda, mask, xg.grad, *ops.pseudo_labels(x, temperature=0.7))

    got = run(x, w, t)
    want = run(x.contiguous(), w.contiguous(), t.contiguous())
    # equal to rounding: the variant compiled for aligned rows may sum a row in another order
    # (H200, 2026-11-26: last-bit differences in the gradient); a misread element is far off
    for a, b in zip(got, want):
        if a.is_floating_point() and a.dtype != torch.float32:
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-4)
        elif a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
    assert torch.equal(got[3], want[3])  # the mask
    truth = loss_truth.soft_ce_rows(x.double().cpu(), y.cpu(), 0.15, None).sum()
    assert torch.allclose(got[0].double().cpu(), truth, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", _backends())
def test_strided_targets_and_mask(use, backend, device):
    use(backend)
    x = _logits(7, 12, torch.float32, device, 21)
    y_wide = torch.arange(14, device=device) % 12
    m_wide = torch.tensor([1.0, 0.0] * 7, device=device)
    y, m = y_wide[1::2], m_wide[::2]  # strided views, as a per-rank slice of a batch makes
    got = ops.soft_cross_entropy(x, y, label_smoothing=0.1, mask=m, reduction="none")
    want = ops.soft_cross_entropy(x, y.contiguous(), label_smoothing=0.1, mask=m.contiguous(),
                                  reduction="none")
    truth = loss_truth.soft_ce_rows(x.double().cpu(), y.cpu(), 0.1, m.cpu())
    assert torch.equal(got, want)
    assert torch.allclose(got.cpu().double(), truth, atol=1e-5)


@pytest.mark.parametrize("backend,device", _backends())
def test_deterministic(use, backend, device):
    use(backend)
    x = _logits(33, 1000, torch.bfloat16, device, 5)
    t = torch.softmax(_logits(33, 1000, torch.float32, device, 6), 1)
    runs = []
    for _ in range(2):
        xg = x.clone().requires_grad_()
        loss = ops.soft_cross_entropy(xg, t, label_smoothing=0.1)
        loss.backward()
        runs.append((loss, xg.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", SHAPES)
def test_pseudo_labels(use, backend, device, dtype, n, c):
    use(backend)
    x = _logits(n, c, dtype, device, n + c)
    out = ops.pseudo_labels(x, temperature=0.7, threshold=0.05)
    probs64 = torch.softmax(x.double().cpu() / 0.7, 1)
    own = torch.softmax(x.float() / 0.7, 1).cpu()  # torch's own, computed in fp32
    _no_worse_than_torch(out.probs.cpu(), own, probs64, torch.float32)
    assert out.probs.dtype == torch.float32 and out.labels.dtype == torch.int64
    assert torch.equal(out.labels.cpu(), probs64.argmax(1))
    _no_worse_than_torch(out.max_prob.cpu(), own.max(1).values, probs64.max(1).values,
                         torch.float32)
    assert torch.equal(out.mask.cpu(), (out.max_prob.cpu() >= 0.05).float())


@pytest.mark.parametrize("backend,device", _backends())
def test_pseudo_labels_edges_and_sampling(use, backend, device):
    use(backend)
    empty = ops.pseudo_labels(torch.zeros(0, 5, device=device))
    assert empty.probs.shape == (0, 5) and empty.labels.shape == (0,)
    x = torch.tensor([[0.0, 2.0, 2.0, -float("inf")]], device=device)
    out = ops.pseudo_labels(x, threshold=0.45)
    assert int(out.labels) == 1  # the first of two maxima, like torch.argmax
    assert float(out.probs[0, 3]) == 0.0 and float(out.mask) == 1.0
    # sampling: frequencies follow probs; the same generator seed gives the same draw.
    # (20000 rows are too many for the interpreter; the draw itself is backend-independent.)
    if backend.startswith("triton") and device == "cpu":
        return
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], device=device)).repeat(20000, 1)
    g1 = seeds.generator(7, device)
    g2 = seeds.generator(7, device)
    a = ops.pseudo_labels(logits, mode="sample", generator=g1).labels
    b = ops.pseudo_labels(logits, mode="sample", generator=g2).labels
    assert torch.equal(a, b)
    freq = torch.bincount(a.cpu(), minlength=4).double() / a.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
                          atol=0.015)


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", SHAPES)
def test_uda_loss(use, backend, device, dtype, n, c):
    use(backend)
    weak = _logits(n, c, dtype, device, 2 * c + n, scale=6.0)
    strong = _logits(n, c, dtype, device, 3 * c + n)
    threshold = 0.3
    sg = strong.clone().requires_grad_()
    loss, mask = ops.uda_loss(weak, sg, temperature=0.7, threshold=threshold)
    loss.backward()
    s64 = strong.double().cpu().requires_grad_()
    rows, mask64 = loss_truth.uda_rows(weak.cpu(), s64, 0.7, threshold)
    truth = rows.sum() / max(n, 1)
    truth.backward()
    assert torch.equal(mask.cpu().double(), mask64)
    # torch's own, in the dtype: softmax targets and cross_entropy with probabilities
    st = strong.clone().requires_grad_()
    q = torch.softmax(weak / 0.7, 1)
    own = (F.cross_entropy(st, q, reduction="none") * mask64.to(dtype).to(device)).sum() / max(n, 1)
    own.backward()
    _no_worse_than_torch(loss.detach().cpu(), own.detach().cpu(), truth.detach(), dtype)
    _no_worse_than_torch(sg.grad.cpu(), st.grad.cpu(), s64.grad, dtype,
                         _truncation(backend, device, dtype))


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1000, 5000])
def test_rows_with_some_masked(use, backend, device, dtype, c):
    """Some rows masked and some not, in both ops, for rows of one tile and rows streamed in two
    passes: a masked row gets loss and gradient 0 whatever it holds (NaN here; the kernels may
    load it with its mask or skip it), the others match the float64 truth. (In test_uda_loss
    every row of 32000+ classes falls under the threshold, so the unmasked streamed gradient
    needs its own case.)"""
    use(backend)
    n = 6
    weak = _logits(n, c, dtype, device, 71, scale=1.0)  # max prob ~0.04 at T = 0.7
    confident = torch.tensor([0, 2, 3])
    weak[confident, confident + 7] = 60.0  # max prob ~1 in these rows, ~0 in the others
    strong = _logits(n, c, dtype, device, 72)
    poisoned = strong.clone()
    poisoned[[1, 4, 5]] = float("nan")  # the rows the weak view masks
    sg = poisoned.requires_grad_()
    loss, mask = ops.uda_loss(weak, sg, temperature=0.7, threshold=0.5)
    loss.backward()
    assert mask.cpu().tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    s64 = strong.double().cpu().requires_grad_()
    rows, _ = loss_truth.uda_rows(weak.cpu(), s64, 0.7, 0.5)
    (rows.sum() / n).backward()
    slack = SLACK[dtype] * 20
    rows = rows.detach()
    assert (abs(float(loss.detach()) - float(rows.sum() / n))
            <= slack * max(1.0, float(rows.abs().max())))
    assert torch.allclose(sg.grad.cpu().double(), s64.grad, atol=slack / n, rtol=0)
    assert float(sg.grad[mask == 0].abs().sum()) == 0.0

    y = torch.randint(0, c, (n,), generator=seeds.generator(73)).to(device)
    row_mask = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0], device=device)
    for target in (y, torch.softmax(_logits(n, c, torch.float32, device, 74), 1)):
        xg = strong.clone()
        xg[row_mask == 0] = float("nan")
        xg.requires_grad_()
        ops.soft_cross_entropy(xg, target, label_smoothing=0.1, mask=row_mask).backward()
        x64 = strong.double().cpu().requires_grad_()
        loss_truth.reduce(loss_truth.soft_ce_rows(x64, target.cpu(), 0.1, row_mask.cpu()),
                          "mean").backward()
        assert torch.allclose(xg.grad.cpu().double(), x64.grad, atol=slack / n, rtol=0)
        assert float(xg.grad[row_mask == 0].abs().sum()) == 0.0
        assert float(xg.grad[row_mask != 0].abs().sum()) > 0.0


@pytest.mark.parametrize("backend,device", _backends())
def test_uda_all_masked_and_empty(use, backend, device):
    use(backend)
    weak = torch.zeros(4, 10, device=device)  # uniform: max prob 0.1 < threshold
    strong = _logits(4, 10, torch.float32, device, 9).requires_grad_()
    loss, mask = ops.uda_loss(weak, strong, threshold=0.5)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(mask.sum()) == 0.0
    assert float(strong.grad.abs().sum()) == 0
    loss, mask = ops.uda_loss(torch.zeros(0, 3, device=device), torch.zeros(0, 3, device=device))
    assert float(loss.detach()) == 0.0 and mask.shape == (0,)


@pytest.mark.parametrize("call, name", [
    (lambda: ops.soft_cross_entropy(torch.zeros(3), torch.zeros(3, dtype=torch.int64)), "logits"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4, dtype=torch.int64),
                                    torch.zeros(3, dtype=torch.int64)), "logits"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64)),
     "target"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.tensor([0, 4, 1])), "target"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.tensor([0, -1, 1])), "target"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32)),
     "target"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 5)), "target"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64),
                                    mask=torch.ones(2)), "mask"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64),
                                    label_smoothing=1.5), "label_smoothing"),
    (lambda: ops.soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64),
                                    reduction="avg"), "reduction"),
    (lambda: ops.pseudo_labels(torch.zeros(3, 4), temperature=0.0), "temperature"),
    (lambda: ops.pseudo_labels(torch.zeros(3, 4), temperature=-1.0), "temperature"),
    (lambda: ops.pseudo_labels(torch.zeros(3, 4), mode="soft"), "mode"),
    (lambda: ops.pseudo_labels(torch.zeros(3, 1)), "logits"),
    (lambda: ops.uda_loss(torch.zeros(3, 4), torch.zeros(3, 5)), "logits_weak"),
    (lambda: ops.uda_loss(torch.zeros(3, 4), torch.zeros(3, 4), temperature=0), "temperature"),
    # non-finite settings: NaN would pass a plain `<= 0` test, an infinite temperature makes a
    # -inf logit's probability NaN, and a NaN threshold masks every row without a word
    (lambda: ops.pseudo_labels(torch.zeros(3, 4), temperature=float("nan")), "temperature"),
    (lambda: ops.pseudo_labels(torch.zeros(3, 4), temperature=float("inf")), "temperature"),
    (lambda: ops.pseudo_labels(torch.zeros(3, 4), threshold=float("nan")), "threshold"),
    (lambda: ops.uda_loss(torch.zeros(3, 4), torch.zeros(3, 4), temperature=float("inf")),
     "temperature"),
    (lambda: ops.uda_loss(torch.zeros(3, 4), torch.zeros(3, 4), threshold=float("nan")),
     "threshold"),
])
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_opcheck(use):
    use("torch")
    x = _logits(5, 7, torch.float32, "cpu", 1).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 6])
    t = torch.softmax(_logits(5, 7, torch.float32, "cpu", 2), 1)
    m = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5])
    op = torch.ops.mpl_fast
    torch.library.opcheck(op.soft_cross_entropy.default, (x, y, None, m, 0.1, "mean", True))
    torch.library.opcheck(op.soft_cross_entropy.default, (x, None, t, None, 0.0, "none", True))
    torch.library.opcheck(op.pseudo_labels.default, (x.detach(), 0.7, 0.5))
    torch.library.opcheck(op.uda_loss.default, (t.log(), x, 0.7, 0.2, "sum", True))


def test_fullgraph_compile(use):
    use("triton")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, xs, y):
        pl = ops.pseudo_labels(x, temperature=0.7, threshold=0.5)
        ce = ops.soft_cross_entropy(xs, pl.labels, label_smoothing=0.1, mask=pl.mask)
        uda, _ = ops.uda_loss(x, xs, temperature=0.7, threshold=0.5)
        return ce + uda + ops.soft_cross_entropy(xs, y)

    x = _logits(6, 10, torch.float32, "cpu", 1)
    xs = _logits(6, 10, torch.float32, "cpu", 2).requires_grad_()
    y = torch.arange(6)
    out = step(x, xs, y)
    out.backward()
    g_compiled = xs.grad.clone()
    xs.grad = None
    pl = ops.pseudo_labels(x, temperature=0.7, threshold=0.5)
    eager = (ops.soft_cross_entropy(xs, pl.labels, label_smoothing=0.1, mask=pl.mask)
             + ops.uda_loss(x, xs, temperature=0.7, threshold=0.5)[0]
             + ops.soft_cross_entropy(xs, y))
    eager.backward()
    assert torch.allclose(out, eager) and torch.allclose(g_compiled, xs.grad)


@pytest.mark.gpu
def test_cuda_graph_capture_and_inductor():
    x = _logits(64, 1000, torch.bfloat16, "cuda", 1)
    xs = _logits(64, 1000, torch.bfloat16, "cuda", 2).requires_grad_()
    y = torch.randint(0, 1000, (64,), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())

    def body():
        pl = ops.pseudo_labels(x, temperature=0.7, threshold=0.1)
        loss = ops.soft_cross_entropy(xs, pl.labels, mask=pl.mask) + \
            ops.uda_loss(x, xs, 0.7, 0.1)[0] + ops.soft_cross_entropy(xs, y)
        return loss, torch.autograd.grad(loss, xs)[0]

    with torch.cuda.stream(s):
        want = body()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = body()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(got[0], want[0]) and torch.allclose(got[1].float(), want[1].float())
    compiled = torch.compile(lambda a, b: ops.soft_cross_entropy(a, b), fullgraph=True)
    assert torch.allclose(compiled(xs, y), ops.soft_cross_entropy(xs, y))


@pytest.mark.parametrize("backend,device", _backends())
def test_eager_calls_bypass_the_dispatcher_and_match_the_registered_op(use, monkeypatch,
                                                                       backend, device):
    """In plain eager mode the public functions run an autograd.Function around the same body
    (two dispatcher round trips less); values and gradients equal the registered op's."""
    from mpl_fast.ops import backend as backend_mod

    use(backend)
    x = _logits(37, 100, torch.bfloat16, device, 51)
    weak = _logits(37, 100, torch.bfloat16, device, 52)
    y = torch.arange(37, device=device) % 100
    m = (torch.arange(37, device=device) % 3 != 0).float()

    def run():
        xg = x.clone().requires_grad_()
        ce = ops.soft_cross_entropy(xg, y, label_smoothing=0.1, mask=m)
        uda, mask = ops.uda_loss(weak, xg, temperature=0.7, threshold=0.3)
        pl = ops.pseudo_labels(weak, temperature=0.7, threshold=0.3)
        names = {type(ce.grad_fn).__name__, type(uda.grad_fn).__name__}
        (2.0 * ce + 0.5 * uda).backward()
        return [ce, uda, mask, *pl, xg.grad], names

    fast, fast_names = run()
    monkeypatch.setattr(backend_mod, "plain_eager", lambda *tensors: False)
    registered, op_names = run()
    assert fast_names == {"_SoftCrossEntropyEagerBackward", "_UdaLossEagerBackward"}
    assert not op_names & fast_names
    for a, b in zip(fast, registered):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("registered", [False, True], ids=["eager_function", "registered_op"])
def test_backward_fills_no_zeros_for_the_outputs_it_ignores(use, monkeypatch, backend, device,
                                                             registered):
    """The mask's and the gradient buffer's grads are never used: autograd must not fill them
    with zeros (an N x C fill per call for the buffer, an extra kernel for the mask), whichever
    way the op runs. Only the mask used downstream: no gradient at all."""
    from torch.profiler import profile

    from mpl_fast.ops import backend as backend_mod

    use(backend)
    if registered:
        monkeypatch.setattr(backend_mod, "plain_eager", lambda *tensors: False)
    n, c = 37, 100
    x = _logits(n, c, torch.float32, device, 61).requires_grad_()
    weak = _logits(n, c, torch.float32, device, 62)
    y = torch.arange(n, device=device) % c
    ce = ops.soft_cross_entropy(x, y, label_smoothing=0.1)
    uda, mask = ops.uda_loss(weak, x, temperature=0.7, threshold=0.0)
    with profile(record_shapes=True) as prof:
        (ce + uda).backward()
    fills = [e.name for e in prof.events()
             if e.name in ("aten::zeros", "aten::zero_", "aten::zeros_like", "aten::fill_")
             and any(s in ([n], [n, c]) for s in e.input_shapes)]
    assert fills == []
    want = torch.func.grad(lambda t: F.cross_entropy(t, y, label_smoothing=0.1) + (
        -(torch.softmax(weak / 0.7, 1) * torch.log_softmax(t, 1)).sum(1).mean()))(x.detach())
    assert torch.allclose(x.grad, want, atol=1e-5)
    x.grad = None
    _, mask = ops.uda_loss(weak, x, temperature=0.7, threshold=0.0)
    assert not mask.requires_grad and x.grad is None


def test_traced_and_faked_calls_take_the_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mpl_fast.ops import backend as backend_mod

    x = torch.randn(5, 7)
    assert backend_mod.plain_eager(x, None)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x).requires_grad_()
        assert not backend_mod.plain_eager(fx)
        loss = ops.soft_cross_entropy(fx, torch.zeros(5, dtype=torch.int64))
        uda, mask = ops.uda_loss(fx.detach(), fx)
        pl = ops.pseudo_labels(fx.detach())
    assert loss.shape == () and uda.shape == () and mask.shape == (5,)
    assert pl.probs.shape == (5, 7) and pl.labels.dtype == torch.int64


@pytest.mark.parametrize("backend,device", _backends())
def test_eager_backward_hands_on_the_forward_gradient_without_a_copy(use, monkeypatch, backend,
                                                                     device):
    import importlib

    sce_mod = importlib.import_module("mpl_fast.ops.soft_cross_entropy")
    use(backend)
    written = []
    impl = sce_mod._soft_cross_entropy_impl

    def spy(*args):
        loss, grad = impl(*args)
        written.append(grad.data_ptr())
        return loss, grad
    monkeypatch.setattr(sce_mod, "_soft_cross_entropy_impl", spy)
    x = _logits(9, 5, torch.float32, device, 41).requires_grad_()
    (3.0 * ops.soft_cross_entropy(x, torch.arange(9, device=device) % 5)).backward()
    assert x.grad.data_ptr() == written[0]


@pytest.mark.parametrize("n,c", [(70, 11), (9, 1000), (5, 5000), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_programs", [1, 2, None])
def test_scale_rows_kernel_against_a_float64_reference(n, c, dtype, max_programs):
    """The in-place scale of the loss ops' backward, each program looping over several tiles of
    rows when the grid is smaller than the tiles (1 program: all of them): a single scale (1:
    nothing written; 0.5; -3) or one a row (some exactly 1), rows chunked above 4096 classes."""
    from mpl_fast.kernels.scale_rows import scale_rows_forward

    g = seeds.generator(n * c)
    base = (torch.randn(n, c, generator=g) * 4).to(dtype)
    per_row = torch.where(torch.rand(n, generator=g) > 0.5, 1.0, torch.randn(n, generator=g))
    for scale in (torch.tensor(1.0), torch.tensor(0.5), torch.tensor(-3.0), per_row,
                  per_row.repeat_interleave(2)[::2]):  # strided per-row scales
        grad = base.clone()
        scale_rows_forward(grad, scale, max_programs)
        s = scale.double()[:, None] if scale.dim() else scale.double()
        want = (base.double() * s).to(dtype)
        # one rounding of the fp32 product to dtype: equal to the float64 product rounded,
        # but for ties
        assert torch.allclose(grad.double(), want.double(), rtol=2 ** -7, atol=0), scale
        if scale.dim() == 0 and float(scale) == 1.0:
            assert torch.equal(grad, base)
        if scale.dim():
            keep = scale == 1.0
            assert torch.equal(grad[keep], base[keep])


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
def test_pseudo_labels_first_maximum_in_streamed_rows(use, backend, device):
    """Rows streamed in chunks of 4096 columns: the label is the first maximum, whether the
    maxima share a chunk, share a lane (4096 columns apart), or neither."""
    use(backend)
    c = 9000
    ties = [(4106, 10), (4106, 4105), (100, 8200), (8999, 8998), (0, 4096)]
    x = torch.randn(len(ties) + 1, c, generator=seeds.generator(5))
    for row, cols in enumerate(ties):
        x[row, list(cols)] = 10.0
    x[len(ties)] = -float("inf")  # no maximum to find: column 0, like torch.argmax
    out = ops.pseudo_labels(x.to(device))
    assert out.labels.tolist() == [min(cols) for cols in ties] + [0]
    assert torch.allclose(out.probs.cpu()[:-1], torch.softmax(x[:-1].double(), 1).float(),
                          atol=1e-6)


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [10, 1000, 9000])
def test_a_dominant_logit_is_probability_one_under_a_temperature(use, backend, device, dtype, c):
    """Logits in the thousands, one of them 200 above the rest: softmax(x / T) is exactly 1 there
    and 0 elsewhere. The largest probability must be 1, not 1 +- an ulp of x / T (a compiled
    x * (1/T) - max contracted into one FMA made it 1.0002 on the H200, and UDA's mask at
    threshold 1 then dropped rows whose target is certain)."""
    use(backend)
    g = seeds.generator(c)
    n = 7
    x = torch.randn(n, c, generator=g) * 3 + 3000
    top = torch.randint(0, c, (n,), generator=g)
    x[torch.arange(n), top] = 3200 + torch.rand(n, generator=g) * 50
    x = x.to(dtype).to(device)
    pl = ops.pseudo_labels(x, temperature=0.7, threshold=1.0)
    assert pl.labels.tolist() == top.tolist()
    assert pl.max_prob.tolist() == [1.0] * n
    assert pl.mask.tolist() == [1.0] * n
    assert torch.equal(pl.probs, torch.nn.functional.one_hot(top, c).float().to(device))
    strong = _logits(n, c, dtype, device, c + 1)
    loss, mask = ops.uda_loss(x, strong, temperature=0.7, threshold=1.0, reduction="none")
    assert mask.tolist() == [1.0] * n
    strong64 = strong.double()
    want = torch.logsumexp(strong64, 1) - strong64[torch.arange(n), top.to(device)]
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-5)


def _streamed_edge_rows(c, seed):
    """Rows of c > 4096 classes that stress a streamed softmax: -inf entries (a lane's first
    element, whole stretches, all but one), a max that rises in every chunk (rescales) or sits in
    the first column, and a range wide enough that most weights underflow to 0."""
    g = seeds.generator(seed)
    x = torch.randn(6, c, generator=g) * 3
    x[0, ::4096] = -float("inf")  # lane 0 of every chunk
    x[0, 1000:2500] = -float("inf")
    x[1] = -float("inf")
    x[1, c - 3] = 2.0  # all but one
    x[2] = torch.linspace(-50.0, 50.0, c)  # the max rises chunk after chunk
    x[3] = torch.linspace(50.0, -50.0, c)  # the max is the first column
    x[4] *= 400.0  # exp underflows for nearly every entry
    return x


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_rows_with_infinities_and_wide_ranges(use, backend, device, dtype):
    """The three ops on rows streamed in chunks (per-row or per-lane statistics), against the
    float64 truth: finite where the truth is, -inf entries adding nothing where their weight is
    0, gradients equal."""
    use(backend)
    c = 9000
    x = _streamed_edge_rows(c, 11).to(dtype)
    y = torch.tensor([5, c - 3, c - 1, 0, 17, 4200])
    xg = x.clone().to(device).requires_grad_()
    loss = ops.soft_cross_entropy(xg, y.to(device), reduction="none")
    loss.sum().backward()
    x64 = x.double().requires_grad_()
    truth = loss_truth.soft_ce_rows(x64, y)
    truth.sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(loss.cpu().double(), truth, rtol=tol, atol=tol), (loss, truth)
    assert torch.allclose(xg.grad.cpu().double(), x64.grad, atol=tol, rtol=0)

    pl = ops.pseudo_labels(x.to(device), temperature=0.7)
    p64 = torch.softmax(x.double() / 0.7, 1)
    # no worse than torch's own float32 softmax plus 1e-6 (row 4's logits reach ~1e4 / 0.7,
    # where float32 itself strays by up to ~1e-4 for some draws of the rows)
    own = (torch.softmax(x.float() / 0.7, 1).double() - p64).abs().max().item() + 1e-6
    assert (pl.probs.cpu().double() - p64).abs().max() <= own
    assert (pl.max_prob.cpu().double() - p64.max(1).values).abs().max() <= own
    assert pl.labels.tolist() == x.float().argmax(1).tolist()

    # UDA: the weak rows above as targets; the strong row -inf where its target weight is 0
    strong = torch.randn(6, c, generator=seeds.generator(12)).to(dtype)
    strong[0, 1000:2500] = -float("inf")  # weak is -inf there too: weight 0
    strong[1, :100] = -float("inf")
    sg = strong.clone().to(device).requires_grad_()
    loss_u, mask = ops.uda_loss(x.to(device), sg, temperature=0.7, threshold=0.0)
    (loss_u * 6).backward()
    s64 = strong.double().requires_grad_()
    rows, mask64 = loss_truth.uda_rows(x, s64, 0.7, 0.0)
    rows.sum().backward()
    assert torch.equal(mask.cpu().double(), mask64)
    loss_u, rows = loss_u.detach(), rows.detach()
    assert abs(float(loss_u) * 6 - float(rows.sum())) <= tol * max(1.0, float(rows.abs().sum()))
    assert torch.isfinite(sg.grad).all()
    assert torch.allclose(sg.grad.cpu().double(), s64.grad, atol=tol, rtol=0)


def _large_logits(n, c, offset, g):
    """Rows near `offset` (the sign alternating by row), each with a clear maximum and a
    runner-up 8.5-9.5 below it: softmax gives the runner-up about 1e-4, which m + log(s) in
    float32 rounds away once |m| is in the thousands (the kernels did until 2026-11-27: a
    gradient of exactly 1 at the maximum, 1.4e-4 from the truth, where torch is within 1e-7)."""
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    x = torch.randn(n, c, generator=g) * 3 + sign * offset
    top = torch.randint(0, c, (n,), generator=g)
    rows = torch.arange(n)
    x[rows, top] = x.max(1).values + 20
    x[rows, (top + 1) % c] = x[rows, top] - 8.5 - torch.rand(n, generator=g)
    return x, top


@pytest.mark.parametrize("backend,device", _backends(pipelined=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [10, 1000, 9000])
@pytest.mark.parametrize("offset", [30.0, 4000.0])
def test_large_logits_lose_no_more_precision_than_torch(use, backend, device, dtype, c, offset):
    """Logits far from 0 (a row's max in the hundreds or thousands): per-row losses and
    gradients of the cross-entropy (hard targets, half of them the row's maximum, where the
    loss is only log(sum exp(x - max)); smoothed; soft) and of UDA within torch's own error
    against the float64 truth, in one tile and streamed."""
    use(backend)
    extra = _truncation(backend, device, dtype)
    g = seeds.generator(("large", c, offset))
    n = 6
    x, top = _large_logits(n, c, offset, g)
    y = torch.where(torch.arange(n) < n // 2, top, torch.randint(0, c, (n,), generator=g))
    soft = torch.softmax(torch.randn(n, c, generator=g) * 2, 1)
    x = x.to(dtype)
    for target, ls in ((y, 0.0), (y, 0.15), (soft, 0.0)):
        xg = x.clone().to(device).requires_grad_()
        loss = ops.soft_cross_entropy(xg, target.to(device), label_smoothing=ls, reduction="none")
        loss.sum().backward()
        x64 = x.double().requires_grad_()
        truth = loss_truth.soft_ce_rows(x64, target, ls)
        truth.sum().backward()
        xt = x.clone().requires_grad_()  # torch's own op, in the same dtype
        own = F.cross_entropy(xt, target.to(dtype) if target.dim() == 2 else target,
                              label_smoothing=ls, reduction="none")
        own.sum().backward()
        for row in range(n):  # each row on its own scale: a loss of 1e-4 beside one of 20
            _no_worse_than_torch(loss.detach().cpu()[row], own.detach()[row],
                                 truth.detach()[row], dtype)
        _no_worse_than_torch(xg.grad.cpu(), xt.grad, x64.grad, dtype, extra)

    weak = torch.randn(n, c, generator=g) * 4
    sg = x.clone().to(device).requires_grad_()
    loss, _ = ops.uda_loss(weak.to(device), sg, temperature=0.7, reduction="none")
    loss.sum().backward()
    s64 = x.double().requires_grad_()
    truth, _ = loss_truth.uda_rows(weak, s64, 0.7, 0.0)
    truth.sum().backward()
    q = torch.softmax(weak / 0.7, 1).to(dtype)
    st = x.clone().requires_grad_()
    own = -(q * torch.log_softmax(st, 1)).sum(1)
    own.sum().backward()
    for row in range(n):
        _no_worse_than_torch(loss.detach().cpu()[row], own.detach()[row], truth.detach()[row],
                             dtype)
    _no_worse_than_torch(sg.grad.cpu(), st.grad, s64.grad, dtype, extra)


@pytest.mark.parametrize("backend", ["triton", "triton-lanes"])
@pytest.mark.parametrize("c", [9, 5000])
def test_interpreted_kernels_warn_nothing(use, backend, c):
    """Under Triton's interpreter the lanes a mask drops log, divide and multiply 0 and -inf in
    numpy: with -inf logits, masked rows and a backward that scales, no RuntimeWarning reaches
    the caller (softmax_common.interpreter_quiet), and the values stay right."""
    import warnings

    use(backend)
    x = _logits(6, c, torch.float32, "cpu", 17)
    x[:, 0] = -float("inf")
    x[2, 3:] = -float("inf")
    y = torch.tensor([1, 2, 1, 4, 5, 6])
    probs = torch.softmax(_logits(6, c, torch.float32, "cpu", 18), 1)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    with warnings.catch_warnings():
        # RuntimeWarnings only: triton 3.6's interpreter warns a numpy deprecation of its own
        warnings.simplefilter("error", RuntimeWarning)
        labels = ops.pseudo_labels(x, temperature=0.5, threshold=0.6)
        xg = x.clone().requires_grad_()
        hard = ops.soft_cross_entropy(xg, y, mask=mask)
        soft = ops.soft_cross_entropy(xg, probs * torch.isfinite(x), reduction="sum")
        uda, _ = ops.uda_loss(x, xg, temperature=0.4, threshold=0.5)
        (2 * hard + 3 * soft + uda).backward()  # the backward's scale_rows runs (not by 1)
    x64 = x.double().requires_grad_()
    p64 = probs.double() * torch.isfinite(x)
    want = (2 * (loss_truth.soft_ce_rows(x64, y) * mask).mean()
            + 3 * loss_truth.soft_ce_rows(x64, p64).sum()
            + loss_truth.uda_rows(x.double(), x64, 0.4, 0.5)[0].mean())
    want.backward()
    assert torch.equal(labels.labels, x.argmax(1))
    assert torch.allclose(xg.grad.double(), x64.grad, atol=1e-5)
    assert torch.allclose((2 * hard + 3 * soft + uda).double(), want, atol=1e-4)


def test_an_interpreter_that_cannot_run_the_kernels_is_named_at_the_call(monkeypatch):
    """Where the installed triton's interpreter fails with the installed numpy, a loss op on CPU
    tensors under TRITON_INTERPRET=1 says so (triton 3.1 returned garbage argmax labels, 3.5 and
    3.6 failed deep inside Triton), and the torch backend still runs."""
    from mpl_fast.ops import backend

    conflict = backend.interpreter_conflict("3.5.1", "2.4.6")
    monkeypatch.setattr(backend, "_installed_conflict", lambda: conflict)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = torch.randn(3, 7)
    for name in (None, "triton"):
        if name:
            monkeypatch.setenv("MPL_FAST_BACKEND", name)
        with pytest.raises(RuntimeError, match=r"triton 3\.5\.1's interpreter .* numpy 2\.4\.6"):
            ops.pseudo_labels(logits)
        with pytest.raises(RuntimeError, match="'numpy<2.4'"):
            ops.uda_loss(logits, logits.clone().requires_grad_())
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    assert torch.equal(ops.pseudo_labels(logits).labels, logits.argmax(1))
