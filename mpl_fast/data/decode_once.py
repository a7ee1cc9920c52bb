"""Small images decoded once (`data.decode_device=once`): every file of an image-folder index
decoded at the start, by DALI's CPU decoder, into one N x H x W x 3 uint8 array in host memory
(CIFAR-10's 50000 training JPEGs: 146 MiB, a few seconds), which the pipelines then crop and
augment as in-memory arrays: no image is decoded again, epoch after epoch. For data sets of small
images all of one size only (resizing would change what is kept); a data set larger than
MAX_BYTES decoded is refused (ImageNet would need ~140 GiB)."""
import sys
import time

import numpy as np

from mpl_fast.data.cifar_batches import ArrayIndex
from mpl_fast.data.image_folder import DataError

MAX_BYTES = 8 << 30
BATCH = 1024


def check_fits(n: int, size: int) -> int:
    """The bytes n images of size x size decode to; DataError past MAX_BYTES."""
    need = n * size * size * 3
    if need > MAX_BYTES:
        raise DataError(f"data.decode_device=once: {n} images of {size}x{size} decode to "
                        f"{need / 2**30:.1f} GiB, more than the {MAX_BYTES / 2**30:.0f} GiB "
                        "allowed; decode on the gpu or cpu instead")
    return need


def decode_index(index, size: int, num_threads: int = 4, quiet: bool = False) -> ArrayIndex:
    """An ArrayIndex holding the decoded images of `index` (a FolderIndex) in its order, with its
    labels; `index` itself if it already holds arrays. DataError when the decoded set would pass
    MAX_BYTES, when an image is not size x size, or when one cannot be decoded."""
    if hasattr(index, "images"):
        return index
    n = len(index)
    need = check_fits(n, size)
    batch = min(BATCH, n)
    pipe = _pipeline(index.files, batch, num_threads)
    if not quiet:
        print(f"decoding {n} images once into memory ({need / 2**20:.1f} MiB)...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, batch):
        try:
            (out,) = pipe.run()
        except RuntimeError:
            bad = _first_undecodable(index.files[start:start + batch], num_threads)
            raise DataError(f"cannot decode {bad}") from None
        for j in range(min(batch, n - start)):
            image = out.at(j)
            if image.shape != (size, size, 3):
                raise DataError(f"data.decode_device=once needs every image {size}x{size}: "
                                f"{index.files[start + j]} is {image.shape[1]}x{image.shape[0]}")
            images[start + j] = image
    if not quiet:
        print(f"decoded {n} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
    return ArrayIndex(index.root, images, list(index.labels), list(index.classes),
                      list(index.skipped))


def _pipeline(files, batch, num_threads):
    """The files in order, decoded to RGB on the CPU, `batch` a run (the last one padded)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def in_order():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False, pad_last_batch=True)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    pipe = in_order(batch_size=batch, num_threads=num_threads, device_id=None,
                    prefetch_queue_depth=1)
    pipe.build()
    return pipe


def _decodes(files, num_threads):
    try:
        _pipeline(files, len(files), num_threads).run()
        return True
    except RuntimeError:
        return False


def _first_undecodable(files, num_threads):
    """In a batch DALI failed to decode, the first file it cannot decode, found by halving
    (DALI's error does not name it): about log2(len(files)) small pipelines."""
    while len(files) > 1:
        half = files[:len(files) // 2]
        files = half if not _decodes(half, num_threads) else files[len(files) // 2:]
    return files[0]
