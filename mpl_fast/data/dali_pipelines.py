"""NVIDIA DALI pipelines for MPL (sources: JPEG files, or in-memory arrays via ArraySource): a
labeled stream, an unlabeled stream in two views (weak and strong, both from one decode of each
image), an evaluation stream, and a bare decode + crop pipeline for comparison.

Where each stage runs is a Placement: decoding (GPU 'mixed' or CPU), augmentation (crops, flips,
RandAugment, cutout) and the normalised output (fp16 on the GPU, fp32 on the CPU). Feeding a GPU,
everything runs there by default; small images may decode (and augment) faster on the CPU
threads, the GPU's per-image and per-operator costs being large against a 32-px image, so the
earlier stages can stay on the CPU and the batch moves to the GPU before the next stage.

RandAugment comes from nvidia.dali.auto_aug. Magnitudes: the paper and its TF code give the
level on a 0-10 scale (CIFAR: n=2, level 16 or 17, i.e. beyond the top of the scale, which the TF
code extrapolates). DALI's rand_augment uses `num_magnitude_bins` bins; we use 11, so
`randaugment_m` is the paper's 0-10 level directly, and levels above 10 are clamped to 10 (DALI's
largest magnitudes, weaker than the TF code's extrapolation). Translations are relative to the
image: up to 10/32 of its side at the top level for small images (UDA's CIFAR RandAugment: 10 px
of 32), 100/224 for large ones (the TF code's 100 px at 224); DALI's default when it is not told
the shape is 100 px whatever the size, which moves a 32-px image out of its frame.
"""
import contextlib
import warnings

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment

from mpl_fast.data.placement import Placement


@contextlib.contextmanager
def _without_experimental_name_warnings():
    """DALI's own RandAugment still calls operators by their old experimental names, and DALI
    shows that deprecation under a filter of its own (a filter set here would be overridden):
    those messages are dropped at display, every other warning is shown."""
    show = warnings.showwarning

    def filtered(message, category, *args, **kwargs):
        if not (issubclass(category, DeprecationWarning)
                and str(message).startswith("WARNING: `nvidia.dali.fn.experimental.")):
            show(message, category, *args, **kwargs)

    warnings.showwarning = filtered
    try:
        yield
    finally:
        warnings.showwarning = show

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
MAGNITUDE_BINS = 11
# the largest RandAugment translation, as a fraction of the image's side (see the docstring)
MAX_TRANSLATE_SMALL, MAX_TRANSLATE_LARGE = 10 / 32, 100 / 224


def _placed(where) -> Placement:
    """A Placement, or a bool for all stages on the GPU (True) or the CPU (False)."""
    return where if isinstance(where, Placement) else Placement(*(bool(where),) * 3)


def _on_gpu(node, gpu):
    """node, moved to the GPU when the next stage runs there (a no-op for a GPU node)."""
    return node.gpu() if gpu else node


def _decoder_args(where):
    args = dict(device="mixed" if where.decode else "cpu", output_type=types.RGB)
    if where.decode and where.hw_load is not None:
        args["hw_decoder_load"] = where.hw_load
    return args


def _decode(jpegs, where):
    return _on_gpu(fn.decoders.image(jpegs, **_decoder_args(where)), where.augment)


def _decode_random_resized_crop(jpegs, where, size):
    """random_resized_crop's window (its area and aspect ranges) decoded alone, by the decoder's
    ROI decoding instead of decoding the whole image, then resized to size x size."""
    images = fn.decoders.image_random_crop(jpegs, **_decoder_args(where))
    return fn.resize(_on_gpu(images, where.augment), resize_x=size, resize_y=size)


def _to_size(images, size, small, sized):
    """Small images at size x size, once for every view: resized, unless the source is known to
    hold nothing else (`sized`, e.g. CIFAR at 32: the resize would copy each image for nothing).
    Large images are left alone (each view takes its own random-resized crop)."""
    return images if sized or not small else fn.resize(images, resize_x=size, resize_y=size)


def _crop(images, size, small):
    """Small images (already size x size, see _to_size): pad-and-crop, a size x size window at a
    uniform integer offset in [-size/8, size/8] on each axis, the pixels outside the image filled
    with 128, in one slice. Large images: random-resized-crop to size."""
    if not small:
        return fn.random_resized_crop(images, size=[size, size])
    pad = max(1, size // 8)
    offsets = [float(v) for v in range(-pad, pad + 1)]
    anchor = fn.random.uniform(values=offsets, shape=[2])  # (y, x)
    return fn.slice(images, anchor, fn.constant(fdata=[float(size), float(size)]),
                    axis_names="HW", normalized_anchor=False, normalized_shape=False,
                    out_of_bounds_policy="pad", fill_values=128)


def _normalize(images, where, mirror=None):
    return fn.crop_mirror_normalize(_on_gpu(images, where.output),
                                    dtype=types.FLOAT16 if where.output else types.FLOAT,
                                    output_layout="HWC", mean=MEAN, std=STD,
                                    mirror=mirror if mirror is not None else 0)


def _cutout(images, size, cut):
    if cut <= 0:
        return images
    anchor = fn.random.uniform(range=[0.0, float(max(size - cut, 0))], shape=[2])
    return fn.erase(images, anchor=anchor, shape=[float(cut), float(cut)], axis_names="HW",
                    fill_value=128.0)


class ArraySource:
    """Images already in memory (N x H x W x 3 uint8, e.g. CIFAR python batches) fed to DALI a
    batch a call through external_source (one numpy gather, not a Python call per sample):
    endless epochs of a seeded permutation shared by all shards, each shard taking every
    num_shards-th sample (disjoint, covering)."""

    def __init__(self, images, labels, batch_size, shard_id=0, num_shards=1, seed=0,
                 shuffle=True):
        import numpy as np

        self.images, self.labels = images, np.asarray(labels, dtype=np.int32)
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.seed, self.shuffle = seed, shuffle
        self.per_shard = len(images) // num_shards if shuffle else -(-len(images) // num_shards)
        self._epoch, self._perm = None, None

    def _order(self, epoch):
        import numpy as np

        if epoch != self._epoch:
            n = len(self.images)
            perm = (np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle
                    else np.arange(n))
            self._epoch, self._perm = epoch, perm[self.shard_id::self.num_shards]
        return self._perm

    def rows(self, iteration):
        """The rows of `images` that make batch number `iteration` of this shard."""
        import numpy as np

        k = iteration * self.batch_size + np.arange(self.batch_size)
        epochs = k // self.per_shard
        rows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch may straddle two epochs
            order = self._order(int(epoch))
            here = epochs == epoch
            rows[here] = order[(k[here] % self.per_shard) % len(order)]
        return rows

    def __call__(self, info):
        """Batch info.iteration (DALI's BatchInfo): images B x H x W x 3, labels B x 1."""
        rows = self.rows(info.iteration)
        return self.images[rows], self.labels[rows][:, None]


def _reader(files, labels, shard_id, num_shards, seed, shuffle, name="reader"):
    return fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                           shuffle_after_epoch=shuffle, seed=seed, name=name)


