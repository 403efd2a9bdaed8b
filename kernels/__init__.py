"""Triton kernels with plain PyTorch references: fused token log-probs and group advantages.

Importing this package never requires triton; the Triton paths are loaded lazily.
"""
