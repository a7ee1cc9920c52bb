"""Wide ResNet (Zagoruyko & Komodakis) as used by MPL's CIFAR code: pre-activation blocks,
BN momentum 0.01 / eps 1e-3 (PyTorch's momentum = 1 - TF's decay 0.99), leaky ReLU 0.1."""
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin, cout, stride, bn, activate_before_residual=False):
        super().__init__()
        self.bn1, self.bn2 = bn(cin), bn(cout)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
                         if cin != cout or stride != 1 else None)
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        o = self.act(self.bn1(x))
        y = self.conv2(self.act(self.bn2(self.conv1(o))))
        if self.shortcut is None:
            return y + x
        return y + self.shortcut(o if self.activate_before_residual else x)


class WideResNet(nn.Module):
    def __init__(self, num_classes=10, depth=28, widen=2, dropout=0.0, bn_momentum=0.01,
                 bn_eps=1e-3, in_channels=3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]

        def bn(c):
            return nn.BatchNorm2d(c, momentum=bn_momentum, eps=bn_eps)

        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for stage in range(3):
            for i in range(n):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(_Block(cin, widths[stage + 1], stride, bn,
                                     activate_before_residual=(stage == 0 and i == 0)))
        self.blocks = nn.Sequential(*blocks)
        self.bn = bn(widths[3])
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(self.drop(self.pool(x).flatten(1)))
