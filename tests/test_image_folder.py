"""Image-folder indexing, splits, and the DALI pipelines in CPU mode, on small JPEGs written
here with PIL (solid colours, so a crop of an image keeps its file's colour)."""
import numpy as np
import pytest
import torch

from mpl_fast.data.image_folder import (DataError, balanced_split, index_folder,
                                        split_from_list)

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 8


def _color(c, i):
    return (40 + 60 * c, 20 + 25 * i, 200 - 50 * c)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("folder") / "train"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = np.zeros((40, 48, 3), dtype=np.uint8) + np.array(_color(c, i), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i}.JPEG", quality=95)
    return root


def test_index_labels_match_folders(tree):
    index = index_folder(tree)
    assert index.classes == list(CLASSES) and len(index) == 24 and not index.skipped
    for f, y in zip(index.files, index.labels):
        assert f.split("/")[-2] == CLASSES[y]


def test_indexing_reports_its_progress_class_by_class(tree):
    """ImageNet's 1.28M files take a minute or more to index, in which a run said nothing."""
    calls = []
    index_folder(tree, lambda done, total, detail: calls.append((done, total, detail)))
    assert calls == [(c + 1, len(CLASSES), f"{(c + 1) * PER_CLASS} images")
                     for c in range(len(CLASSES))]


def test_bad_input(tree, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        index_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        index_folder(tmp_path)
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "empty").mkdir()
    good = (tree / "ant" / "ant_0.JPEG").read_bytes()
    (bad / "a" / "ok.jpg").write_bytes(good)
    (bad / "a" / "cut.jpg").write_bytes(good[:200])
    (bad / "a" / "text.jpg").write_text("not an image")
    (bad / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="empty holds no usable images"):
        index_folder(bad)
    (bad / "empty").rmdir()
    index = index_folder(bad)
    assert len(index) == 1
    reasons = {p.split("/")[-1]: r for p, r in index.skipped}
    assert reasons == {"cut.jpg": "truncated JPEG (no end-of-image marker)",
                       "text.jpg": "not a JPEG or PNG file", "notes.txt": "not an image file name"}


def test_an_image_whose_header_cannot_be_read_stops_the_size_check_in_one_line(tree, tmp_path):
    """The index checks a file's first and last bytes only; the size check that follows reads
    each header (PIL) and used to end in PIL's traceback on a file corrupt in between."""
    from mpl_fast.data.image_folder import all_of_size

    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    good = (tree / "ant" / "ant_0.JPEG").read_bytes()
    (bad / "a" / "ok.jpg").write_bytes(good)
    # read before ok.jpg (which is 48 x 40: the check stops at the first other size)
    (bad / "a" / "aa.jpg").write_bytes(good[:4] + b"\x55" * (len(good) - 6) + good[-2:])
    index = index_folder(bad)
    assert len(index) == 2 and not index.skipped  # it passes the index check
    with pytest.raises(DataError, match="cannot read the image header of .*aa.jpg"):
        all_of_size(index, 40)
    assert all_of_size(index_folder(tree), 40) is False  # 48 x 40: another size, no error


