"""CIFAR python batches (torchvision's download format) fed to DALI as arrays."""
import pickle

import numpy as np
import pytest
import torch

from mpl_fast.data import cifar_batches
from mpl_fast.data.image_folder import DataError, balanced_split


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)

    def batch(n, offset):
        labels = [(offset + i) % 10 for i in range(n)]
        # each image is a solid colour whose red channel encodes its position in the set
        data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        for i in range(n):
            data[i, 0] = (offset + i) % 250
            data[i, 1] = 10 * labels[i]
            data[i, 2] = rng.integers(0, 255)
        return {b"data": data.reshape(n, 3072), b"labels": labels}

    for k in range(1, 6):
        (root / f"data_batch_{k}").write_bytes(pickle.dumps(batch(20, 20 * (k - 1))))
    (root / "test_batch").write_bytes(pickle.dumps(batch(20, 0)))
    names = [f"c{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root


def test_load(cifar10, tmp_path):
    train, test = cifar_batches.load(cifar10)
    assert train.images.shape == (100, 32, 32, 3) and train.images.dtype == np.uint8
    assert len(test) == 20 and train.classes[3] == "c3"
    assert train.images[7, 0, 0, 0] == 7 and train.images[7, 5, 5, 1] == 70
    with pytest.raises(DataError, match="neither"):
        cifar_batches.load(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        cifar_batches.load(tmp_path)


def test_stream_from_arrays(cifar10):
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec, eval_batches

    train, test = cifar_batches.load(cifar10)
    labeled = balanced_split(train, per_class=2, seed=0)
    stream = DaliStream(train, labeled, StreamSpec(4, 2, 32, True, num_threads=1, cutout=0,
                                                   ra_n=0), "cpu")
    std = 0.229 * 255
    for _ in range(3):
        b = stream.next()
        assert b.x_l.shape == (4, 3, 32, 32) and b.x_us.shape == (8, 3, 32, 32)
        assert b.x_l.is_contiguous(memory_format=torch.channels_last)
        assert set(b.y_l.tolist()) <= {train.labels[i] for i in labeled}
        # the centre pixel of the weak view carries its image's red value
        red = (b.x_uw[:, 0, 16, 16] * std + 0.485 * 255).round().long()
        assert red.tolist() == [i % 250 for i in b.unlabeled_index.tolist()]
        # the labeled rows name their images too, and the labels are those images' classes
        red = (b.x_l[:, 0, 16, 16] * std + 0.485 * 255).round().long()
        assert red.tolist() == b.labeled_index.tolist()
        assert set(red.tolist()) <= set(labeled)
        assert b.y_l.tolist() == [train.labels[i] for i in b.labeled_index.tolist()]
    labels = []
    for x, y in eval_batches(test, 32, True, "cpu", batch_size=6, num_threads=1):
        labels += y.tolist()
    assert labels == test.labels


def test_array_source_shards_are_disjoint_and_cover():
    pytest.importorskip("nvidia.dali")
    from types import SimpleNamespace

    from mpl_fast.data.dali_pipelines import ArraySource

    images = np.zeros((10, 2, 2, 3), dtype=np.uint8)
    seen = []
    for shard in range(2):
        src = ArraySource(images, list(range(10)), batch_size=5, shard_id=shard, num_shards=2,
                          seed=3)
        batch, labels = src(SimpleNamespace(iteration=0))
        assert batch.shape == (5, 2, 2, 3) and labels.shape == (5, 1)
        got = labels[:, 0].tolist()
        seen.append(set(got))
        assert len(set(got)) == 5
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10))
    # batches of 3 over shards of 5: batches straddle epochs; in every epoch the two shards
    # draw 5 distinct images each, together all 10 (a fresh permutation each epoch)
    shards = [ArraySource(images, list(range(10)), batch_size=3, shard_id=i, num_shards=2,
                          seed=3) for i in range(2)]
    drawn = [np.concatenate([src.rows(i) for i in range(10)]) for src in shards]  # 6 epochs
    for epoch in range(6):
        parts = [set(d[5 * epoch:5 * epoch + 5].tolist()) for d in drawn]
        assert all(len(part) == 5 for part in parts) and parts[0] | parts[1] == set(range(10))
    assert drawn[0][:5].tolist() != drawn[0][5:10].tolist()


@pytest.mark.parametrize("steps_per_run", [1, 3])
def test_array_stream_draws_each_image_once_an_epoch_whatever_the_steps_a_run(cifar10,
                                                                          steps_per_run):
    """The arrays' source indexes samples by the pipeline's own batch (steps_per_run batches of
    the step's size): an epoch hands out every labeled and every unlabeled image once."""
    pytest.importorskip("nvidia.dali")
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec

    train, _ = cifar_batches.load(cifar10)
    labeled = balanced_split(train, per_class=2, seed=0)  # 20 of the 100
    spec = StreamSpec(4, 2, 32, True, num_threads=1, cutout=0, ra_n=0,
                      steps_per_run=steps_per_run)
    stream = DaliStream(train, labeled, spec, "cpu")
    std = 0.229 * 255

    def index_of(x):  # the red value of a solid image is its index in the set
        return (x[:, 0, 16, 16] * std + 0.485 * 255).round().long().tolist()

    unlabeled, labeled_seen = [], []
    for _ in range(12):  # 96 of the 100 unlabeled images, 48 labeled draws: 2 epochs + 8
        b = stream.next()
        unlabeled += b.unlabeled_index.tolist()
        assert index_of(b.x_uw) == b.unlabeled_index.tolist()
        assert b.y_u.tolist() == [int(train.labels[i]) for i in b.unlabeled_index.tolist()]
        assert index_of(b.x_l) == b.labeled_index.tolist()
        labeled_seen.append(index_of(b.x_l))
    assert len(set(unlabeled)) == 96
    first_epoch = sum(labeled_seen[:5], [])
    assert sorted(first_epoch) == sorted(labeled)
