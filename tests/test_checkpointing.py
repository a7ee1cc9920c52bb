"""BN-aware activation checkpointing: same outputs, gradients and BN buffers as the plain model,
BN statistics updated once per forward, less saved activation memory."""
import contextlib
import copy

import pytest
import torch

from mpl_fast.models.checkpointing import CheckpointedBlock, checkpoint_blocks
from mpl_fast.models.resnet import resnet50
from mpl_fast.models.wrn import WideResNet


def _saved_bytes(fn):
    total = [0, 0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        total[1] = max(total[1], total[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[1]


def _check_equal(make, shape):
    torch.manual_seed(0)
    plain = make().double()
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt) > 0
    x = torch.randn(*shape, dtype=torch.float64)
    _assert_trains_alike(plain, ckpt, x)
    return plain, ckpt, x


def _assert_trains_alike(plain, ckpt, x, mode=contextlib.nullcontext, rows=None):
    """Two training steps of each on x (float64; the loss on its first `rows` rows, under
    `mode`): the same gradients, and state dicts (BN buffers included) equal key for key."""
    for model in (plain, ckpt):
        model.train()
        for _ in range(2):  # two steps: running statistics compound
            with mode():
                z = model(x)
            z[:rows].square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), n
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    for (n, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), n


def test_wrn_checkpointed_equals_plain_and_counts_bn_once():
    plain, ckpt, x = _check_equal(lambda: WideResNet(10, depth=10, widen=1), (4, 3, 16, 16))
    tracked = [int(b) for n, b in ckpt.named_buffers() if n.endswith("num_batches_tracked")]
    assert set(tracked) == {2}  # two training forwards, each counted once


@pytest.mark.slow
@pytest.mark.parametrize("weak_rows", ["none", "constant"])
def test_checkpointing_under_torch_compile_counts_bn_once(weak_rows):
    """model.compile + model.checkpoint: dynamo traces each checkpoint as a higher-order op (one
    graph, no break: the blocks compiled) whose recomputation leaves the BatchNorm statistics
    alone and saves memory. Under constant_rows (teacher_weak_no_grad=joint) the checkpoints run
    eagerly, recomputing under the mode: the gradient stays the mode's."""
    from mpl_fast.models.compiling import compile_net
    from mpl_fast.mpl.constant_rows import constant_rows
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled afresh: no shapes marked dynamic by other tests' networks
    torch.manual_seed(0)
    plain = WideResNet(10, depth=10, widen=1)
    ckpt = copy.deepcopy(plain)
    checkpoint_blocks(ckpt)
    compile_net(ckpt, "default")
    counters.clear()
    x = torch.randn(6, 3, 16, 16)
    mode = (lambda: constant_rows(6, 2)) if weak_rows == "constant" else contextlib.nullcontext
    for model in (plain, ckpt):
        model.train()
        for _ in range(2):
            with mode():
                z = model(x)
            z[:4].square().mean().backward()
    if weak_rows == "none":
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n
    for (n, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), n
    if weak_rows == "none":  # the compiled recomputation: fewer saved bytes (measured 37%)
        big = WideResNet(10, depth=16, widen=2)
        big_ckpt = copy.deepcopy(big)
        checkpoint_blocks(big_ckpt)
        for model in (big, big_ckpt):
            compile_net(model, "default")
        x = torch.randn(8, 3, 32, 32)
        full = _saved_bytes(lambda: big(x).sum().backward())
        assert _saved_bytes(lambda: big_ckpt(x).sum().backward()) < 0.6 * full


def test_checkpointed_blocks_recompute_under_the_forwards_function_modes():
    """torch.utils.checkpoint recomputes outside the torch-function modes the forward ran under;
    CheckpointedBlock re-enters them, so constant_rows's layers (teacher_weak_no_grad=joint) save
    and differentiate the same tensors in the recomputation (plain checkpointing raises there)."""
    from mpl_fast.mpl.constant_rows import constant_rows

    torch.manual_seed(5)
    plain = WideResNet(10, depth=10, widen=1).double()
    ckpt = copy.deepcopy(plain)
    checkpoint_blocks(ckpt)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    _assert_trains_alike(plain, ckpt, x, mode=lambda: constant_rows(6, 2), rows=4)
    tracked = [int(b) for n, b in ckpt.named_buffers() if n.endswith("num_batches_tracked")]
    assert set(tracked) == {2}


def test_resnet_block_checkpointing_equals_plain():
    torch.manual_seed(1)

    def small_resnet():
        return torch.nn.Sequential(*list(resnet50(10).children())[:5],
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    _check_equal(small_resnet, (2, 3, 32, 32))


def test_naive_checkpointing_updates_bn_twice():
    """The trap this module exists for: plain torch.utils.checkpoint counts BN twice."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(2)
    model = WideResNet(10, depth=10, widen=1)
    block = model.blocks[0]
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert int(block.bn1.num_batches_tracked) == 2
    wrapped = CheckpointedBlock(copy.deepcopy(WideResNet(10, depth=10, widen=1).blocks[0]))
    wrapped(x).sum().backward()
    assert int(wrapped.block.bn1.num_batches_tracked) == 1


def test_checkpointing_saves_activation_memory():
    torch.manual_seed(3)
    plain = WideResNet(10, depth=16, widen=2)
    ckpt = copy.deepcopy(plain)
    checkpoint_blocks(ckpt)
    x = torch.randn(8, 3, 32, 32)
    full = _saved_bytes(lambda: plain(x).sum().backward())
    less = _saved_bytes(lambda: ckpt(x).sum().backward())
    assert less < 0.6 * full, (less, full)


def test_eval_and_no_grad_run_the_block_directly():
    model = WideResNet(10, depth=10, widen=1)
    checkpoint_blocks(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("ce_old_forward", ["separate", "joint"])
def test_checkpointed_student_in_the_mpl_step_with_every_estimator(ce_old_forward):
    """Extra forwards under frozen_bn_stats with gradients (dot, second_order) recompute too;
    CE_old's forward without autograd runs the blocks directly."""
    from mpl_fast.mpl import MPLBatch, MPLConfig

    x = torch.randn(4, 3, 8, 8)
    batch = MPLBatch(x, torch.tensor([0, 1, 2, 3]), torch.randn(6, 3, 8, 8),
                     torch.randn(6, 3, 8, 8))
    for estimator, labels in (("loss_diff", "argmax"), ("dot", "argmax"),
                              ("second_order", "soft")):
        config = MPLConfig(pseudo_labels=labels, estimator=estimator, baseline_decay=None,
                           ce_old_forward=ce_old_forward)
        (m0, b0), (m1, b1) = [_wrn_step(config, ckpt, batch) for ckpt in (False, True)]
        for key in ("teacher/loss", "student/loss", "student/ce_old", "student/ce_new", "h"):
            assert torch.allclose(m0[key], m1[key], rtol=1e-4, atol=1e-6), (estimator, key)
        assert b0["student"].keys() == b1["student"].keys()
        for name, buf in b0["student"].items():
            assert torch.allclose(buf.float(), b1["student"][name].float(), atol=1e-5), \
                (estimator, name)


def _wrn_step(config, checkpointed, batch):
    """(metrics, state dicts) of one MPL step of small WRNs, seeded alike, blocks checkpointed
    or not."""
    from mpl_fast.mpl import MPLStep

    torch.manual_seed(4)
    teacher, student = WideResNet(10, depth=10, widen=1), WideResNet(10, depth=10, widen=1)
    if checkpointed:
        checkpoint_blocks(teacher)
        checkpoint_blocks(student)
    step = MPLStep(teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1),
                   torch.optim.SGD(student.parameters(), lr=0.1), config)
    metrics = step(batch)
    return metrics, {"teacher": teacher.state_dict(), "student": student.state_dict()}


def test_checkpointing_the_first_blocks_saves_most_memory_per_recomputed_flop():
    """limit=N wraps the first N blocks in forward order; on WRN-28-2 half of them give more than
    half of all blocks' saving for about half the extra FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    plain = WideResNet(10, depth=28, widen=2)
    x = torch.randn(8, 3, 32, 32)  # enough images for activations to outweigh the weights

    def cost(model):
        with FlopCounterMode(display=False) as flops:
            saved = _saved_bytes(lambda: model(x).sum().backward())
        return saved, flops.get_total_flops()

    full_bytes, full_flops = cost(plain)
    half, every = copy.deepcopy(plain), copy.deepcopy(plain)
    assert checkpoint_blocks(half, limit=6) == 6 and checkpoint_blocks(every) == 12
    wrapped = [name for name, m in half.named_modules() if isinstance(m, CheckpointedBlock)]
    assert wrapped == [f"blocks.{i}" for i in range(6)]  # the first six, in forward order
    assert checkpoint_blocks(half, limit=100) == 6  # the other six; wrapped ones are skipped
    half = copy.deepcopy(plain)
    checkpoint_blocks(half, limit=6)
    half_bytes, half_flops = cost(half)
    every_bytes, every_flops = cost(every)
    assert 1 - half_bytes / full_bytes > 0.5  # measured 54%
    assert 1 - every_bytes / full_bytes > 0.8  # measured 85%
    assert (half_flops - full_flops) < 0.6 * (every_flops - full_flops)  # measured 52%
    for model in (half, every):  # recomputation adds FLOPs; results are checked elsewhere
        assert cost(model)[1] > full_flops


def test_checkpointing_a_limited_number_of_blocks_equals_plain():
    torch.manual_seed(0)
    plain = WideResNet(10, depth=16, widen=1).double()
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt, limit=2) == 2
    _assert_trains_alike(plain, ckpt, torch.randn(4, 3, 16, 16, dtype=torch.float64))


def test_checkpointed_teacher_with_the_weak_rows_constant_in_the_mpl_step():
    """teacher_weak_no_grad=joint with model.checkpoint=both: the step's losses, the teacher's
    update and both networks' BN buffers are those of the same step without checkpointing."""
    from mpl_fast.mpl import MPLBatch, MPLConfig

    g = torch.Generator().manual_seed(6)
    x = lambda n: torch.randn(n, 3, 8, 8, generator=g)  # noqa: E731
    batch = MPLBatch(x(4), torch.tensor([0, 1, 2, 3]), x(6), x(6))
    config = MPLConfig(pseudo_labels="argmax", uda_weight=1.0, uda_temperature=0.7,
                       teacher_weak_no_grad="joint")
    (m0, s0), (m1, s1) = [_wrn_step(config, ckpt, batch) for ckpt in (False, True)]
    for key in ("teacher/loss", "teacher/uda", "student/loss", "student/ce_old", "h"):
        assert torch.allclose(m0[key], m1[key], rtol=1e-4, atol=1e-6), key
    for role in ("teacher", "student"):  # the teacher's weights and every BN buffer
        assert s0[role].keys() == s1[role].keys()
        for name, t in s0[role].items():
            assert torch.allclose(t.float(), s1[role][name].float(), rtol=1e-4, atol=1e-5), name


class _Residual(torch.nn.Module):
    """A block as timm builds them: its own sub-modules (a conv and BatchNorm) and parameters."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def _timm_like():
    """Stages as Sequentials inside a Sequential (an EfficientNet's layout; a ResNet's layers or a
    ViT's blocks are one level of it), a one-block stage, and plain runs of layers."""
    nn = torch.nn
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),  # a stem
        nn.Sequential(nn.Sequential(_Residual(6), _Residual(6)),
                      nn.Sequential(_Residual(6)),
                      nn.Sequential(_Residual(6), _Residual(6), _Residual(6))),
        nn.Sequential(nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1)),  # layers, not blocks
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))


