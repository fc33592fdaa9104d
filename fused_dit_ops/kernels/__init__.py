"""Triton kernels and their launchers (imported lazily: triton is only needed on CUDA)."""
