"""mpl_fast.models.compiling: networks compiled in place, and copies of them."""
import copy

import torch
from torch import nn

from mpl_fast.models.compiling import compile_net, eager_copy


def test_an_eager_copy_of_a_compiled_network_runs_its_own_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    compile_net(net, "default")
    assert copy.deepcopy(net).forward is net.forward  # the trap: a copy runs the original
    copied = eager_copy(net)
    with torch.no_grad():
        copied[0].weight.zero_()
        copied[0].bias.fill_(2.0)
    copied.eval()
    x = torch.randn(4, 5)
    # BN in evaluation with its fresh statistics: (2 - 0) / sqrt(1 + eps) in every entry
    torch.testing.assert_close(copied(x), torch.full((4, 3), 2.0 / (1 + 1e-5) ** 0.5))
    assert net[0].weight.abs().sum() > 0 and net.training  # the original untouched
    assert "forward" in net.__dict__  # and still compiled


def test_an_eager_copy_of_an_eager_network_is_a_deep_copy():
    net = nn.Linear(2, 2)
    copied = eager_copy(net)
    assert copied is not net and copied.weight is not net.weight
    torch.testing.assert_close(copied.weight, net.weight)