def _source(files, labels, shard_id, num_shards, seed, shuffle, where, size=None, small=True,
            sized=False):
    """(images, labels): JPEG files through the file reader and decoder, or an ArraySource (its
    images are already decoded) through external_source. With `size`, the images come cropped
    (see _crop) to size x size: large JPEGs decode only their random window."""
    if isinstance(files, ArraySource):
        images, y = fn.external_source(source=files, num_outputs=2, batch=True,
                                       batch_info=True, layout=["HWC", ""],
                                       dtype=[types.UINT8, types.INT32])
        images = _on_gpu(images, where.augment)
        if size is None:
            return images, y
        return _crop(_to_size(images, size, small, sized), size, small), y
    jpegs, y = _reader(files, labels, shard_id, num_shards, seed, shuffle)
    if size is None:
        return _decode(jpegs, where), y
    if small:
        return _crop(_to_size(_decode(jpegs, where), size, small, sized), size, small), y
    return _decode_random_resized_crop(jpegs, where, size), y


@pipeline_def
def labeled_pipeline(files, labels, size, small, stages, shard_id=0, num_shards=1, reader_seed=0,
                     sized=False):
    """Flip + crop, normalised. `stages`: a Placement, or True / False for every stage on the GPU
    / the CPU (so in every pipeline). `sized`: the small source images are all size x size
    already."""
    where = _placed(stages)
    images, y = _source(files, labels, shard_id, num_shards, reader_seed, True, where, size,
                        small, sized)
    return _normalize(images, where, fn.random.coin_flip()), y


@pipeline_def(enable_conditionals=True)
def unlabeled_pipeline(files, size, small, stages, ra_n, ra_m, cutout, shard_id=0, num_shards=1,
                       reader_seed=0, sized=False):
    """Each image decoded once (and, if small, brought to size once); weak = flip + crop;
    strong = its own flip + crop, then RandAugment(n, m) and cutout. Also returns the file index
    of each row."""
    where = _placed(stages)
    index_labels = None if isinstance(files, ArraySource) else list(range(len(files)))
    images, index = _source(files, index_labels, shard_id, num_shards, reader_seed, True, where)
    images = _to_size(images, size, small, sized)
    weak = _normalize(_crop(images, size, small), where, fn.random.coin_flip())
    strong = _crop(images, size, small)
    if ra_n > 0:
        # the crop is size x size: translations relative to that shape
        with _without_experimental_name_warnings():
            strong = rand_augment.rand_augment(
                strong, n=ra_n, m=min(ra_m, MAGNITUDE_BINS - 1),
                num_magnitude_bins=MAGNITUDE_BINS, shape=(size, size),
                max_translate_rel=MAX_TRANSLATE_SMALL if small else MAX_TRANSLATE_LARGE)
    strong = _normalize(_cutout(strong, size, cutout), where, fn.random.coin_flip())
    return weak, strong, index


@pipeline_def
def eval_pipeline(files, labels, size, small, stages, shard_id=0, num_shards=1, sized=False):
    where = _placed(stages)
    images, y = _source(files, labels, shard_id, num_shards, 0, False, where)
    if small:
        images = _to_size(images, size, small, sized)
    else:
        images = fn.resize(images, resize_shorter=int(size / 0.875))
        images = fn.crop(images, crop_h=size, crop_w=size)
    return _normalize(images, where), y


@pipeline_def
def bare_pipeline(files, size, small, stages, reader_seed=0, whole=False):
    """Decode + crop only: the throughput ceiling the MPL streams are compared with. Large
    images: the labeled stream's decode of the random crop's window alone and resize, or with
    `whole`, the whole image decoded and then cropped (what the unlabeled stream must do: its
    two views crop one decode). The crop runs where `stages`' augment stage says; the result
    ends where its output does."""
    where = _placed(stages)
    jpegs, _ = _reader(files, list(range(len(files))), 0, 1, reader_seed, True)
    if small:
        images = fn.crop(_decode(jpegs, where), crop_h=size, crop_w=size,
                         out_of_bounds_policy="pad")
    elif whole:
        images = fn.random_resized_crop(_decode(jpegs, where), size=[size, size])
    else:
        images = _decode_random_resized_crop(jpegs, where, size)
    return _on_gpu(images, where.output)
