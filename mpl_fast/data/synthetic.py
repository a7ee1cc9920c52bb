"""Synthetic ImageNet-sized JPEG trees, for input-pipeline benchmarks without photos at hand."""
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SYNTHETIC_SIZE = (500, 375)  # the typical ImageNet photo
SYNTHETIC_MARK = ".mpl_fast_synthetic"


def _write_synthetic(job):
    """Images with photo-like spectra (a few smooth colour fields plus mild grain), so that JPEG
    sizes and decode cost resemble photographs rather than pure noise or flat colour."""
    folder, first, count = job
    import numpy as np
    from PIL import Image

    w, h = SYNTHETIC_SIZE
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        img = np.zeros((h, w, 3), np.float32)
        for scale in (4, 16, 64):
            coarse = rng.uniform(0, 255, (h // scale + 2, w // scale + 2, 3)).astype(np.uint8)
            img += np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        img = img / 3 + rng.normal(0, 6, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
            Path(folder) / f"c{i % 10}" / f"img_{i:07d}.jpg", quality=90)


def synthetic_tree(root: Path, count: int) -> Path:
    """N synthetic JPEGs in root/c0..c9, written into a temporary sibling and renamed into
    place, so an interrupted run leaves no half-written tree behind."""
    mark = root / SYNTHETIC_MARK
    if mark.is_file() and mark.read_text().strip() == str(count):
        return root
    if root.exists():
        raise ValueError(f"--synthetic: {root} already exists (and is not a tree of {count} "
                         "synthetic images written by --synthetic); name a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".partial-", dir=root.parent))
    try:
        for c in range(10):
            (tmp / f"c{c}").mkdir()
        workers = min(os.cpu_count() or 1, 16)
        chunk = -(-count // workers)
        jobs = [(str(tmp), start, min(chunk, count - start)) for start in range(0, count, chunk)]
        print(f"writing {count} synthetic {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} JPEGs to {root} "
              f"({len(jobs)} processes)", flush=True)
        # spawn: the caller may already run threads (torch, DALI), which fork does not copy
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(jobs), mp_context=spawn) as pool:
            list(pool.map(_write_synthetic, jobs))
        (tmp / SYNTHETIC_MARK).write_text(f"{count}\n")
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
