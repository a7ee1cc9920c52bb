"""The in-memory augmentations (digits, CIFAR batches): what they do and the layout they leave."""
import pytest
import torch
import torch.nn.functional as F

from mpl_fast.data import augment
from tests import seeds


@pytest.mark.parametrize("channels", [1, 3])
def test_pad_crop_is_a_window_of_the_padded_image_in_the_plain_layout(channels):
    """Each image is shifted by up to `pad` pixels (a window of its reflect-padded self), and the
    batch comes back in the plain layout whatever the channels: with one channel the crop used to
    keep its permuted strides, which conv's backward read as channels_last (DDP then warned that
    the gradients' strides did not match its buckets)."""
    gen = seeds.generator(("pad_crop", channels))
    n, h, w, pad = 9, 7, 6, 2
    x = torch.randn(n, channels, h, w, generator=gen)
    out = augment.pad_crop(x, pad, torch.Generator().manual_seed(seeds.fresh("pad_crop_draw")))
    assert out.shape == x.shape
    assert out.stride() == torch.empty(x.shape).stride()
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    shifts = set()
    for i in range(n):
        found = [(oy, ox) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, oy:oy + h, ox:ox + w])]
        assert found, i
        shifts.add(found[0])
    assert len(shifts) > 1  # the shifts are drawn, not one for the batch


def test_weak_and_strong_views_keep_the_plain_layout_and_follow_the_generator():
    x = torch.randn(5, 1, 8, 8, generator=seeds.generator("views"))
    for view in (augment.weak, augment.strong):
        a = view(x, torch.Generator().manual_seed(7), pad=1, hflip=True)
        b = view(x, torch.Generator().manual_seed(7), pad=1, hflip=True)
        assert torch.equal(a, b)
        assert a.stride() == torch.empty(x.shape).stride()
        assert not torch.equal(a, view(x, torch.Generator().manual_seed(8), pad=1, hflip=True))
