"""Triton kernels with plain PyTorch references: fused token log-probs and group advantages.

Importing this package never requires triton; without it every function runs its torch backend.
"""
from .advantage import group_advantages, token_advantages, zero_spread_groups
from .logprob import fused_logprobs

__all__ = ["fused_logprobs", "group_advantages", "token_advantages", "zero_spread_groups"]
