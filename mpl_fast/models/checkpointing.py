"""Activation checkpointing per block (torch.utils.checkpoint, use_reentrant=False), BN-aware.

Plain checkpointing re-runs each block's forward during backward, and in training mode that
second forward updates BatchNorm running statistics a second time (momentum applied twice,
num_batches_tracked counted twice). Here the recomputation runs with every BN momentum at 0 (the
running statistics stay as they are: r <- 1 * r + 0 * batch) and without its batch counter, so
the statistics are updated exactly once, while the recomputation takes the same code path (and
saves the same tensors) as the original forward, as checkpointing requires. For the same reason it
runs under the torch-function modes the forward ran under (torch.utils.checkpoint re-enters none:
the backward runs outside them), e.g. mpl_fast.mpl.constant_rows's.
"""
import contextlib
from typing import Iterable, Optional, Type

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _bn_layers(block):
    return [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def _bn_not_counted(block: nn.Module, tracking):
    """Re-run `block` as its first forward ran (the same track_running_stats per layer, e.g.
    under mpl.frozen_bn_stats) but without counting the batch in the running statistics.

    Only Python attributes change (momentum 0, the batch counter unset for the re-run): no
    tensor op, so no extra kernel launches in backward."""
    layers = _bn_layers(block)
    saved = [(m.momentum, m.track_running_stats, m.num_batches_tracked) for m in layers]
    for m, track in zip(layers, tracking):
        m.momentum, m.track_running_stats = 0.0, track
        m.num_batches_tracked = None  # BatchNorm counts nothing when it has no counter
    try:
        yield
    finally:
        for m, (momentum, track, tracked) in zip(layers, saved):
            m.momentum, m.track_running_stats = momentum, track
            m.num_batches_tracked = tracked


class CheckpointedBlock(nn.Module):
    """`block`, checkpointed in training forwards. Its state dict holds the block's own keys (no
    `block.` level), so a network's checkpoints load whichever blocks are wrapped: a run resumes
    or is evaluated with model.checkpoint changed. Keys with the level (checkpoints written
    before) still load."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self._register_load_state_dict_pre_hook(_into_the_block)

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        return self.block.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):
            return self.block(x)
        if torch.compiler.is_compiling() and not _function_modes():
            # traced as checkpoint's higher-order op: the compiled backward recomputes the block's
            # ops but not its buffer updates (BN statistics counted once; tested)
            return checkpoint(self.block, x, use_reentrant=False)
        return _checkpoint_eagerly(self.block, x)


def _into_the_block(state_dict, prefix, *_):
    """The block's keys, saved without the wrapper's level, under it (in the copy that
    load_state_dict hands its hooks)."""
    for key in [k for k in state_dict if k.startswith(prefix)
                and not k.startswith(prefix + "block.")]:
        state_dict[prefix + "block." + key[len(prefix):]] = state_dict.pop(key)


# Under torch.compile this runs eagerly (its inner frames compiled as frames of their own) where a
# torch-function mode is active (constant_rows's, shared_statistics'): dynamo hands the traced
# checkpoint, a higher-order op, to the mode and runs the mode's handler with the mode popped, so
# the block's layers would be traced without it (torch 2.14: the plain network's gradient), and
# entering the mode inside the checkpointed function is refused as a side effect.
@torch.compiler.disable(recursive=False)
def _checkpoint_eagerly(block, x):
    first_pass = []  # BN tracking flags of the original forward

    def run(inp):
        if first_pass:  # the recomputation in backward: BN statistics already counted
            with _bn_not_counted(block, first_pass[0]):
                return block(inp)
        first_pass.append([m.track_running_stats for m in _bn_layers(block)])
        return block(inp)

    modes = _function_modes()
    if not modes:
        return checkpoint(run, x, use_reentrant=False)
    return checkpoint(run, x, use_reentrant=False,  # re-entered for the recomputation
                      context_fn=lambda: (contextlib.nullcontext(), _entered(modes)))


def _function_modes():
    """The torch-function modes active now, outermost first (torch.utils.checkpoint re-enters
    none in its recomputation: backward runs outside them)."""
    return list(torch.overrides._get_current_function_mode_stack())


@contextlib.contextmanager
def _entered(modes):
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


# what a network checkpoint_blocks finds nothing in lacks, for the errors that say so
NO_BLOCKS = ("no blocks to checkpoint (WRN or ResNet blocks, or a Sequential of two or more "
             "blocks of one kind, as timm's ResNets, ConvNeXts, EfficientNets and ViTs have)")


def default_block_types():
    from mpl_fast.models.resnet import _Bottleneck
    from mpl_fast.models.wrn import _Block

    return (_Block, _Bottleneck)


def checkpoint_blocks(model: nn.Module, block_types: Iterable[Type[nn.Module]] = None,
                      limit: Optional[int] = None) -> int:
    """Wrap, in place, the sub-modules of one of `block_types` (default: the WRN and ResNet
    blocks; in a network without them, the repeated blocks of its Sequentials: `repeated_blocks`,
    timm's ResNets, ConvNeXts, EfficientNets, ViTs) in CheckpointedBlocks: all of them, or the
    first `limit` in the order the network registers them (its forward order for WRN, ResNet and
    most timm models). The first blocks see the largest feature maps, so they hold the most
    activation memory for the compute their re-run costs: on WRN-28-2 the first 6 of its 12
    blocks cut the saved bytes by 54% for 10% more FLOPs, all 12 by 85% for 20% more
    (tests/test_checkpointing.py). Returns how many were wrapped."""
    types = tuple(block_types or default_block_types())
    found = []

    def collect(module):
        for name, child in module.named_children():
            if isinstance(child, CheckpointedBlock):
                continue
            if isinstance(child, types):
                found.append((module, name, child))
            else:
                collect(child)
    collect(model)
    if block_types is None and not any(isinstance(m, types) for m in model.modules()):
        found = repeated_blocks(model)
    chosen = found if limit is None else found[:limit]
    for parent, name, child in chosen:
        setattr(parent, name, CheckpointedBlock(child))
    return len(chosen)


def repeated_blocks(model: nn.Module):
    """(parent, name, block) for the blocks of the innermost Sequentials that hold two or more
    modules of one class, each with sub-modules and parameters of its own (a stage of residual
    blocks, a ViT's blocks; not a plain run of layers), in registration order. Blocks wrapped
    already count by their class and are left out (a second call wraps the rest)."""
    def unwrapped(m):
        return m.block if isinstance(m, CheckpointedBlock) else m

    def is_block(m):
        m = unwrapped(m)
        return next(m.children(), None) is not None and next(m.parameters(), None) is not None

    def search(module):  # (whether a Sequential of blocks lies here, its unwrapped blocks)
        inner = [search(c) for c in module.children() if not isinstance(c, CheckpointedBlock)]
        if any(held for held, _ in inner):
            return True, [b for _, blocks in inner for b in blocks]
        children = list(module.named_children())
        if isinstance(module, nn.Sequential) and len(children) >= 2 \
                and all(is_block(c) for _, c in children) \
                and len({type(unwrapped(c)) for _, c in children}) == 1:
            return True, [(module, n, c) for n, c in children
                          if not isinstance(c, CheckpointedBlock)]
        return False, []
    return search(model)[1]