def test_a_dali_failure_is_told_by_its_operator_and_cause():
    """DALI's error starts with "Critical error in pipeline:", the cause comes lines later; the
    one-line DataError must carry the cause."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    from mpl_fast.data.dali_stream import dali_failure

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def empty_range():
        return fn.random.uniform(range=[0.0, 0.0], shape=[2])

    pipe = empty_range()
    with pytest.raises(RuntimeError) as caught:
        pipe.build()
        pipe.run()
    said = dali_failure(caught.value)
    assert "\n" not in said and not said.startswith("Critical error"), said
    assert "random.uniform" in said and "range" in said.lower(), said
    assert dali_failure(RuntimeError("")) == "RuntimeError"


def test_splits(tree, tmp_path):
    index = index_folder(tree)
    a, b = balanced_split(index, per_class=3, seed=1), balanced_split(index, per_class=3, seed=1)
    assert a == b and a != balanced_split(index, per_class=3, seed=2)
    assert np.bincount([index.labels[i] for i in a]).tolist() == [3, 3, 3]
    assert len(balanced_split(index, percent=25, seed=0)) == 6
    with pytest.raises(DataError, match="only 8"):
        balanced_split(index, per_class=9)
    lst = tmp_path / "subset.txt"
    lst.write_text("ant_1.JPEG\ncat_7.JPEG\n")
    assert [index.files[i].split("/")[-1] for i in split_from_list(index, lst)] == \
        ["ant_1.JPEG", "cat_7.JPEG"]
    lst.write_text("ant_1.JPEG\nn0000_1.JPEG\n")
    with pytest.raises(DataError, match="1 of 2 files are not"):
        split_from_list(index, lst)


def _stream(tree, **kw):
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec

    index = index_folder(tree)
    spec = StreamSpec(**{"batch_size": 4, "mu": 2, "image_size": 16, "small": False,
                         "num_threads": 1, "cutout": 6, **kw})
    return index, DaliStream(index, balanced_split(index, per_class=2), spec, "cpu")


def test_stream_shapes_labels_and_views(tree):
    index, stream = _stream(tree)
    for _ in range(3):
        b = stream.next()
        assert b.x_l.shape == (4, 3, 16, 16) and b.x_uw.shape == b.x_us.shape == (8, 3, 16, 16)
        assert b.x_l.dtype == torch.float32
        assert b.x_l.is_contiguous(memory_format=torch.channels_last)
        assert b.y_l.dtype == torch.int64 and set(b.y_l.tolist()) <= {0, 1, 2}
        # the weak view of each row is its file's solid colour (normalised)
        mean = torch.tensor([0.485, 0.456, 0.406]) * 255
        std = torch.tensor([0.229, 0.224, 0.225]) * 255
        for row, i in enumerate(b.unlabeled_index.tolist()):
            c, k = index.labels[i], int(index.files[i].split("_")[-1].split(".")[0])
            assert int(b.y_u[row]) == c  # the true class, for the pseudo/accuracy diagnostic
            want = (torch.tensor(_color(c, k), dtype=torch.float32) - mean) / std
            got = b.x_uw[row].mean(dim=(1, 2))
            assert torch.allclose(got, want, atol=0.1), (row, got, want)
            assert not torch.allclose(b.x_us[row], b.x_uw[row])  # strong differs (cutout, RA)


@pytest.mark.parametrize("steps_per_run", [1, 3])
def test_labeled_rows_match_their_class_colour(tree, steps_per_run):
    index, stream = _stream(tree, steps_per_run=steps_per_run)
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    for _ in range(4):  # across runs of the pipelines when several steps come from one
        b = stream.next()
        assert b.x_l.shape == (4, 3, 16, 16) and b.y_l.shape == (4,)
        blue = (b.x_l[:, 2].mean(dim=(1, 2)) * std[2] + mean[2]).tolist()
        for y, value in zip(b.y_l.tolist(), blue):
            assert abs(value - (200 - 50 * y)) < 8  # the blue channel encodes the class
        _check_labeled_rows(index, stream, b)
    b = stream.next_labeled()
    assert b.x_l.shape == (4, 3, 16, 16) and b.x_uw.shape[0] == 0
    _check_labeled_rows(index, stream, b)


def _check_labeled_rows(index, stream, b):
    """Each labeled row names its file (batch.labeled_index, e.g. a Reduced-MPL store's row):
    one of the labeled split, of the row's class, and of all files the nearest in colour to the
    row (its median colour: a crop may bring in some padding)."""
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    colours = torch.tensor([_color(y, int(f.split("_")[-1].split(".")[0]))
                            for f, y in zip(index.files, index.labels)], dtype=torch.float32)
    assert b.labeled_index.dtype == torch.int64 and b.labeled_index.device.type == "cpu"
    for img, y, i in zip(b.x_l, b.y_l.tolist(), b.labeled_index.tolist()):
        assert i in stream._labeled_rows.tolist() and index.labels[i] == y
        colour = img.flatten(1).median(dim=1).values * std + mean
        assert int((colours - colour).norm(dim=1).argmin()) == i


def test_several_steps_a_run_hand_out_the_readers_order(tree):
    """steps_per_run=k runs each pipeline once for k steps: the steps get the files in the
    order one step a run would (the reader's order does not depend on the batch size), and each
    step its own rows, as views that stay channels_last."""
    _, one = _stream(tree, seed=4)
    _, three = _stream(tree, seed=4, steps_per_run=3)
    a = [one.next() for _ in range(6)]
    b = [three.next() for _ in range(6)]
    assert [x.unlabeled_index.tolist() for x in a] == [x.unlabeled_index.tolist() for x in b]
    seen = torch.cat([x.unlabeled_index for x in b[:3]]).tolist()
    assert sorted(seen) == list(range(24))  # one epoch of 24 files in the first run
    for x in b:
        assert x.x_uw.shape == x.x_us.shape == (8, 3, 16, 16)
        assert x.x_uw.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(b[0].x_uw, b[1].x_uw)
    from mpl_fast.data.image_folder import DataError

    with pytest.raises(DataError, match="steps_per_run"):
        _stream(tree, steps_per_run=0)


def test_stage_placement():
    from mpl_fast.data.placement import Placement, placement

    assert placement(False, "gpu", "gpu") == Placement(False, False, False)
    assert placement(False, "cpu", "cpu") == Placement(False, False, False)
    assert placement(True) == Placement(True, True, True)
    assert placement(True, "cpu") == Placement(False, True, True)
    assert placement(True, "cpu", "cpu") == Placement(False, False, True)
    with pytest.raises(ValueError, match="augment_device=cpu needs decode_device=cpu"):
        placement(True, "gpu", "cpu")
    with pytest.raises(ValueError, match="decode_device"):
        placement(True, "tpu")
    assert placement(True, hw_decoder_load=0) == Placement(True, True, True, 0.0)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        placement(True, hw_decoder_load=1.5)


@pytest.mark.parametrize("decode,hw", [("gpu", None), ("gpu", 0.0), ("cpu", 0.0)])
def test_the_hardware_decoders_share_reaches_the_gpu_decoders_only(decode, hw):
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data import dali_pipelines as P
    from mpl_fast.data.placement import placement

    where = placement(True, decode, "gpu", hw)
    files = [f"x{i}.jpg" for i in range(8)]
    kw = dict(batch_size=4, num_threads=1, device_id=0, seed=1)
    for small in (True, False):
        pipe = P.labeled_pipeline(files, [0] * 8, 32, small, where, **kw)
        pipe._build_graph()
        decoders = [i._op for i in pipe._ops
                    if getattr(i._op, "schema_name", "").startswith("decoders__")]
        assert len(decoders) == 1
        got = decoders[0]._init_args.get("hw_decoder_load")  # DALI's private graph API, 2.x
        assert got == (hw if decode == "gpu" else None), (small, got)


@pytest.mark.parametrize("pipelines", [1, 2, 3])
@pytest.mark.parametrize("steps_per_run", [1, 2])
def test_unlabeled_pipelines_side_by_side_make_each_step_from_their_shards(tree, pipelines,
                                                                           steps_per_run):
    """unlabeled_pipelines=P: a step's 12 unlabeled rows come 12/P from each of P pipelines
    reading disjoint shards, so two steps are one epoch of the 24 files, each row with its own
    file's colour and index, in both views, channels_last; a P that does not divide the
    unlabeled batch is refused."""
    index, stream = _stream(tree, mu=3, unlabeled_pipelines=pipelines,
                            steps_per_run=steps_per_run, seed=7)
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    steps = [stream.next() for _ in range(4)]
    for first in (0, 2):
        seen = torch.cat([b.unlabeled_index for b in steps[first:first + 2]]).tolist()
        assert sorted(seen) == list(range(24))
    for b in steps:
        assert b.x_uw.shape == b.x_us.shape == (12, 3, 16, 16)
        assert b.x_uw.is_contiguous(memory_format=torch.channels_last)
        assert b.x_us.is_contiguous(memory_format=torch.channels_last)
        for row, i in enumerate(b.unlabeled_index.tolist()):
            c, k = index.labels[i], int(index.files[i].split("_")[-1].split(".")[0])
            want = (torch.tensor(_color(c, k), dtype=torch.float32) - mean) / std
            assert torch.allclose(b.x_uw[row].mean(dim=(1, 2)), want, atol=0.1), (row, i)
    assert len({pipe.seed for pipe in stream.unl}) == pipelines  # augmentation seeds apart
    from mpl_fast.data.image_folder import DataError
    from mpl_fast.train import config as cfg

    with pytest.raises(DataError, match="unlabeled_pipelines=5 must be >= 1 and divide"):
        _stream(tree, mu=3, unlabeled_pipelines=5)
    assert cfg.load("cifar10_4k_short", ["data.unlabeled_pipelines=4"])["data"][
        "unlabeled_pipelines"] == 4
    with pytest.raises(cfg.ConfigError, match="data.unlabeled_pipelines must be >= 1"):
        cfg.load("cifar10_4k_short", ["data.unlabeled_pipelines=0"])


def test_ranks_and_their_unlabeled_pipelines_read_disjoint_shards(tree):
    """Under DDP (2 ranks) with 2 unlabeled pipelines a rank: 4 shards of the 24 files, so two
    steps of both ranks are one epoch, every file once, none on both ranks."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec

    index = index_folder(tree)
    spec = StreamSpec(batch_size=4, mu=3, image_size=16, small=False, num_threads=1, cutout=0,
                      unlabeled_pipelines=2)
    labeled = balanced_split(index, per_class=2)
    seen = []
    for rank in range(2):
        stream = DaliStream(index, labeled, spec, "cpu", rank=rank, world=2)
        steps = [stream.next() for _ in range(2)]
        assert all(b.x_uw.shape[0] == 6 and b.x_l.shape[0] == 2 for b in steps)
        seen.append(torch.cat([b.unlabeled_index for b in steps]).tolist())
    assert len(set(seen[0])) == len(set(seen[1])) == 12
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(24))


def test_shards_are_disjoint_and_cover(tree):
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data import dali_pipelines as P

    index = index_folder(tree)
    seen = []
    for shard in range(2):
        pipe = P.unlabeled_pipeline(index.files, 16, False, False, 0, 0, 0, shard, 2, 5,
                                    batch_size=4, num_threads=1, device_id=None, seed=1)
        pipe.build()
        got = []
        for _ in range(3):  # 12 files per shard, batch 4: one epoch
            got += pipe.run()[2].as_array().flatten().tolist()
        seen.append(set(got))
        assert len(got) == len(set(got)) == 12
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def test_eval_batches_cover_every_file_once(tree):
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import eval_batches

    index = index_folder(tree)
    labels = []
    for x, y in eval_batches(index, 16, True, "cpu", batch_size=5, num_threads=1):
        assert x.shape[1:] == (3, 16, 16)
        labels += y.tolist()
    assert labels == index.labels


@pytest.mark.parametrize("batch_size", [5, 24, 50])
def test_an_evaluation_stream_covers_every_file_once_a_pass(tree, batch_size):
    """One pipeline for every evaluation of a run: each pass hands out every file once with its
    own label, though a pass starts where the reader stopped (batches of 5 wrap around 24 files;
    a batch of 50 holds two passes and more)."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import EvalStream

    index = index_folder(tree)
    stream = EvalStream(index, 16, True, "cpu", batch_size=batch_size, num_threads=1)
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    every_file = sorted((c, i) for c in range(len(CLASSES)) for i in range(PER_CLASS))
    for _ in range(3):
        seen = []
        for x, y in stream.batches():
            rgb = x.mean(dim=(2, 3)) * std + mean  # a solid colour per file: _color(class, i)
            for label, (_, green, blue) in zip(y.tolist(), rgb.tolist()):
                assert abs(blue - (200 - 50 * label)) < 8  # the image's own label
                seen.append((label, round((green - 20) / 25)))
        assert sorted(seen) == every_file


def test_train_on_an_image_folder(tree, tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    import json

    from mpl_fast.data import dali_stream
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import train

    built = []  # evaluation pipelines: one for the run's several evaluations
    init = dali_stream.EvalStream.__init__
    monkeypatch.setattr(dali_stream.EvalStream, "__init__",
                        lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])

    root = tree.parent
    if not (root / "test").exists():
        (root / "test").symlink_to(tree)
    config = cfg.load("digits", [
        "data.name=image_folder", f"data.root={root}", "data.image_size=16",
        "data.labeled_per_class=2", "data.batch_size=4", "data.mu=2", "data.num_threads=1",
        "data.cutout=4", "data.steps_per_run=2", "data.unlabeled_pipelines=2",
        "train.steps=6", "train.eval_every=3",
        "train.checkpoint_every=3",
        "train.log_every=1", "train.finetune_steps=2", "optim.student_wait_steps=2",
        "train.device=cpu"])
    summary = train(config, tmp_path)
    assert 0.0 <= summary["teacher_top1"] <= 1.0
    assert 0.0 <= summary["finetuned_student_top1"] <= 1.0
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    evaluations = [r for r in map(json.loads, rows) if "eval/ema_student_top1" in r]
    assert len(evaluations) == 2 and len(built) == 1
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["labeled"] == 6 and split["classes"] == list(CLASSES)
    config = cfg.load("digits", ["data.name=image_folder", f"data.root={tmp_path}/none",
                                 "data.image_size=16"])
    from mpl_fast.train.loop import TrainError
    with pytest.raises(TrainError, match="does not exist"):
        train(config, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # a run that cannot start leaves no folder behind


def test_a_missing_test_split_is_named_as_such(tree, tmp_path, monkeypatch):
    """root/train without root/test was reported as 'data root root/test does not exist'. It is
    found before the train tree is indexed (ImageNet's: a minute or more)."""
    pytest.importorskip("nvidia.dali")
    import shutil

    from mpl_fast.data import sources
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import Run, TrainError

    root = tmp_path / "data"
    shutil.copytree(tree, root / "train")
    data = ["data.name=image_folder", f"data.root={root}", "data.image_size=16",
            "data.labeled_per_class=2", "data.cutout=4", "train.device=cpu"]
    indexed = []
    real_index_folder = sources.index_folder
    monkeypatch.setattr(sources, "index_folder",
                        lambda folder, *a: indexed.append(folder) or real_index_folder(folder, *a))
    with pytest.raises(TrainError, match=r"the test split \(root/test\) .*data.test_root=DIR"):
        Run(cfg.load("digits", data), tmp_path / "run")
    assert indexed == []
    with pytest.raises(TrainError, match=r"data.test_root .*nowhere does not exist"):
        Run(cfg.load("digits", [*data, f"data.test_root={tmp_path / 'nowhere'}"]), tmp_path / "r")
    Run(cfg.load("digits", [*data, f"data.test_root={root / 'train'}"]), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


def test_a_checkpoint_whose_data_moved_says_how_to_point_at_it(tree, tmp_path, capsys):
    """eval (and logits, pseudo_label_quality) read the run's saved data.root: where the data
    moved, the one-line error says which --set points at it, and that --set works."""
    pytest.importorskip("nvidia.dali")
    import shutil

    from mpl_fast import cli

    data = tmp_path / "data"
    shutil.copytree(tree, data / "train")
    shutil.copytree(tree, data / "test")
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--steps", "1",
                     "--set", "data.name=image_folder", "--set", f"data.root={data}",
                     "--set", "data.image_size=16", "--set", "data.labeled_per_class=2",
                     "--set", "data.batch_size=4", "--set", "data.mu=1", "--set", "data.cutout=4",
                     "--set", "data.num_threads=1", "--set", "train.device=cpu"]) == 0
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"data.root {data} does not exist here: --set data.root=DIR" in err, err
    assert err.count("\n") == 1
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"),
                     "--set", f"data.root={tmp_path / 'moved'}"]) == 0
    assert "teacher_top1" in capsys.readouterr().out


