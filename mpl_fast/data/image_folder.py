"""Image-folder trees (`root/<class>/<file>.jpg`, ImageNet's train layout): indexing with
cheap integrity checks, and the labeled/unlabeled split.

Files that cannot be images are skipped and counted, never given a wrong label: a name without
an image extension, or a file whose bytes do not start like a JPEG/PNG, or a JPEG without its
end-of-image marker (truncated). The skipped files and their reasons are saved with the run.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from mpl_fast.data.splits import DataError, balanced_indices

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class FolderIndex:
    root: str
    files: List[str]  # absolute paths
    labels: List[int]
    classes: List[str]
    skipped: List[tuple] = field(default_factory=list)  # (path, reason)

    def __len__(self):
        return len(self.files)


def check_image(path: Path) -> Optional[str]:
    """Why `path` is not a usable image, or None. Reads a few bytes at each end only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:3] == b"\xff\xd8\xff":
                f.seek(max(0, size - 64))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
                return None
            if head == b"\x89PNG\r\n\x1a\n":
                return None
            return "not a JPEG or PNG file"
    except OSError as err:
        return f"unreadable ({err.strerror})"


def index_folder(root, progress=None) -> FolderIndex:
    """Every usable image under root/<class>/, sorted; progress(class folders done, class
    folders, detail) after each class (ImageNet's 1.28M files take a minute or more)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"no class folders under {root} (expected root/<class>/<image>)")
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        kept = 0
        for entry in sorted(os.scandir(root / name), key=lambda e: e.name):
            if not entry.is_file():
                continue
            path = Path(entry.path)
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((str(path), "not an image file name"))
                continue
            reason = check_image(path)
            if reason:
                skipped.append((str(path), reason))
                continue
            files.append(str(path.resolve()))
            labels.append(label)
            kept += 1
        if kept == 0:
            raise DataError(f"class folder {root / name} holds no usable images")
        if progress is not None:
            progress(label + 1, len(classes), f"{len(files)} images")
    return FolderIndex(str(root.resolve()), files, labels, classes, skipped)


def all_of_size(index, size: int) -> bool:
    """Whether every image of `index` (a FolderIndex, or in-memory arrays) is size x size, so
    that the pipelines can skip resizing small images (CIFAR's 50000 JPEG headers: ~5 s on a
    2-core machine). Stops at the first image of another size."""
    if hasattr(index, "images"):
        return tuple(index.images.shape[1:3]) == (size, size)
    from PIL import Image

    for path in index.files:
        try:
            with Image.open(path) as im:  # reads the header only
                if im.size != (size, size):
                    return False
        except (OSError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read the image header of {path} ({err.__class__.__name__};"
                            " the index checks only a file's first and last bytes)") from err
    return True


def balanced_split(index: FolderIndex, per_class: Optional[int] = None,
                   percent: Optional[float] = None, seed: int = 0) -> List[int]:
    """Seeded, class-balanced labeled subset: `per_class` files of each class, or `percent` of
    each class (rounded, at least 1). Sorted indices into index.files."""
    chosen = balanced_indices(torch.tensor(index.labels), per_class, percent, seed, index.classes)
    return sorted(chosen.tolist())


def split_from_list(index: FolderIndex, list_file) -> List[int]:
    """The labeled subset named by a file list in the format of the public ImageNet 1%/10%
    subsets: one file name a line (e.g. n01440764_10026.JPEG). Every name must exist."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"split list {list_file} not found")
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    by_name = {}
    for i, f in enumerate(index.files):
        by_name.setdefault(Path(f).name, i)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"split list {list_file}: {len(missing)} of {len(names)} files are not "
                        f"in {index.root} (first: {missing[0]})")
    return sorted({by_name[n] for n in names})
