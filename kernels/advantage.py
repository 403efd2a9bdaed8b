"""GRPO group advantages (docs/grpo.md) as a Triton kernel with a plain PyTorch reference.

    adv = group_advantages(rewards, group_size=8)            # (R − mean_g) / (std_g + eps)
    adv = group_advantages(rewards, 8, std_normalize=False)  # Dr.GRPO: R − mean_g
    keep = ~zero_spread_groups(rewards, 8)                   # for "drop zero-spread groups"

Rows are prompt-major: rows g·G … g·G+G−1 are the G samples of prompt g.
- std is the unbiased (ddof 1, verl's choice) or biased (ddof 0) sample std.
- A singleton group (G = 1) has no baseline: A = R, in both modes.
- A group whose rewards are all equal gets A = 0 exactly (its float mean may
  differ from the common value by an ulp, which would otherwise turn into a
  tiny nonzero advantage).
- NaN or ±inf rewards raise ValueError: a failed judge must be removed by the
  caller (docs/reward.md: such samples are excluded), never averaged into a group.
Advantages are returned in fp32.
"""
from __future__ import annotations

import torch

from kernels.logprob import resolve_backend, triton, tl


def _check(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [R]; got {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.detach().float()
    bad = ~torch.isfinite(r)
    if bad.any():
        rows = bad.nonzero().squeeze(1)[:8].tolist()
        raise ValueError(f"rewards contain NaN/inf at rows {rows} (failed judges?): drop those samples before "
                         "computing advantages")
    return r


def _group_advantages_torch(r, group_size: int, eps: float, std_normalize: bool, unbiased: bool):
    groups = r.view(-1, group_size)
    d = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize:
        var = (d * d).sum(dim=1, keepdim=True) / (group_size - 1 if unbiased else group_size)
        d = d / (var.sqrt() + eps)
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(d), d).reshape(-1)


if triton is not None:

    @triton.jit
    def _group_advantages_kernel(r_ptr, out_ptr, n_groups, G, eps, BLOCK_GROUPS: tl.constexpr,
                                 BLOCK_G: tl.constexpr, STD_NORMALIZE: tl.constexpr, UNBIASED: tl.constexpr):
        groups = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
        cols = tl.arange(0, BLOCK_G)
        valid = (groups < n_groups)[:, None] & (cols < G)[None, :]
        offs = groups.to(tl.int64)[:, None] * G + cols[None, :]
        r = tl.load(r_ptr + offs, mask=valid, other=0.0)
        mean = tl.sum(r, axis=1) / G
        d = tl.where(valid, r - mean[:, None], 0.0)
        if STD_NORMALIZE:
            if UNBIASED:
                var = tl.sum(d * d, axis=1) / (G - 1)
            else:
                var = tl.sum(d * d, axis=1) / G
            d = d / (tl.sqrt(var)[:, None] + eps)
        hi = tl.max(tl.where(valid, r, float("-inf")), axis=1)
        lo = tl.min(tl.where(valid, r, float("inf")), axis=1)
        d = tl.where((hi == lo)[:, None], 0.0, d)
        tl.store(out_ptr + offs, d, mask=valid)


def _group_advantages_triton(r, group_size: int, eps: float, std_normalize: bool, unbiased: bool):
    n_groups = r.numel() // group_size
    out = torch.empty_like(r)
    block_g = triton.next_power_of_2(group_size)
    block_groups = max(1, min(triton.next_power_of_2(n_groups), 2048 // block_g))
    grid = (triton.cdiv(n_groups, block_groups),)
    _group_advantages_kernel[grid](r, out, n_groups, group_size, eps, BLOCK_GROUPS=block_groups, BLOCK_G=block_g,
                                   STD_NORMALIZE=std_normalize, UNBIASED=unbiased)
    return out


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, std_normalize: bool = True,
                     unbiased: bool = True, backend: str = "auto") -> torch.Tensor:
    """Per-row advantage within its group of `group_size` consecutive rows (see module docstring)."""
    r = _check(rewards, group_size).contiguous()
    eps = float(eps)
    if not (eps >= 0.0 and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0; got {eps}")
    chosen = resolve_backend(backend, r.device, env_var=None)
    if group_size == 1 or r.numel() == 0:
        return r.clone()
    if chosen == "triton":
        return _group_advantages_triton(r, group_size, eps, std_normalize, unbiased)
    return _group_advantages_torch(r, group_size, eps, std_normalize, unbiased)


def zero_spread_groups(rewards: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """Bool [R]: True for every row whose group's rewards span at most `tol` (max − min)."""
    r = _check(rewards, group_size)
    if tol < 0:
        raise ValueError(f"tol must be >= 0; got {tol}")
    groups = r.view(-1, group_size)
    spread = groups.amax(dim=1) - groups.amin(dim=1) if r.numel() else groups.new_zeros(0)
    return (spread <= tol).repeat_interleave(group_size)

