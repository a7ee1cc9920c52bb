"""Optimizers: Nesterov SGD through torch's fused implementation, no weight decay on
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


def sgd(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float,
        lr_on_device: bool = False):
    """Fused SGD on every device: it takes a tensor lr, and skips a step on the device where its
    found_inf flag is set (mpl_fast.mpl.nonfinite).
    lr_on_device: the learning rate lives in a device tensor that schedulers fill in place,
    so a step captured in a CUDA graph reads the current value."""
    device = next(model.parameters()).device
    opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum,
                          nesterov=nesterov and momentum > 0, fused=True)
    if lr_on_device:
        set_lr_kind(opt, device)
    return opt


def set_lr_kind(opt: torch.optim.Optimizer, device=None):
    """Each group's lr as its own device tensor (device given) or as a float (None). After
    load_state_dict, which brings the saved kind back."""
    for group in opt.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if device is not None else lr
