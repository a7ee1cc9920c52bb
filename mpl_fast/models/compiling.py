"""torch.compile of a network's forward, in place (`model.compile`, `bench step --compile`)."""
import copy

import torch
from torch import nn


def compile_net(net: nn.Module, mode: str) -> None:
    """Compile the network's forward, in place: parameter names, checkpoints and the optimizer
    see the same module. (Module.compile() traced nothing with torch 2.13: dynamo skips the
    nn.Module._call_impl frame it wraps.) mode 'none' leaves it eager."""
    if mode != "none":
        net.forward = torch.compile(net.forward, mode=None if mode == "default" else mode)


def eager_copy(net: nn.Module) -> nn.Module:
    """A deep copy of net that runs its own weights eagerly. A forward compiled in place is
    bound to the original network: a plain deep copy would go on running the original."""
    copied = copy.deepcopy(net)
    copied.__dict__.pop("forward", None)  # the class's forward again, bound to the copy
    return copied