def test_reduced_mpl_on_an_image_folder(tree, tmp_path):
    """`mpl-fast logits` over an image folder sees every file once, in the index's order (each
    image is its file's colour), and a Reduced-MPL run's batches carry the stored rows of the
    files they hold."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.logit_store import LogitStore
    from mpl_fast.train import config as cfg, teacher_logits
    from mpl_fast.train.loop import Run, TrainError, train

    root = tree.parent
    if not (root / "test").exists():
        (root / "test").symlink_to(tree)
    data = ["data.name=image_folder", f"data.root={root}", "data.image_size=16",
            "data.labeled_per_class=2", "data.batch_size=4", "data.mu=2", "data.num_threads=1",
            "train.log_every=1", "train.finetune_steps=0", "train.device=cpu"]
    train(cfg.load("digits", data + ["train.steps=2"]), tmp_path / "big")
    run = Run(cfg.load("digits", data), tmp_path / "unused")
    index = run.data.index
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    seen = []
    for x, y in run.data.ordered_batches("train", 5, "cpu"):
        seen += [((img.mean(dim=(1, 2)) * std + mean), label) for img, label in zip(x, y.tolist())]
    assert len(seen) == len(index) == 24
    for i, (colour, label) in enumerate(seen):
        k = int(index.files[i].split("_")[-1].split(".")[0])
        assert label == index.labels[i]
        assert torch.allclose(colour, torch.tensor(_color(label, k), dtype=torch.float32), atol=8)
    network, report = teacher_logits.write(
        tmp_path / "logits", lambda: teacher_logits.from_checkpoint(tmp_path / "big", "teacher"),
        batch_size=5)
    assert network == "teacher" and report["train"]["rows"] == 24
    reduced = Run(cfg.load("digits", data + ["model.teacher=reduced", "mpl.uda_weight=0",
                                             f"model.teacher_logits={tmp_path / 'logits'}"]),
                  tmp_path / "unused")
    store = LogitStore(tmp_path / "logits" / "train.logits")
    for _ in range(2):
        b = reduced.data.next()
        assert torch.equal(b.teacher_l, store[b.labeled_index])
        assert torch.equal(b.teacher_us, store[b.unlabeled_index])
        _check_labeled_rows(index, reduced.data.stream, b)
    # the store names the files below the data's root: the data may move, not change
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(root, moved, symlinks=False)
    reduced_there = data[:1] + [f"data.root={moved}"] + data[2:] + [
        "model.teacher=reduced", "mpl.uda_weight=0", f"model.teacher_logits={tmp_path / 'logits'}"]
    Run(cfg.load("digits", reduced_there), tmp_path / "unused")
    (moved / "train" / "ant" / "ant_0.JPEG").rename(moved / "train" / "ant" / "ant_00.JPEG")
    with pytest.raises(TrainError, match="written for other data"):
        Run(cfg.load("digits", reduced_there), tmp_path / "unused")


def test_logits_of_a_pretrained_timm_network(tree, tmp_path, monkeypatch, capsys):
    """--model NAME --pretrained: timm's pretrained network (a stand-in here: no download) over
    an image folder; refused where its classes or its input normalisation do not fit the data."""
    pytest.importorskip("nvidia.dali")
    import sys
    import types

    from mpl_fast import cli
    from mpl_fast.data.logit_store import LogitStore
    from mpl_fast.models.small_cnn import small_cnn
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import Run

    fake = types.SimpleNamespace(classes=3, mean=(0.485, 0.456, 0.406))

    def create_model(name, pretrained=False, num_classes=None, in_chans=3):
        torch.manual_seed(0 if pretrained else 1)  # the "pretrained" weights differ from a new net
        net = small_cnn(fake.classes if pretrained else num_classes, in_chans)
        net.num_classes = fake.classes if pretrained else num_classes
        net.pretrained_cfg = {"mean": fake.mean, "std": (0.229, 0.224, 0.225)}
        return net

    fake.create_model, fake.is_model = create_model, lambda name: name == "fakenet"
    monkeypatch.setitem(sys.modules, "timm", fake)
    root = tree.parent
    if not (root / "test").exists():
        (root / "test").symlink_to(tree)
    data = ["--set", "data.name=image_folder", "--set", f"data.root={root}", "--set",
            "data.image_size=16", "--set", "data.num_threads=1", "--set", "train.device=cpu",
            "--set", "data.labeled_per_class=2"]
    args = ["logits", "--model", "fakenet", "--pretrained", *data, "--batch-size", "7"]
    assert cli.main([*args, "--out", str(tmp_path / "logits")]) == 0
    run = Run(cfg.load("digits", [a for a in data if a != "--set"]), tmp_path / "unused")
    net = create_model("fakenet", pretrained=True).eval()
    with torch.no_grad():
        want = torch.cat([net(x) for x, _ in run.data.ordered_batches("train", 5, "cpu")])
    store = LogitStore(tmp_path / "logits" / "train.logits")
    assert store.meta["model"] == "timm:fakenet" and store.meta["weights"] == "pretrained"
    assert torch.allclose(store[torch.arange(24)].float(), want, rtol=2e-3, atol=2e-3)
    capsys.readouterr()
    fake.mean = (0.5, 0.5, 0.5)
    assert cli.main([*args, "--out", str(tmp_path / "other")]) == 2
    assert "expects inputs normalised with mean (0.5, 0.5, 0.5)" in capsys.readouterr().err
    fake.mean, fake.classes = (0.485, 0.456, 0.406), 1000
    assert cli.main([*args, "--out", str(tmp_path / "other")]) == 2
    assert "predicts 1000 classes, the data has 3" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_bench_data_command(tree, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    import json

    from mpl_fast import cli

    assert cli.main(["bench", "data", "--root", str(tree), "--device", "cpu", "--batch-size",
                     "4", "--mu", "2", "--steps", "3", "--threads", "1", "--out",
                     str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("summary:") and "img/s" in last
    record = json.loads((tmp_path / "data.jsonl").read_text())
    assert record["mpl_images_per_s"] > 0 and record["bare_images_per_s"] > 0
    assert "parts_images_per_s" not in record
    assert "bare_whole_decode_images_per_s" not in record  # small images: one bare pipeline
    assert cli.main(["bench", "data", "--root", str(tree), "--device", "cpu", "--batch-size",
                     "4", "--mu", "2", "--steps", "2", "--threads", "1", "--parts", "--out",
                     str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads((tmp_path / "data.jsonl").read_text().splitlines()[-1])
    parts = record["parts_images_per_s"]
    assert sorted(parts) == ["labeled", "unlabeled", "unlabeled_no_randaugment"]
    assert all(v > 0 for v in parts.values())
    assert sum("alone:" in line for line in lines) == 3 and lines[-1].startswith("summary:")
    # variants: a record each, compared with the one bare pipeline of the CPU
    assert cli.main(["bench", "data", "--root", str(tree), "--device", "cpu", "--batch-size",
                     "4", "--mu", "2", "--steps", "2", "--threads", "1", "--variant",
                     "steps_per_run=2", "--variant", "threads=2,decode=gpu", "--out",
                     str(tmp_path)]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in
               (tmp_path / "data.jsonl").read_text().splitlines()[-2:]]
    assert [(r["steps_per_run"], r["threads"]) for r in records] == [(2, 1), (1, 2)]
    assert all(r["decode_device"] == r["augment_device"] == "cpu" for r in records)
    assert all(list(r["bare_images_per_s_by_decode"]) == ["cpu"] for r in records)
    assert "2 step(s) a run" in out and out.strip().splitlines()[-1].startswith("summary:")
    assert cli.main(["bench", "data", "--root", str(tmp_path / "none")]) == 2
    for bad in ("decode=tpu", "augment=cpu", "steps_per_run=0", "speed=1", "hw_load=2",
                "hw_load=x"):
        with pytest.raises(SystemExit) as err:
            cli.main(["bench", "data", "--root", str(tree), "--variant", bad])
        assert err.value.code == 2
    assert "--variant" in capsys.readouterr().err


def test_bench_methods_trains_three_methods_at_one_budget(tree, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    import json

    from mpl_fast import cli

    root = tree.parent
    if not (root / "test").exists():
        (root / "test").symlink_to(tree)
    tiny = ["--set", f"data.root={root}", "--set", "data.image_size=16", "--set",
            "data.labeled_per_class=2", "--set", "data.batch_size=4", "--set", "data.mu=2",
            "--set", "data.num_threads=1", "--set", "data.cutout=4", "--set",
            "model.teacher=small_cnn", "--set", "model.student=small_cnn", "--set",
            "train.steps=4", "--set", "train.eval_every=2", "--set", "train.finetune_steps=0",
            "--set", "train.device=cpu", "--set", "optim.student_wait_steps=1",
            "--set", "mpl.uda_ramp_steps=2", "--set", "optim.warmup_steps=1",
            # the tree's images are of several sizes: decoded in the stream, not once (the
            # preset's 4 unlabeled pipelines and 4 steps a run are kept)
            "--set", "data.decode_device=gpu"]
    out, results = tmp_path / "runs", tmp_path / "results"
    args = ["bench", "methods", *tiny, "--out", str(out), "--results", str(results)]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (results / "methods.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["supervised", "uda", "mpl"]
    for r in records:
        saved = (out / r["method"] / "config.yaml").read_text()
        assert ("method: supervised" in saved) == (r["method"] == "supervised")
        assert [step for step, _ in r["ema_student_top1_curve"]] == [2, 4]
        assert r["ema_student_top1_curve"][-1][1] == r["ema_student_top1"]
        assert r["images_per_second"] > 0 and r["gpu"] == "cpu" and r["steps"] == 4
        assert 0.0 <= r["data_wait_share"] <= 1.0
    assert records[0]["teacher_top1"] is None and records[2]["teacher_top1"] is not None
    assert records[0]["teacher_top1_curve"] is None  # supervised: no teacher
    assert [s for s, _ in records[2]["teacher_top1_curve"]] == [2, 4]
    assert records[2]["teacher_top1_curve"][-1][1] == records[2]["teacher_top1"]
    assert records[0]["mpl"] is None and records[1]["mpl"]["mpl_weight"] == 0
    assert records[2]["mpl"]["ce_old_forward"] == "separate"
    assert records[0]["feedback"] is None  # supervised: no teacher, no h
    lines = (out / "mpl" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines if '"h"' in line]
    learned = [r for r in logged if r["lr/student"] > 0]
    assert records[2]["feedback"]["logged_steps"] == len(learned) > 0
    assert records[2]["feedback"]["h_mean"] == pytest.approx(
        sum(r["h"] for r in learned) / len(learned))
    import yaml
    assert yaml.safe_load((out / "uda" / "config.yaml").read_text())["mpl"]["mpl_weight"] == 0
    assert yaml.safe_load((out / "mpl" / "config.yaml").read_text())["mpl"]["mpl_weight"] is None
    assert "h" in records[2]["last_logged"] and "h" not in records[0]["last_logged"]
    png = (out / "methods.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # --plot-only: the figure again from the runs, nothing trained or recorded
    fig = tmp_path / "again.png"
    mtimes = {m: (out / m / "last.pt").stat().st_mtime_ns for m in ("supervised", "uda", "mpl")}
    assert cli.main([*args, "--plot-only", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(fig) in capsys.readouterr().out
    assert {m: (out / m / "last.pt").stat().st_mtime_ns for m in mtimes} == mtimes
    assert len((results / "methods.jsonl").read_text().splitlines()) == 3
    # its title is the runs' saved settings, not what --set says now
    other = tmp_path / "other.png"
    assert cli.main([*args, "--plot-only", str(other), "--set", "train.steps=99"]) == 0
    assert other.read_bytes() == fig.read_bytes()
    for bad, says in ((["--out", str(tmp_path / "none")], "no run of supervised"),
                      (["--plot-only", str(tmp_path / "no" / "f.png")], "no folder"),
                      (["--plot-only", str(tmp_path / "f.txt")], "ending in one of"),
                      (["--plot-only", str(tmp_path / "f")], "ending in one of")):
        assert cli.main([*args, "--plot-only", str(fig), *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        cli.main([*args, "--plot-only", str(fig), "--resume"])
    # without --resume the runs in --out are not trained over (refused before any training)
    # unless --overwrite says so
    capsys.readouterr()
    before = {m: (out / m / "last.pt").read_bytes() for m in ("supervised", "uda", "mpl")}
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{out / 'supervised'} already holds a run" in err and err.count("\n") == 1, err
    assert {m: (out / m / "last.pt").read_bytes() for m in before} == before
    assert len((results / "methods.jsonl").read_text().splitlines()) == 3
    # --resume: finished runs are not trained again; the records are appended once more, naming
    # the card, torch and date of the session that trained them (here, as if on a GPU machine)
    before = (out / "mpl" / "metrics.jsonl").read_text()
    summary = json.loads((out / "mpl" / "summary.json").read_text())
    assert (summary["device"], summary["torch"]) == ("cpu", torch.__version__)
    summary.update(device="NVIDIA H200", torch="2.11.0+cu130", date="2026-11-27")
    (out / "mpl" / "summary.json").write_text(json.dumps(summary))
    assert cli.main([*args, "--resume", "--methods", "mpl"]) == 0
    assert (out / "mpl" / "metrics.jsonl").read_text() == before
    assert len((results / "methods.jsonl").read_text().splitlines()) == 4
    last = json.loads((results / "methods.jsonl").read_text().splitlines()[-1])
    assert (last["gpu"], last["torch"], last["date"]) == ("NVIDIA H200", "2.11.0+cu130",
                                                          "2026-11-27")
    capsys.readouterr()
    # --resume with other settings is refused before anything trains or is recorded; settings
    # the supervised run does not use, and where a run executes, are not compared.
    assert cli.main([*args, "--resume", "--set", "mpl.uda_weight=3"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'uda'} was trained with other settings (mpl.uda_weight)" in err, err
    assert len((results / "methods.jsonl").read_text().splitlines()) == 4
    assert cli.main([*args, "--resume", "--methods", "supervised", "--set", "mpl.uda_weight=3",
                     "--set", "train.eval_every=1", "--set", "train.profile_steps=1"]) == 0
    assert cli.main([*args, "--resume", "--methods", "supervised",
                     "--set", "data.labeled_per_class=1"]) == 2
    assert "(data.labeled_per_class)" in capsys.readouterr().err
    for bad in (["--methods", "uda,bogus"], ["--set", "data.nokey=1"],
                ["--overwrite", "--methods", "mpl,uda,mpl"]):  # not trained twice
        assert cli.main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mpl-fast: error:") and err.count("\n") == 1, err
    assert cli.main([*args, "--overwrite", "--methods", "supervised",
                     "--set", "train.steps=2"]) == 0
    assert json.loads((out / "supervised" / "summary.json").read_text())["steps"] == 2
    assert json.loads((results / "methods.jsonl").read_text().splitlines()[-1])["steps"] == 2


@pytest.mark.parametrize("root", [None, "missing"])
def test_bench_methods_refuses_a_missing_data_root_before_training(tmp_path, capsys, root):
    from mpl_fast import cli

    out = tmp_path / "runs"
    args = ["bench", "methods", "--out", str(out), "--results", str(tmp_path / "results")]
    if root:
        args += ["--set", f"data.root={tmp_path / root}"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert "training" not in captured.out and not out.exists()  # nothing started
    want = "does not exist" if root else "needs data.root"
    assert captured.err.startswith("mpl-fast: error:") and want in captured.err
    assert captured.err.count("\n") == 1


def test_a_folder_source_names_the_settings_it_lacks_and_how_to_give_them():
    """The image presets give no data.root (where the data lives is the user's): the line said
    'needs data.root and data.image_size' where only the root was missing."""
    from mpl_fast.data.sources import check_data_root
    from mpl_fast.train import config as cfg

    d = cfg.load("imagenet_10pct")["data"]
    with pytest.raises(DataError) as err:
        check_data_root(d)
    assert str(err.value) == "data.name=image_folder needs data.root: --set data.root=DIR"
    with pytest.raises(DataError) as err:
        check_data_root({**d, "image_size": None})
    assert str(err.value) == ("data.name=image_folder needs data.root and data.image_size: "
                              "--set data.root=DIR --set data.image_size=PIXELS")


def test_bench_data_writes_a_synthetic_imagenet_sized_tree_once(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    import json

    from PIL import Image

    from mpl_fast import cli

    root, out = tmp_path / "synth", tmp_path / "results"
    args = ["bench", "data", "--synthetic", "20", "--root", str(root), "--device", "cpu",
            "--batch-size", "2", "--mu", "1", "--steps", "1", "--threads", "1", "--out", str(out)]
    assert cli.main(args) == 0
    files = sorted(root.glob("c*/*.jpg"))
    assert len(files) == 20 and len({f.parent.name for f in files}) == 10
    with Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.format == "JPEG"
    assert not list(tmp_path.glob("synth.partial-*"))  # written aside, renamed into place
    record = json.loads((out / "data.jsonl").read_text())
    assert record["synthetic"] and record["files"] == 20 and record["image_size"] == 224
    assert record["bare_whole_decode_images_per_s"] > 0  # large images: both bare pipelines
    # (the record's rates are rounded: the fraction, from the unrounded ones, may differ by 1e-3)
    assert record["fraction_of_bare_whole_decode"] == pytest.approx(
        record["mpl_images_per_s"] / record["bare_whole_decode_images_per_s"], abs=2e-3)
    mtime = files[0].stat().st_mtime_ns
    assert cli.main(args) == 0  # the same tree is reused, not rewritten
    assert files[0].stat().st_mtime_ns == mtime
    capsys.readouterr()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    args[args.index(str(root))] = str(other)
    assert cli.main(args) == 2  # an existing folder is never written into
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_large_images_are_decoded_with_a_random_crop_and_resized(tmp_path):
    """Large JPEGs: the labeled stream and the bare pipeline decode only a random window and
    resize it to size x size; the window moves and changes scale from draw to draw (a horizontal
    ramp's column means tell where it fell)."""
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    from mpl_fast.data import dali_pipelines as P

    ramp = np.repeat(np.linspace(0, 255, 320)[None, :, None], 240, axis=0).repeat(3, axis=2)
    (tmp_path / "c").mkdir()
    files = []
    for i in range(4):
        files.append(str(tmp_path / "c" / f"{i}.jpg"))
        Image.fromarray(ramp.astype(np.uint8)).save(files[-1], quality=95)
    pipe = P.labeled_pipeline(files, [0] * 4, 24, False, False, batch_size=4, num_threads=1,
                              device_id=None, seed=3)
    pipe.build()
    spans = []
    for _ in range(6):
        x = pipe.run()[0].as_array()  # N x 24 x 24 x 3, normalised, maybe mirrored
        assert x.shape == (4, 24, 24, 3)
        cols = x[..., 0].mean(axis=1)  # N x 24: the ramp across the window
        spans += list(np.abs(cols[:, -1] - cols[:, 0]))
    # windows of different widths cover different spans of the ramp; none is the whole image
    assert max(spans) - min(spans) > 0.5 and min(spans) < 3.5
    bare = P.bare_pipeline(files, 24, False, False, batch_size=4, num_threads=1, device_id=None,
                           seed=3)
    bare.build()
    assert bare.run()[0].as_array().shape == (4, 24, 24, 3)
    whole = P.bare_pipeline(files, 24, False, False, batch_size=4, num_threads=1,
                            device_id=None, seed=3, whole=True)
    whole.build()
    assert whole.run()[0].as_array().shape == (4, 24, 24, 3)
    ops = _op_devices(whole)  # the whole image decoded, then cropped
    assert "decoders__Image" in ops and "RandomResizedCrop" in ops
    assert "decoders__ImageRandomCrop" in _op_devices(bare)


def test_strong_view_translation_keeps_small_images_in_frame(tree):
    """RandAugment's translations scale with the image: DALI's rand_augment shifts by up to 100
    px unless it is told the image's shape, which moves a 32-px CIFAR image out of its frame
    entirely (a strong view of nothing but the fill colour). One RandAugment layer at the top
    level: about 1 sample in 7 is translated; none may come out blank."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data import dali_pipelines as P

    index = index_folder(tree)
    pipe = P.unlabeled_pipeline(index.files, 32, True, False, 1, 10, 0, 0, 1, 3,
                                batch_size=24, num_threads=1, device_id=None, seed=4)
    pipe.build()
    fill = (128.0 - torch.tensor(P.MEAN)) / torch.tensor(P.STD)

    def band(is_fill):  # the widest run of all-fill columns from either edge (N x W -> N)
        left = torch.cumprod(is_fill.int(), 1).sum(1)
        right = torch.cumprod(is_fill.flip(1).int(), 1).sum(1)
        return torch.maximum(left, right)

    blank = shifted = 0
    for _ in range(10):
        strong = torch.from_numpy(pipe.run()[1].as_array())  # N x H x W x 3, normalised
        is_fill = ((strong - fill).abs() < 1e-3).all(3)  # N x H x W
        blank += int(is_fill.flatten(1).all(1).sum())
        # a fill band wider than the pad-and-crop's 4 px comes from a translation
        widest = torch.maximum(band(is_fill.all(1)), band(is_fill.all(2)))
        shifted += int(((widest > 4) & (widest < 32)).sum())
    assert blank == 0, f"{blank} of 240 strong views hold only the fill colour"
    assert shifted >= 10, shifted  # translations still happen (about 34 expected)


def _position_tree(root, n_per_class=6, size=32):
    """Lossless size x size PNGs whose pixels say where they come from: R = 7 row + 10,
    G = 7 col + 10, B = 50 (never the fill colour 128)."""
    from PIL import Image

    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    img = np.stack([7 * rows + 10, 7 * cols + 10, np.full_like(rows, 50)], -1).astype(np.uint8)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(img).save(root / c / f"{c}{i}.png")
    return root


def test_small_pad_and_crop_shifts_whole_pixels_without_a_needless_resize(tmp_path):
    """CIFAR-sized sources: the labeled crop is the image moved by a whole-pixel offset, uniform
    in [-4, 4] on each axis (every offset turns up), with the fill colour exactly where the
    window leaves the image; and skipping the resize of images already at the size (`sized`)
    changes no pixel."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data import dali_pipelines as P
    from mpl_fast.data.image_folder import all_of_size

    index = index_folder(_position_tree(tmp_path / "pos"))
    assert all_of_size(index, 32) and not all_of_size(index, 16)
    outs = {}
    for sized in (False, True):
        pipe = P.labeled_pipeline(index.files, index.labels, 32, True, False, sized=sized,
                                  batch_size=12, num_threads=1, device_id=None, seed=6)
        pipe.build()
        outs[sized] = np.concatenate([pipe.run()[0].as_array() for _ in range(20)])
    assert np.array_equal(outs[False], outs[True])
    pixels = np.rint(outs[True] * np.array(P.STD) + np.array(P.MEAN))  # N x 32 x 32 x 3
    seen = set()
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    for px in pixels:
        fill = px[..., 2] == 128
        src_r, src_c = (px[..., 0] - 10) / 7, (px[..., 1] - 10) / 7
        dy = np.unique(src_r[~fill] - i[~fill])
        dx = np.unique(src_c[~fill] - j[~fill])
        flipped = len(dx) > 1  # mirrored: source column = 31 - j + offset
        if flipped:
            dx = np.unique(src_c[~fill] + j[~fill] - 31)
        assert len(dy) == 1 and len(dx) == 1 and abs(dy[0]) <= 4 and abs(dx[0]) <= 4
        jj = 31 - j if flipped else j
        outside = (i + dy[0] < 0) | (i + dy[0] > 31) | (jj + dx[0] < 0) | (jj + dx[0] > 31)
        assert np.array_equal(fill, outside)
        assert (px[fill] == 128).all()
        seen.add(int(dy[0]))
    assert seen == set(range(-4, 5))


def test_randaugment_builds_without_dalis_own_deprecation_noise(tree):
    """DALI's RandAugment calls operators by deprecated names and shows that under a warning
    filter of its own: those messages are dropped, any other warning still shows."""
    pytest.importorskip("nvidia.dali")
    import warnings

    from mpl_fast.data import dali_pipelines as P

    index = index_folder(tree)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = P.unlabeled_pipeline(index.files, 16, False, False, 2, 9, 0, batch_size=4,
                                    num_threads=1, device_id=None, seed=1)
        pipe.build()
        with P._without_experimental_name_warnings():
            warnings.warn("WARNING: something else", DeprecationWarning)
    messages = [str(w.message) for w in seen]
    assert not any("experimental" in m for m in messages), messages
    assert "WARNING: something else" in messages


def _op_devices(pipe):
    """{operator schema: set of devices} of a pipeline's graph, defined but not built (so GPU
    placements can be checked on a machine without a GPU; DALI's private graph API, 2.x)."""
    pipe._build_graph()
    devices = {}
    for instance in pipe._ops:
        op = instance._op
        devices.setdefault(getattr(op, "schema_name", type(op).__name__), set()).add(op.device)
    return devices


@pytest.mark.parametrize("decode,augment", [("gpu", "gpu"), ("cpu", "gpu"), ("cpu", "cpu")])
@pytest.mark.parametrize("small", [True, False])
def test_each_stage_runs_where_the_placement_says(decode, augment, small):
    """Feeding a GPU: the decoder on the GPU ('mixed') or the CPU, every augmenting operator
    (crops, resizes, RandAugment's, cutout) on the augment device, normalisation on the GPU."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data import dali_pipelines as P
    from mpl_fast.data.placement import placement

    where = placement(True, decode, augment)
    files = [f"x{i}.jpg" for i in range(8)]  # never read: the graph is only defined
    kw = dict(batch_size=4, num_threads=1, device_id=0, seed=1)
    aug = "gpu" if augment == "gpu" else "cpu"
    augmenting = {"Slice", "Resize", "RandomResizedCrop", "WarpAffine", "Rotate", "Brightness",
                  "Saturation", "Erase", "Crop", "experimental__Equalize",
                  "experimental__Filter", "_conditional__Merge"}
    pipes = {"labeled": P.labeled_pipeline(files, [0] * 8, 32, small, where, **kw),
             "unlabeled": P.unlabeled_pipeline(files, 32, small, where, 2, 9, 8, **kw),
             "eval": P.eval_pipeline(files, [0] * 8, 32, small, where, **kw),
             "bare": P.bare_pipeline(files, 32, small, where, **kw)}
    for name, pipe in pipes.items():
        devices = _op_devices(pipe)
        decoders = {k: v for k, v in devices.items() if k.startswith("decoders__")}
        assert list(decoders.values()) == [{"mixed" if decode == "gpu" else "cpu"}], (name,
                                                                                       decoders)
        for op in augmenting & set(devices):
            assert devices[op] == {aug}, (name, op, devices[op])
        if name == "bare":
            assert all(o.device == "gpu" for o in pipe._graph_outputs)
        else:
            assert devices["CropMirrorNormalize"] == {"gpu"}
    assert "WarpAffine" in _op_devices(pipes["unlabeled"])  # RandAugment is in the graph


@pytest.mark.parametrize("student", ["small_cnn", "mlp"])
def test_ce_old_gap_script_measures_the_normalisation_gap(tree, tmp_path, capsys, student):
    """benchmarks/ce_old_gap.py: with a BatchNorm student the joint forward's CE_old differs from
    the labeled-only one (gap far from 0, h_joint = h_separate + gap); without BatchNorm the two
    are the same up to rounding (a matrix product over more rows may round differently: a few
    ulps of a cross-entropy near 2, seen on some CPUs), so the gap it reports is BatchNorm's."""
    pytest.importorskip("nvidia.dali")
    import json
    import runpy
    from pathlib import Path

    root = tree.parent
    if not (root / "test").exists():
        (root / "test").symlink_to(tree)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ce_old_gap.py"
    main = runpy.run_path(str(script))["main"]
    tiny = ["--set", "data.image_size=16", "--set", "data.labeled_per_class=4", "--set",
            "data.batch_size=4", "--set", "data.mu=3", "--set", "data.num_threads=1",
            "--set", "data.cutout=4", "--set", f"model.student={student}",
            "--set", "data.decode_device=gpu"]  # the tree's images are of several sizes
    assert main(["--root", str(root), *tiny, "--warmup-steps", "2", "--trials", "3",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "ce_old_gap.jsonl").read_text())
    assert record["model"] == student and record["batch_size"] == 4 and record["mu"] == 3
    assert len(record["trial_values"]) == 3
    for t in record["trial_values"]:
        assert t["h_joint"] == pytest.approx(t["h_separate"] + t["gap"], abs=1e-6)
        if student == "small_cnn":
            assert abs(t["gap"]) > 1e-3, t
        else:
            assert abs(t["gap"]) <= 2e-6, t
    assert capsys.readouterr().out.splitlines()[-1].startswith("summary:")
    # a missing root: one line, exit 2, nothing recorded
    assert main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ce_old_gap:") and err.count("\n") == 1
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("lr", ["0", "-0.1", "nan", "inf"])
def test_ce_old_gap_refuses_a_learning_rate_that_is_no_step(tmp_path, capsys, lr):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ce_old_gap.py"
    parse_args = runpy.run_path(str(script))["parse_args"]
    with pytest.raises(SystemExit) as stop:
        parse_args(["--root", str(tmp_path), "--lr", lr, "--out", str(tmp_path / "r")])
    assert stop.value.code == 2 and "--lr must be finite and > 0" in capsys.readouterr().err
    assert parse_args(["--root", str(tmp_path), "--lr", "0.5"]).lr == 0.5


def test_bench_methods_mpl_joint_differs_from_mpl_in_ce_old_forward_alone():
    import runpy
    from pathlib import Path

    from mpl_fast.train import config as cfg

    methods = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                                 "bench_methods.py"))["METHODS"]
    mpl, joint = (cfg.mpl_config(cfg.load("cifar10_4k_short", methods[m]))
                  for m in ("mpl", "mpl_joint"))
    assert mpl.ce_old_forward == "separate" and joint == mpl.replace(ce_old_forward="joint")