def test_networks_without_our_blocks_checkpoint_their_repeated_blocks():
    """Without WRN or ResNet blocks, the blocks of the innermost Sequentials of two or more
    blocks of one kind are checkpointed (timm's ResNet-18, ConvNeXt-atto, EfficientNet-B0 and
    ViT-tiny: 8, 12, 14 and 12 blocks, gradients and buffers exactly the plain network's, checked
    with timm 1.0.31 outside CI), BN-aware like ours; a network of plain layers has none."""
    from mpl_fast.models.checkpointing import default_block_types, repeated_blocks
    from mpl_fast.models.small_cnn import small_cnn

    torch.manual_seed(8)
    plain = _timm_like().double()
    assert len(repeated_blocks(plain)) == 5
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt, limit=2) == 2
    wrapped = [n for n, m in ckpt.named_modules() if isinstance(m, CheckpointedBlock)]
    assert wrapped == ["1.0.0", "1.0.1"]  # the first two, in registration order
    assert checkpoint_blocks(ckpt) == 3 and checkpoint_blocks(ckpt) == 0  # then the rest, once
    _assert_trains_alike(plain, ckpt, torch.randn(3, 3, 8, 8, dtype=torch.float64))
    assert checkpoint_blocks(small_cnn(10, 3)) == 0
    # our blocks, where a network has them, are what it checkpoints (not its Sequentials)
    wrn = WideResNet(10, depth=16, widen=1)
    assert checkpoint_blocks(wrn) == 6
    assert {type(m.block) for m in wrn.modules() if isinstance(m, CheckpointedBlock)} \
        == {default_block_types()[0]}
