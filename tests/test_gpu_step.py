"""The MPL step and the data pipeline on a GPU: no host synchronisation inside the step, a
step captured in a CUDA graph (with eager or compiled networks) gives the eager step's losses,
and DALI's GPU ('mixed') stream gives the CPU stream's batches. All `gpu`-marked: skipped without
a CUDA device."""
import numpy as np
import pytest
import torch
from torch import nn

from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep

pytestmark = pytest.mark.gpu


def small_cnn(seed, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes)).cuda()


def batch(seed, b=8, mu=3, classes=10):
    g = torch.Generator().manual_seed(seed)
    img = lambda n: torch.randn(n, 3, 16, 16, generator=g).cuda()  # noqa: E731
    return MPLBatch(img(b), torch.randint(0, classes, (b,), generator=g).cuda(), img(b * mu),
                    img(b * mu))


def make_step(config, seed=0, amp=True, net=small_cnn):
    teacher, student = net(seed), net(seed + 1)
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,  # noqa: E731
                                    nesterov=True, fused=True)
    step = MPLStep(teacher, student, opt(teacher), opt(student), config,
                   autocast_dtype=torch.bfloat16 if amp else None,
                   generator=torch.Generator(device="cuda").manual_seed(seed))
    step.skip_nonfinite = True  # as the trainer runs it: the skip flags must not synchronise
    return step


