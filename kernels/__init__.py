"""Triton kernels of mpl-fast (installed as mpl_fast.kernels): @triton.jit functions and their
launchers only. Set TRITON_INTERPRET=1 before importing to run them on CPU tensors."""
