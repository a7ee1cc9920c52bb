"""Loads the compiled extension mpl_fast._C, which registers torch.ops.mpl_fast.* ops."""
import functools


@functools.lru_cache(maxsize=None)
def load():
    """Import mpl_fast._C (registering its ops) and return it; a clear error if it is missing."""
    try:
        from mpl_fast import _C
    except ImportError as err:
        raise ImportError(
            "mpl_fast._C is not built: reinstall with "
            "`pip install --no-build-isolation -e .` after installing torch "
            f"(import failed: {err})") from err
    return _C


def cuda_built():
    """True when the extension was compiled with its CUDA kernels."""
    return bool(load().cuda_built)
