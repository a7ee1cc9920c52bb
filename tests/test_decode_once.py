"""data.decode_device=once: small images decoded once into host memory, then cropped and
augmented from there (CPU mode, on JPEGs and PNGs written here)."""
import json
import shutil

import numpy as np
import pytest
import torch

from mpl_fast.data.image_folder import DataError, balanced_split, index_folder

pytest.importorskip("nvidia.dali")

CLASSES = ("ant", "bee", "cat")


def _noise_tree(root, per_class=(5, 4, 6), size=32, seed=0):
    """size x size JPEGs of random pixels: a file read in the wrong order would show."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in zip(CLASSES, per_class):
        (root / name).mkdir(parents=True)
        for i in range(count):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i}.jpg", quality=90)
    return root


COLOURS = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200)}


def _colour_tree(root, per_class=6, size=32):
    """size x size PNGs of one colour a class."""
    from PIL import Image

    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.zeros((size, size, 3), dtype=np.uint8) + np.array(COLOURS[c], np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i}.png")
    return root


def test_each_image_is_decoded_in_the_index_order(tmp_path, monkeypatch):
    from PIL import Image

    from mpl_fast.data import decode_once

    monkeypatch.setattr(decode_once, "BATCH", 4)  # several runs, the last one padded
    index = index_folder(_noise_tree(tmp_path / "t"))
    decoded = decode_once.decode_index(index, 32, num_threads=2, quiet=True)
    assert decoded.images.shape == (15, 32, 32, 3) and decoded.images.dtype == np.uint8
    assert decoded.labels == index.labels and decoded.classes == list(CLASSES)
    assert decoded.root == index.root
    for i, path in enumerate(index.files):
        want = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert np.abs(decoded.images[i].astype(int) - want).max() <= 2, path
    assert decode_once.decode_index(decoded, 32) is decoded  # arrays already: as they are


def test_decoding_once_reports_what_it_cannot_do(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from mpl_fast.data import decode_once

    root = _noise_tree(tmp_path / "t", per_class=(3, 3, 3))
    index = index_folder(root)
    decode_once.decode_index(index, 32, num_threads=1)
    err = capsys.readouterr().err
    assert "decoding 9 images once into memory" in err and "decoded 9 images in" in err
    with pytest.raises(DataError, match=r"ant_0\.jpg is 32x32"):
        decode_once.decode_index(index, 16, num_threads=1, quiet=True)
    monkeypatch.setattr(decode_once, "MAX_BYTES", 9 * 32 * 32 * 3 - 1)
    with pytest.raises(DataError, match="more than the"):
        decode_once.decode_index(index, 32, quiet=True)
    monkeypatch.undo()
    # a JPEG that passes the index's checks (its start and end markers) but does not decode,
    # among good ones: the error names it
    monkeypatch.setattr(decode_once, "BATCH", 8)
    good = (root / "bee" / "bee_0.jpg").read_bytes()
    rng = np.random.default_rng(1)
    (root / "bee" / "bee_9.jpg").write_bytes(
        good[:30] + rng.integers(0, 256, len(good) - 32, dtype=np.uint8).tobytes() + b"\xff\xd9")
    Image.open(root / "ant" / "ant_0.jpg").resize((40, 32)).save(root / "cat" / "cat_9.jpg")
    index = index_folder(root)
    assert not index.skipped
    with pytest.raises(DataError, match=r"cannot decode .*bee_9\.jpg$"):
        decode_once.decode_index(index, 32, num_threads=1, quiet=True)
    (root / "bee" / "bee_9.jpg").unlink()
    with pytest.raises(DataError, match=r"cat_9\.jpg is 40x32"):
        decode_once.decode_index(index_folder(root), 32, num_threads=1, quiet=True)


def test_placement_and_config_take_once():
    from mpl_fast.data.placement import Placement, placement
    from mpl_fast.train import config as cfg

    # to the later stages the images come from the CPU, so augmenting there is allowed
    assert placement(True, "once") == Placement(False, True, True)
    assert placement(True, "once", "cpu") == Placement(False, False, True)
    assert placement(False, "once") == Placement(False, False, False)
    config = cfg.load("cifar10_4k_short", ["data.decode_device=once"])
    assert config["data"]["decode_device"] == "once"
    with pytest.raises(cfg.ConfigError, match="decode_device"):
        cfg.load("cifar10_4k_short", ["data.decode_device=twice"])


@pytest.mark.parametrize("steps_per_run,pipelines", [(1, 1), (2, 1), (2, 2)])
def test_a_stream_decoded_once_gives_each_row_its_own_image(tmp_path, steps_per_run, pipelines):
    from mpl_fast.data.dali_pipelines import MEAN, STD
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec

    index = index_folder(_colour_tree(tmp_path / "t"))
    spec = StreamSpec(batch_size=6, mu=2, image_size=32, small=True, num_threads=1, cutout=8,
                      sized=True, decode_device="once", steps_per_run=steps_per_run,
                      unlabeled_pipelines=pipelines)
    stream = DaliStream(index, balanced_split(index, per_class=2), spec, "cpu")
    shutil.rmtree(tmp_path / "t")  # decoded already: the files are not read again
    mean, std = torch.tensor(MEAN), torch.tensor(STD)

    def colour(x):  # the image's most common pixel (crops pad with grey, cutout greys too)
        px = (x.permute(1, 2, 0).reshape(-1, 3) * std + mean).round().to(torch.int64)
        values, counts = px.unique(dim=0, return_counts=True)
        return tuple(values[counts.argmax()].tolist())

    for _ in range(3):
        b = stream.next()
        assert b.x_l.shape == (6, 3, 32, 32) and b.x_uw.shape == b.x_us.shape == (12, 3, 32, 32)
        assert b.x_l.dtype == torch.float32
        assert b.x_l.is_contiguous(memory_format=torch.channels_last)
        for x, y in zip(b.x_l, b.y_l.tolist()):
            assert colour(x) == COLOURS[y]
        for weak, strong, i in zip(b.x_uw, b.x_us, b.unlabeled_index.tolist()):
            assert colour(weak) == COLOURS[index.labels[i]]
            assert not torch.equal(weak, strong)


def test_training_decodes_once_for_the_run(tmp_path, monkeypatch):
    from mpl_fast.data import decode_once
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import TrainError, train

    root = tmp_path / "data"
    _colour_tree(root / "train")
    _colour_tree(root / "test", per_class=2)
    calls = []
    real = decode_once.decode_index
    monkeypatch.setattr(decode_once, "decode_index",
                        lambda index, *a, **k: (calls.append(len(index)), real(index, *a, **k))[1])
    overrides = ["data.name=image_folder", f"data.root={root}", "data.image_size=32",
                 "data.labeled_per_class=2", "data.batch_size=3", "data.mu=2",
                 "data.num_threads=1", "data.cutout=4", "data.decode_device=once",
                 "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                 "train.log_every=1", "train.finetune_steps=2", "train.device=cpu"]
    summary = train(cfg.load("digits", overrides), tmp_path / "run")
    assert 0.0 <= summary["finetuned_student_top1"] <= 1.0
    assert sorted(calls) == [6, 18]  # the test set and the training set, once each
    metrics = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/ema_student_top1" in r for r in metrics) == 2
    with pytest.raises(TrainError, match="decode_device=once needs small images"):
        train(cfg.load("digits", overrides + ["data.image_size=16"]), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_bench_data_times_a_once_variant(tmp_path, capsys):
    from mpl_fast import cli

    root = _noise_tree(tmp_path / "t", per_class=(6, 6, 6))
    common = ["bench", "data", "--root", str(root), "--device", "cpu", "--batch-size", "3",
              "--mu", "2", "--steps", "2", "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(common + ["--variant", "decode=cpu", "--variant", "decode=once",
                              "--variant", "decode=once,pipelines=2"]) == 0
    out = capsys.readouterr().out
    cpu, once, two = [json.loads(r) for r in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert [r["unlabeled_pipelines"] for r in (cpu, once, two)] == [1, 1, 2]
    assert two["mpl_images_per_s"] > 0 and "2 unlabeled pipelines" in out
    assert (cpu["decode_device"], once["decode_device"]) == ("cpu", "once")
    assert once["decode_once_s"] > 0 and "decode_once_s" not in cpu
    assert once["bare_images_per_s_by_decode"] == cpu["bare_images_per_s_by_decode"]
    assert list(once["bare_images_per_s_by_decode"]) == ["cpu"]
    assert "decode once" in out
    assert cli.main(common + ["--image-size", "16", "--variant", "decode=once"]) == 2
    assert "decode=once needs small images all 16x16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # 3 x 2 unlabeled rows a step: 4 cannot share them
        cli.main(common + ["--variant", "pipelines=4"])
    assert err.value.code == 2 and "pipelines=4 must divide" in capsys.readouterr().err


@pytest.mark.parametrize("augment", ["gpu", "cpu"], ids=["augment_on_gpu", "augment_on_cpu"])
def test_images_decoded_once_go_to_the_augment_device_undecoded(augment):
    """Feeding a GPU from memory: no decoder in any pipeline, the crops and RandAugment on the
    augment device, normalisation on the GPU (graphs defined, not built: no GPU needed)."""
    from mpl_fast.data import dali_pipelines as P
    from mpl_fast.data.placement import placement
    from tests.test_image_folder import _op_devices

    where = placement(True, "once", augment)
    images = np.zeros((8, 32, 32, 3), np.uint8)
    kw = dict(batch_size=4, num_threads=1, device_id=0, seed=1)
    pipes = {"labeled": P.labeled_pipeline(P.ArraySource(images, [0] * 8, 4), [0] * 8, 32, True,
                                           where, sized=True, **kw),
             "unlabeled": P.unlabeled_pipeline(P.ArraySource(images, list(range(8)), 4), 32,
                                               True, where, 2, 9, 8, sized=True, **kw),
             "eval": P.eval_pipeline(P.ArraySource(images, [0] * 8, 4, shuffle=False), [0] * 8,
                                     32, True, where, sized=True, **kw)}
    for name, pipe in pipes.items():
        devices = _op_devices(pipe)
        assert not any(k.startswith("decoders__") for k in devices), name
        assert devices["ExternalSource"] == {"cpu"}
        for op in {"Slice", "WarpAffine", "Erase"} & set(devices):
            assert devices[op] == {augment}, (name, op)
        assert devices["CropMirrorNormalize"] == {"gpu"}
    assert "WarpAffine" in _op_devices(pipes["unlabeled"])


@pytest.mark.parametrize("decode", ["cpu", "once"])
def test_replicas_evaluate_disjoint_shares_of_the_test_set(tmp_path, monkeypatch, decode):
    """Under torchrun each replica's evaluation stream decodes and hands out its share of the
    test set alone (eval_share: every world-th batch), pixels and labels as one process has
    them; with decode_device=once each replica decodes its share only."""
    from mpl_fast.data import decode_once
    from mpl_fast.data.sources import build_data, eval_share
    from mpl_fast.train import config as cfg

    root = tmp_path / "data"
    _noise_tree(root / "train")
    _noise_tree(root / "test", per_class=(4, 3, 4), seed=1)  # 11 images: batches 4, 4, 3
    d = cfg.load("digits", ["data.name=image_folder", f"data.root={root}",
                            "data.image_size=32", "data.labeled_per_class=2",
                            "data.num_threads=1", f"data.decode_device={decode}"])["data"]
    decoded = []
    real = decode_once.decode_index
    monkeypatch.setattr(decode_once, "decode_index",
                        lambda index, *a, **k: (decoded.append(len(index)),
                                                real(index, *a, **k))[1])

    def batches(rank, world):
        data = build_data(d, 1, torch.device("cpu"), rank=rank, world=world)
        got = list(data.eval_batches(4, "cpu"))
        return (torch.cat([x for x, _ in got]) if got else torch.zeros(0, 3, 32, 32),
                [label for _, y in got for label in y.tolist()])
    alone_x, alone_y = batches(0, 1)
    assert alone_y == sorted(alone_y) and len(alone_y) == 11
    for world in (2, 3, 4):
        decoded.clear()
        shares = [batches(rank, world) for rank in range(world)]
        for rank, (x, y) in enumerate(shares):
            rows = eval_share(11, 4, rank, world)
            assert y == [alone_y[r] for r in rows], (world, rank)
            assert torch.equal(x, alone_x[rows]), (world, rank)
        assert sum(len(y) for _, y in shares) == 11
        if decode == "once":  # each replica its test share (none: no pipeline, no decoding)
            assert decoded == [len(y) for _, y in shares if y], (world, decoded)
    # `mpl-fast logits` under torchrun: any rows of a split, in their order, as a whole pass
    # has them (the training split's 15 images; decoded once, the split is decoded whole)
    data = build_data(d, 1, torch.device("cpu"))
    whole = list(data.ordered_batches("train", 4, "cpu"))
    train_x, train_y = torch.cat([x for x, _ in whole]), torch.cat([y for _, y in whole])
    for rows in (eval_share(15, 4, 1, 2), [14, 0, 3], []):
        got = list(data.ordered_batches("train", 4, "cpu", rows))
        assert sum(len(y) for _, y in got) == len(rows)
        if rows:
            assert torch.equal(torch.cat([x for x, _ in got]), train_x[rows])
            assert torch.equal(torch.cat([y for _, y in got]), train_y[rows])
