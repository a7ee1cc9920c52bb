"""Optimizers: Nesterov SGD through torch's foreach/fused implementation, no weight decay on
BatchNorm parameters and biases."""
import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                                          nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def sgd(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float):
    device = next(model.parameters()).device
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum,
                           nesterov=nesterov and momentum > 0, **kw)
