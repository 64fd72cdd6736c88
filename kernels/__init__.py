"""Triton kernels (installed as lit_mamba2.kernels)."""