CONFIGS = {
    "paper": MPLConfig(uda_weight=1.0, uda_threshold=0.5),
    "argmax_dot": MPLConfig(pseudo_labels="argmax", estimator="dot", uda_weight=1.0),
    "soft_second_order": MPLConfig(pseudo_labels="soft", estimator="second_order",
                                   baseline_decay=None),
    "weak_no_grad": MPLConfig(pseudo_labels="argmax", teacher_weak_no_grad=True, uda_weight=1.0),
    "weak_joint": MPLConfig(pseudo_labels="argmax", teacher_weak_no_grad="joint",
                            uda_weight=1.0),
    "joint_ce_old": MPLConfig(pseudo_labels="argmax", ce_old_forward="joint", uda_weight=1.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_never_synchronises_with_the_host(name):
    from mpl_fast.train.ema import ModelEMA, StepWithEMA

    inner = make_step(CONFIGS[name])
    # as the trainer runs it: the EMA update after the step, its decay taken on the device
    step = StepWithEMA(inner, ModelEMA(inner.student, 0.99), inner.student)
    step(batch(0), 0)  # first call: lazy state (momentum buffers, kernels)
    b = batch(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = step(b, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_step_in_a_cuda_graph_gives_the_eager_losses():
    from mpl_fast.train.graphed import GraphedStep

    config = MPLConfig(pseudo_labels="argmax", uda_weight=1.0, uda_ramp_steps=6,
                       baseline_decay=0.9)
    eager, inner = make_step(config), make_step(config)
    graphed = GraphedStep(inner, warmup_steps=2)
    for i in range(7):  # 2 eager warm-up steps on a side stream, capture, 4 replays
        b = batch(10 + i)
        got, want = graphed(b, i), eager(b, i)
        for key in ("teacher/loss", "student/loss", "student/ce_new", "h", "uda/scale"):
            g, r = float(got[key]), float(want[key])
            assert abs(g - r) <= 0.03 * abs(r) + 0.03, (i, key, g, r)
    assert graphed.graph is not None
    assert float(got["uda/scale"]) == 1.0 > float(graphed(batch(0), 0)["uda/scale"])


def _colour(c, i):
    return (40 + 60 * c, 30 + 30 * i, 200 - 50 * c)


@pytest.mark.parametrize("weak", [True, "joint", "shared"],
                         ids=["weak_apart", "weak_joint", "weak_shared"])
def test_compiled_networks_in_a_cuda_graph_give_the_eager_losses(weak):
    """#7's fastest path (model.compile + train.cuda_graph): inductor's kernels captured with
    the rest of the step, the gradient-free weak view (apart, its rows constant in the joint
    forward, or apart with the other views' statistics) and frozen-BN forwards included (each a variant dynamo compiles during the eager
    warm-up steps, none during capture)."""
    from mpl_fast.models.compiling import compile_net
    from mpl_fast.train.graphed import GraphedStep

    config = MPLConfig(pseudo_labels="argmax", uda_weight=1.0, teacher_weak_no_grad=weak)
    eager, inner = make_step(config), make_step(config)
    compile_net(inner.teacher, "default")
    compile_net(inner.student, "default")
    graphed = GraphedStep(inner, warmup_steps=3)
    for i in range(7):  # 3 eager (compiling) warm-up steps, capture, 3 replays
        b = batch(20 + i)
        got, want = graphed(b, i), eager(b, i)
        for key in ("teacher/loss", "student/loss", "student/ce_new", "h"):
            g, r = float(got[key]), float(want[key])
            assert abs(g - r) <= 0.03 * abs(r) + 0.03, (i, key, g, r)
    assert graphed.graph is not None


@pytest.mark.parametrize("weak", [False, "joint", "shared"],
                         ids=["weak_in_autograd", "weak_joint", "weak_shared"])
def test_compiled_checkpointed_networks_in_a_cuda_graph_give_the_eager_losses(weak):
    """model.compile + model.checkpoint=both + train.cuda_graph: each checkpoint traced as
    dynamo's higher-order op (or, under a torch-function mode, the weak rows constant or the
    statistics recorded, run eagerly and recomputed under that mode), the recomputation captured
    in the graph's backward."""
    from mpl_fast.models.checkpointing import checkpoint_blocks
    from mpl_fast.models.compiling import compile_net
    from mpl_fast.models.wrn import WideResNet
    from mpl_fast.train.graphed import GraphedStep

    def wrn(seed, checkpointed=False):
        torch.manual_seed(seed)
        net = WideResNet(10, depth=10, widen=1).cuda()
        if checkpointed:
            checkpoint_blocks(net)
            compile_net(net, "default")
        return net

    torch._dynamo.reset()
    config = MPLConfig(pseudo_labels="argmax", uda_weight=1.0, teacher_weak_no_grad=weak)
    eager = make_step(config, net=wrn)
    inner = make_step(config, net=lambda seed: wrn(seed, checkpointed=True))
    graphed = GraphedStep(inner, warmup_steps=3)
    for i in range(6):  # 3 eager (compiling) warm-up steps, capture, 2 replays
        b = batch(30 + i)
        got, want = graphed(b, i), eager(b, i)
        for key in ("teacher/loss", "student/loss", "student/ce_new", "h"):
            g, r = float(got[key]), float(want[key])
            assert abs(g - r) <= 0.03 * abs(r) + 0.03, (i, key, g, r)
    assert graphed.graph is not None


def test_a_graphed_step_skips_a_nonfinite_batch_on_the_device():
    """The step replayed from its graph, the EMA update with it, skips a batch whose losses are
    not finite (fused SGD's found_inf, no host read): weights, BatchNorm statistics and counts,
    momentum, the baseline and the EMA stay as they were; the next finite batch steps again."""
    from mpl_fast.train.ema import ModelEMA, StepWithEMA
    from mpl_fast.train.graphed import GraphedStep

    step = make_step(MPLConfig(pseudo_labels="argmax", uda_weight=1.0))
    ema = ModelEMA(step.student, 0.99)
    graphed = GraphedStep(StepWithEMA(step, ema, step.student), warmup_steps=2)
    for i in range(3):  # 2 eager warm-up steps, then the capture
        graphed(batch(40 + i), i)
    assert graphed.graph is not None and int(ema.updates) == 3

    from tests.step_state import ema_state, flat, learned_state

    state = lambda: flat(learned_state(step)) + ema_state(ema)  # noqa: E731

    before = state()
    bad = batch(50)
    bad.x_us = bad.x_us * float("nan")
    assert float(graphed(bad, 3)["nonfinite"]) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, state()))
    assert int(ema.updates) == 3  # the skipped replay did not count
    assert float(graphed(batch(51), 4)["nonfinite"]) == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(before, state()))
    assert int(ema.updates) == 4


def _solid_colour_tree(tmp_path, hw):
    """3 classes x 6 JPEGs of one colour each (_colour(class, i)), hw pixels: root/c<k>/<i>.jpg"""
    from PIL import Image

    root = tmp_path / "train"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            pixels = np.zeros((*hw, 3), np.uint8) + np.array(_colour(c, i), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg", quality=95)
    return root


@pytest.mark.parametrize("decode,augment", [("gpu", "gpu"), ("cpu", "gpu"), ("cpu", "cpu")])
def test_dali_gpu_eval_batches_match_the_cpu_ones(tmp_path, decode, augment):
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import eval_batches
    from mpl_fast.data.image_folder import index_folder

    index = index_folder(_solid_colour_tree(tmp_path, (40, 48)))
    got = list(eval_batches(index, 32, False, "cuda", batch_size=5, num_threads=1,
                            decode_device=decode, augment_device=augment))
    want = list(eval_batches(index, 32, False, "cpu", batch_size=5, num_threads=1))
    assert [y.tolist() for _, y in got] == [y.tolist() for _, y in want]
    for (xg, _), (xc, _) in zip(got, want):
        assert xg.is_cuda and xg.dtype == torch.float16 and xg.shape == xc.shape
        centre = (slice(None), slice(None), slice(12, 20), slice(12, 20))
        assert torch.allclose(xg[centre].float().mean(dim=(2, 3)).cpu(),
                              xc[centre].mean(dim=(2, 3)), atol=0.1)


@pytest.mark.parametrize("hw,small,sized,decode,augment,steps_per_run,hw_load,pipelines", [
    ((40, 48), False, False, "gpu", "gpu", 1, None, 1),
    ((40, 48), True, False, "gpu", "gpu", 1, None, 1),
    ((16, 16), True, True, "gpu", "gpu", 1, None, 1),
    ((16, 16), True, True, "cpu", "gpu", 1, None, 1),
    ((40, 48), False, False, "cpu", "gpu", 2, None, 1),
    ((16, 16), True, True, "cpu", "cpu", 2, None, 1),
    ((40, 48), False, False, "cpu", "cpu", 1, None, 1),
    ((16, 16), True, True, "gpu", "gpu", 1, 0.0, 1),
    ((40, 48), False, False, "gpu", "gpu", 1, 1.0, 1),
    ((16, 16), True, True, "once", "gpu", 1, None, 1),
    ((16, 16), True, True, "once", "cpu", 2, None, 2),
    ((40, 48), False, False, "gpu", "gpu", 1, None, 2)])
def test_dali_gpu_stream_gives_the_cpu_streams_batches(tmp_path, hw, small, sized, decode,
                                                       augment, steps_per_run, hw_load,
                                                       pipelines):
    """Large images (random-resized crop), small ones resized then padded and cropped (one
    slice on the GPU), and small ones already at the size (no resize); decoded on the GPU (its
    hardware JPEG engine's share at DALI's default, 0 or 1), the CPU, or once into memory,
    augmented on the GPU or the CPU (the output on the GPU whatever the placement), one or two
    steps a pipeline run, the unlabeled batch from one or two pipelines side by side."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec
    from mpl_fast.data.image_folder import all_of_size, balanced_split, index_folder

    index = index_folder(_solid_colour_tree(tmp_path, hw))
    assert all_of_size(index, 16) == sized
    split = balanced_split(index, per_class=2)
    spec = StreamSpec(batch_size=4, mu=2, image_size=16, small=small, num_threads=1, cutout=0,
                      sized=sized, decode_device=decode, augment_device=augment,
                      steps_per_run=steps_per_run, hw_decoder_load=hw_load,
                      unlabeled_pipelines=pipelines)
    gpu, cpu = DaliStream(index, split, spec, "cuda"), DaliStream(index, split, spec, "cpu")
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    for _ in range(3):
        g, c = gpu.next(), cpu.next()
        assert g.x_l.is_cuda and g.x_uw.is_cuda and g.y_l.is_cuda
        assert g.x_l.dtype == torch.float16 and c.x_l.dtype == torch.float32
        assert g.x_l.shape == c.x_l.shape == (4, 3, 16, 16)
        assert g.x_uw.shape == g.x_us.shape == c.x_uw.shape == (8, 3, 16, 16)
        assert g.x_l.is_contiguous(memory_format=torch.channels_last)
        assert set(g.y_l.tolist()) <= {0, 1, 2}
        # Solid-colour files: the centre of each weak-view row is its file's colour
        # (normalised; pad-and-crop moves small images by 2 px at most), as the CPU stream's
        # test checks for the CPU decoder.
        for row, i in enumerate(g.unlabeled_index.tolist()):
            cls, k = index.labels[i], int(index.files[i].split("/")[-1].split(".")[0])
            want = (torch.tensor(_colour(cls, k), dtype=torch.float32) - mean) / std
            got = g.x_uw[row, :, 6:10, 6:10].float().mean(dim=(1, 2)).cpu()
            assert torch.allclose(got, want, atol=0.1), (row, got, want)
        # the labeled rows name their files too (Reduced MPL's store rows), on the host, and
        # their labels are those files' classes
        assert g.labeled_index.device.type == "cpu"
        assert set(g.labeled_index.tolist()) <= set(split)
        assert g.y_l.tolist() == [index.labels[i] for i in g.labeled_index.tolist()]
        for row, i in enumerate(g.labeled_index.tolist()):
            cls, k = index.labels[i], int(index.files[i].split("/")[-1].split(".")[0])
            want = (torch.tensor(_colour(cls, k), dtype=torch.float32) - mean) / std
            got = g.x_l[row, :, 6:10, 6:10].float().mean(dim=(1, 2)).cpu()
            assert torch.allclose(got, want, atol=0.1), (row, got, want)
