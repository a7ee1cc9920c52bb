"""A small CNN for the embedded 8x8 digits (and other tiny images)."""
from torch import nn


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32,
              bn_momentum: float = 0.1) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout, momentum=bn_momentum), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
                         *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, num_classes))
