"""MPL batches from the DALI pipelines: labeled B and unlabeled mu*B (weak + strong views) in
lockstep, endless, sharded by DDP rank, as torch tensors (channels_last; fp16 on GPU, fp32 on
CPU).

Each pipeline run may produce the batches of several steps (`steps_per_run`), handed out one
step at a time: DALI's costs per batch and per operator (the unlabeled pipeline is 350 operators
with two RandAugment layers, 14 without) are then paid once for several steps, which matters
for small images.

The unlabeled batch may come from several pipelines at once (`unlabeled_pipelines`), each making
its share of the rows from its own shard of the data: RandAugment routes every sample through
conditional splits and merges (one branch an operation), and DALI pays those per sample in one
thread of a pipeline's executor whatever num_threads is (on a CPU, 16 if/else around an identity
cost about 1 µs a sample each, no less with more threads: benchmarks/dali_conditionals.py), so
pipelines side by side are what spreads that work over cores.

Resume position: DALI readers cannot seek, so on resume the pipelines restart with seeds derived
from (seed, step): the run continues with fresh, deterministic data order and augmentation, not
the exact batches an uninterrupted run would have drawn (an in-memory data set resumes exactly).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from mpl_fast.data.decode_once import decode_index
from mpl_fast.data.image_folder import DataError, FolderIndex  # or cifar_batches.ArrayIndex
from mpl_fast.data.placement import placement
from mpl_fast.mpl.step import MPLBatch


def _to_torch(dali_tensor_list, device):
    """DALI TensorList (N x H x W x C, or N x 1 labels) -> torch on `device`, NCHW in
    channels_last. A GPU output is copied device to device, on torch's current stream: it never
    leaves the GPU, the host does not wait for it, and DALI keeps its buffer until that copy has
    run (DALI >= 1.15 orders a non-blocking copy_to_external with the buffer's reuse). A CPU
    output (labels, CPU pipelines) is copied into host memory, then moved."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = dali_tensor_list.as_tensor()  # one N x ... tensor: the samples share a shape
    on_gpu = isinstance(dali_tensor_list, TensorListGPU)
    where = torch.device(device) if on_gpu else torch.device("cpu")
    t = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=where)
    feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(where) if on_gpu else None)
    t = t.to(device, non_blocking=True)
    if t.dim() == 4:
        t = t.permute(0, 3, 1, 2)  # NHWC memory is NCHW channels_last
    return t


@dataclass
class StreamSpec:
    batch_size: int
    mu: int
    image_size: int
    small: bool
    ra_n: int = 2
    ra_m: int = 9
    cutout: int = 16
    num_threads: int = 4
    seed: int = 0
    sized: bool = False  # small images all image_size x image_size already: no resize
    decode_device: str = "gpu"  # feeding a GPU: where JPEGs are decoded (gpu | cpu | once)
    augment_device: str = "gpu"  # feeding a GPU: where crops, flips, RandAugment, cutout run
    steps_per_run: int = 1  # steps' batches made by one run of each pipeline
    hw_decoder_load: Optional[float] = None  # GPU decoding: share to the hardware JPEG engine
    unlabeled_pipelines: int = 1  # pipelines making the unlabeled batch side by side