def test_bench_methods_feedback_stats_skip_the_wait_steps():
    import runpy
    from pathlib import Path

    stats = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                               "bench_methods.py"))["feedback_stats"]
    rows = [{"step": 1, "h": 5.0, "h_centered": 5.0, "lr/student": 0.0, "uda/mask_ratio": 1.0},
            {"step": 2, "h": -0.5, "h_centered": -1.0, "lr/student": 0.1, "uda/mask_ratio": 0.2},
            {"step": 3, "h": 1.5, "h_centered": 1.0, "lr/student": 0.1, "uda/mask_ratio": 0.4},
            {"step": 3, "eval/ema_student_top1": 0.5}]
    got = stats(rows)
    assert got["logged_steps"] == 2 and got["h_negative_fraction"] == 0.5
    assert got["h_mean"] == pytest.approx(0.5) and got["h_std"] == pytest.approx(2 ** 0.5)
    assert got["h_centered_mean"] == pytest.approx(0.0)
    assert got["mask_ratio_mean"] == pytest.approx(0.3)
    assert got["pseudo_accuracy_mean"] is None  # runs from before it was logged
    for row, acc in zip(rows, (0.9, 0.3, 0.5)):
        row["pseudo/accuracy"] = acc
    assert stats(rows)["pseudo_accuracy_mean"] == pytest.approx(0.4)  # the wait step left out
    assert stats([{"step": 1, "loss": 1.0}]) is None


