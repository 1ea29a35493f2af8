"""Triton kernels of reft-fast (installed as ``reft_fast.kernels``): pure functions over tensors."""
