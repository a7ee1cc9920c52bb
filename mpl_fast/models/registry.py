"""Build a network by name: small_cnn, wrn28_2, wrn28_8, resnet50, or a timm model (timm:<name>,
or the bare name when it is not one of ours)."""
from torch import nn

from mpl_fast.models.resnet import resnet50
from mpl_fast.models.small_cnn import small_cnn
from mpl_fast.models.wrn import WideResNet

NAMES = ("mlp", "small_cnn", "wrn28_2", "wrn28_8", "resnet50", "timm:<name>", "<timm name>")


def mlp(num_classes: int, in_features: int, hidden: int = 64) -> nn.Module:
    """A BatchNorm-free MLP over flattened images (tiny data, exact data-parallel checks)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 8,
                **kw) -> nn.Module:
    if name == "mlp":
        return mlp(num_classes, in_channels * image_size * image_size)
    if name == "small_cnn":
        return small_cnn(num_classes, in_channels, **kw)
    if name in ("wrn28_2", "wrn28_8"):
        return WideResNet(num_classes, depth=28, widen=int(name[-1]), in_channels=in_channels, **kw)
    if name == "resnet50":
        return resnet50(num_classes, in_channels)
    timm = _timm_or_none()
    if name.startswith("timm:"):
        if timm is None:
            raise ValueError("model timm:<name> needs timm: pip install 'mpl-fast[timm]'")
        try:
            return timm.create_model(name[5:], pretrained=False, num_classes=num_classes,
                                     in_chans=in_channels)
        except RuntimeError as err:  # timm: unknown model
            raise ValueError(f"model {name}: {err}") from err
    if timm is not None and timm.is_model(name):  # a bare timm name, e.g. resnet18
        return build_model("timm:" + name, num_classes, in_channels, image_size)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(NAMES)}"
                     + ("" if timm is not None else " (timm names need mpl-fast[timm])"))


def _timm_or_none():
    try:
        import timm
    except ImportError:
        return None
    return timm