def test_bench_methods_records_each_run_as_it_ends(tmp_path, capsys, monkeypatch):
    """A command stopped in a later run (a GPU call's time limit) keeps the records and the
    figure of the runs that finished (the fourth H200 sitting lost MPL's record that way)."""
    import json

    from mpl_fast import cli
    from mpl_fast.train import loop

    real_train = loop.train

    def stopped_in_uda(config, out_dir, **kw):
        if config["mpl"]["mpl_weight"] == 0:
            raise KeyboardInterrupt
        return real_train(config, out_dir, **kw)

    monkeypatch.setattr(loop, "train", stopped_in_uda)
    out, results = tmp_path / "runs", tmp_path / "results"
    tiny = ["data.batch_size=4", "data.mu=2", "train.steps=3", "train.eval_every=3",
            "train.finetune_steps=0", "model.teacher=mlp", "model.student=mlp",
            "train.device=cpu"]
    args = ["bench", "methods", "--config", "digits", *sum((["--set", s] for s in tiny), []),
            "--methods", "mpl,uda,supervised", "--out", str(out), "--results", str(results)]
    assert cli.main(args) == 130
    records = [json.loads(line) for line in (results / "methods.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["mpl"] and records[0]["steps"] == 3
    assert (out / "methods.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "supervised").exists()


def test_bench_methods_names_the_card_of_a_run_from_before_summaries_held_it():
    """--plot-only's title: a summary's own card, else the matching record's (same method,
    steps and final EMA top-1: the fourth sitting's runs), else none."""
    import runpy
    from pathlib import Path

    card = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                              "bench_methods.py"))["_card"]
    records = [{"method": "mpl", "steps": 10000, "ema_student_top1": 0.5273, "gpu": "NVIDIA H200"},
               {"method": "uda", "steps": 10000, "ema_student_top1": 0.5273, "gpu": "other"}]
    old = {"steps": 10000, "ema_student_top1": 0.5273}
    assert card(old, "mpl", records) == "NVIDIA H200"
    assert card({**old, "device": "NVIDIA H100"}, "mpl", records) == "NVIDIA H100"
    assert card({**old, "steps": 9000}, "mpl", records) is None
    assert card(old, "supervised", records) is None


def test_bench_methods_title_says_which_method_ran_on_which_card():
    """--plot-only over runs finished on different machines (#8's supervised run on the CPU
    beside the H200's) names each run's card; one shared card is named once."""
    import runpy
    from pathlib import Path

    label = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                               "bench_methods.py"))["_cards_label"]
    assert label({"uda": "NVIDIA H200", "mpl": "NVIDIA H200"}) == "NVIDIA H200"
    assert label({"supervised": "cpu", "uda": "NVIDIA H200", "mpl": "NVIDIA H200"}) == (
        "supervised: cpu; uda, mpl: NVIDIA H200")
    assert label({"supervised": None, "mpl": "NVIDIA H200"}) == "NVIDIA H200"
    assert label({"supervised": None}) == "card not recorded"


_RANK_0_SCRIPT = """
import json, sys
import torch.distributed as dist
from mpl_fast.data.image_folder import DataError
from mpl_fast.data.sources import from_rank_0

dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]


def make():
    open(f"{out}/made{rank}", "w").close()
    return {"files": ["a.JPEG", "b.JPEG"], "by": rank}


def fails():
    raise DataError("no class folders under X")


got = from_rank_0(make, dist.get_world_size())
try:
    from_rank_0(fails, dist.get_world_size())
    err = None
except DataError as e:
    err = str(e)
json.dump({"got": got, "err": err}, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_indexes_and_every_process_gets_its_result(tmp_path):
    """Each process walked the whole tree (32 processes: 41M file reads of ImageNet at once on
    a shared file system); now rank 0 does and broadcasts the index, or the DataError it met,
    which every process raises instead of waiting for rank 0."""
    import json
    import subprocess
    import sys

    script = tmp_path / "rank0.py"
    script.write_text(_RANK_0_SCRIPT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=3", str(script), str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.glob("made*")) == ["made0"]
    for rank in range(3):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"got": {"files": ["a.JPEG", "b.JPEG"], "by": 0},
                          "err": "no class folders under X"}