def dali_failure(err: Exception) -> str:
    """One line of a DALI run's error: the operator and what it met. DALI's first line is only
    "Critical error in pipeline:", the operator's traceback and its message follow."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in")), None)
    said = lines.index("encountered:") + 1 if "encountered:" in lines else None
    cause = lines[said] if said is not None and said < len(lines) else next(
        (line for line in lines if not line.startswith("Critical error")),
        type(err).__name__)
    return f"{operator}: {cause}" if operator and operator != cause else cause


def resume_seed(seed: int, step: int) -> int:
    """The seed a random source restarts from at `step` when its state cannot be restored:
    deterministic, and apart from the seeds of nearby steps."""
    return seed + 7919 * step


class DaliStream:
    """Endless MPL batches; its position is kept by the caller, which restarts it with
    `start_step` on resume (see the module docstring)."""

    def __init__(self, index: FolderIndex, labeled: list, spec: StreamSpec, device, rank=0,
                 world=1, start_step=0):
        from mpl_fast.data import dali_pipelines as P

        if spec.batch_size % world:
            raise DataError(f"batch size {spec.batch_size} must divide by the world size {world}")
        if spec.steps_per_run < 1:
            raise DataError(f"steps_per_run must be >= 1, got {spec.steps_per_run}")
        parts = spec.unlabeled_pipelines
        if parts < 1 or (spec.batch_size // world * spec.mu) % parts:
            raise DataError(f"unlabeled_pipelines={parts} must be >= 1 and divide the unlabeled "
                            f"batch of a rank, {spec.batch_size // world * spec.mu}")
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        try:
            where = placement(gpu, spec.decode_device, spec.augment_device,
                                spec.hw_decoder_load)
        except ValueError as err:
            raise DataError(str(err)) from err
        device_id = (self.device.index or 0) if gpu else None
        if spec.decode_device == "once":  # a no-op for an index already decoded
            index = decode_index(index, spec.image_size, spec.num_threads)
        self.k = spec.steps_per_run
        b = spec.batch_size // world
        seed = resume_seed(spec.seed, start_step)
        common = dict(num_threads=spec.num_threads, device_id=device_id, prefetch_queue_depth=2)
        # The labeled pipeline's "labels" are positions in `labeled`: the host maps them to the
        # class labels and to the rows of the training set (a batch's labeled_index)
        positions = list(range(len(labeled)))
        self._labeled_rows = torch.as_tensor(labeled, dtype=torch.int64)
        self._labeled_classes = torch.as_tensor([index.labels[i] for i in labeled],
                                                dtype=torch.int64)
        # every training image's class, for the unlabeled rows' pseudo/accuracy diagnostic
        self._classes = torch.as_tensor(index.labels, dtype=torch.int64)
        ub = b * spec.mu // parts  # unlabeled rows a step from each unlabeled pipeline
        if hasattr(index, "images"):  # in-memory arrays (CIFAR python batches, decoded once)
            # the sources index samples by the pipelines' batch: k steps' worth
            lab_src = P.ArraySource(index.images[labeled], positions, b * self.k, rank, world,
                                    seed)
            unl_src = [P.ArraySource(index.images, list(range(len(index))), ub * self.k,
                                     rank * parts + j, world * parts, seed + 2)
                       for j in range(parts)]
        else:
            lab_src, unl_src = [index.files[i] for i in labeled], [index.files] * parts
        self.lab = P.labeled_pipeline(
            lab_src, positions, spec.image_size, spec.small, where, rank, world, seed,
            spec.sized, batch_size=b * self.k, seed=seed + 1, **common)
        # shard j of a rank's unlabeled pipelines reads shard rank * parts + j of the data (one
        # reader seed for all: disjoint shards), with augmentation seeds of its own
        self.unl = [P.unlabeled_pipeline(
            unl_src[j], spec.image_size, spec.small, where, spec.ra_n, spec.ra_m, spec.cutout,
            rank * parts + j, world * parts, seed + 2, spec.sized, batch_size=ub * self.k,
            seed=seed + 3 + 104729 * j, **common) for j in range(parts)]
        self.lab.build()
        for pipe in self.unl:
            pipe.build()
        self._batches, self._labeled = [], []  # made by the last runs, not yet handed out

    def _run(self, pipe):
        try:
            return pipe.run()
        except RuntimeError as err:
            raise DataError(f"the DALI pipeline failed: {dali_failure(err)}") from err

    def _labeled_run(self):
        """k steps' (images, class labels on the device, training-set rows on the host)."""
        x_l, pos = self._run(self.lab)
        pos = _to_torch(pos, "cpu").flatten().long()
        y_l = self._labeled_classes[pos].to(self.device, non_blocking=True)
        return (_to_torch(x_l, self.device).chunk(self.k), y_l.chunk(self.k),
                self._labeled_rows[pos].chunk(self.k))

    def next(self) -> MPLBatch:
        if not self._batches:
            xs, ys, rows = self._labeled_run()
            outs = [self._run(pipe) for pipe in self.unl]  # they ran ahead side by side
            views = [[_to_torch(o[v], self.device).chunk(self.k) for o in outs] for v in (0, 1)]
            idx = [_to_torch(o[2], "cpu").flatten().long().chunk(self.k) for o in outs]

            def step_rows(chunks, s):  # step s: its rows from every unlabeled pipeline
                return chunks[0][s] if len(chunks) == 1 else torch.cat([c[s] for c in chunks])
            parts = [[step_rows(chunks, s) for s in range(self.k)] for chunks in (*views, idx)]
            for x_l, y_l, li, x_uw, x_us, ui in zip(xs, ys, rows, *parts):
                batch = MPLBatch(x_l, y_l, x_uw, x_us)
                # rows of the training set (e.g. rows of a Reduced-MPL logit store)
                batch.labeled_index, batch.unlabeled_index = li, ui
                batch.y_u = self._classes[ui].to(self.device, non_blocking=True)
                self._batches.append(batch)
            self._batches.reverse()  # popped from the end, in order
        return self._batches.pop()

    def next_labeled(self) -> MPLBatch:
        """A labeled batch alone (finetuning): the unlabeled pipeline does not run."""
        if not self._labeled:
            self._labeled = list(zip(*self._labeled_run()))[::-1]
        x_l, y_l, rows = self._labeled.pop()
        batch = MPLBatch(x_l, y_l, x_l[:0], x_l[:0])
        batch.labeled_index = rows
        return batch


