"""Fused Triton kernels (the kernels land in later commits)."""
HAS_TRITON = False
