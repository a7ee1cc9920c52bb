"""torch.compile of a network's forward, in place (`model.compile`, `bench step --compile`)."""
import torch
from torch import nn


def compile_net(net: nn.Module, mode: str) -> None:
    """Compile the network's forward, in place: parameter names, checkpoints and the optimizer
    see the same module. (Module.compile() traced nothing with torch 2.13: dynamo skips the
    nn.Module._call_impl frame it wraps.) mode 'none' leaves it eager."""
    if mode != "none":
        net.forward = torch.compile(net.forward, mode=None if mode == "default" else mode)