class EvalStream:
    """Evaluation batches (images, labels): every file of `index` once a pass, from one pipeline
    built once and kept between passes (building DALI's decoders can cost more than decoding a
    CIFAR-sized test set, and a run evaluates every eval_every steps). The reader reads the files
    in order, endlessly, so a pass starts where the last one stopped (batches it prefetched
    included) and wraps around; any len(index) consecutive files are every file once, each with
    its own label. `sized`: small images all size x size already; the devices as in StreamSpec,
    the resize and crop being the augment stage."""

    def __init__(self, index: FolderIndex, size: int, small: bool, device, batch_size=256,
                 num_threads=4, sized=False, decode_device="gpu", augment_device="gpu",
                 hw_decoder_load=None):
        from mpl_fast.data import dali_pipelines as P

        self.n, self.device = len(index), torch.device(device)
        gpu = self.device.type == "cuda"
        if decode_device == "once":
            index = decode_index(index, size, num_threads)
        source = (P.ArraySource(index.images, index.labels, batch_size, shuffle=False)
                  if hasattr(index, "images") else index.files)
        where = placement(gpu, decode_device, augment_device, hw_decoder_load)
        self.pipe = P.eval_pipeline(source, index.labels, size, small, where, sized=sized,
                                    batch_size=batch_size, num_threads=num_threads,
                                    device_id=(self.device.index or 0) if gpu else None)
        self.pipe.build()

    def batches(self):
        seen = 0
        while seen < self.n:
            x, y = self.pipe.run()
            x, y = _to_torch(x, self.device), _to_torch(y, self.device).flatten().long()
            keep = min(len(y), self.n - seen)  # a batch may reach into the next pass
            seen += keep
            yield x[:keep], y[:keep]


def eval_batches(index: FolderIndex, size: int, small: bool, device, batch_size=256,
                 num_threads=4, sized=False, decode_device="gpu", augment_device="gpu",
                 hw_decoder_load=None):
    """One pass of a fresh EvalStream: every file of `index` once, in order."""
    return EvalStream(index, size, small, device, batch_size, num_threads, sized, decode_device,
                      augment_device, hw_decoder_load).batches()
