"""mpl-fast: a fast, faithful Meta Pseudo Labels trainer and fused semi-supervised loss ops."""
import importlib

__version__ = "0.1.0"

# torch before anything of ours, the extension mpl_fast._C included: _C links libtorch and the
# CUDA runtime, and `import mpl_fast._C` before torch aborted on the GPU machine ("free(): invalid
# pointer"; most likely the toolkit's libcudart loaded beside the one torch brings).
importlib.import_module("torch")
