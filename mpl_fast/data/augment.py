"""Batched augmentations of in-memory image tensors (N x C x H x W), driven by a generator so
that a run is reproducible and resumable. The DALI pipeline does this for JPEG data sets."""
import torch
import torch.nn.functional as F


def pad_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to `pad` pixels (reflect padding, then a random crop)."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    crops = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    # a copy in the plain layout: with one channel .contiguous() would keep the permuted strides,
    # which conv's backward reads as channels_last (DDP then warns of gradient strides)
    return crops.clone(memory_format=torch.contiguous_format)


def flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    do = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(do[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a size x size square (clipped at the border) at a random centre in each image."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen)[:, None, None]
    cx = torch.randint(0, w, (n,), generator=gen)[:, None, None]
    yy, xx = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    half = size // 2
    hole = ((yy - cy).abs() <= half) & ((xx - cx).abs() <= half)
    return x.masked_fill(hole[:, None], 0.0)


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Random brightness and contrast, plus Gaussian noise (a RandAugment stand-in for tiny
    in-memory images)."""
    n = x.shape[0]
    shape = (n, 1, 1, 1)
    bright = (torch.rand(shape, generator=gen) * 2 - 1) * strength
    contrast = 1 + (torch.rand(shape, generator=gen) * 2 - 1) * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    noise = torch.randn(x.shape, generator=gen) * (0.5 * strength)
    return (x - mean) * contrast + mean + bright + noise


def weak(x, gen, pad=1, hflip=False):
    x = pad_crop(x, pad, gen)
    return flip(x, gen) if hflip else x


def strong(x, gen, pad=1, hflip=False, strength=0.5, cutout_size=3):
    return cutout(color_jitter(weak(x, gen, pad, hflip), strength, gen), cutout_size, gen)
