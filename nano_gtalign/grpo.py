"""The GRPO loss pieces (docs/grpo.md) as plain tensor functions; nano_gtalign/update.py composes them.

Shapes: R completion rows (prompt-major: row i*G + g is sample g of prompt i), T completion positions.
`mask` is a bool (or 0/1) tensor [R, T] that is True on generated tokens (including the EOS the model
produced) and False on padding; prompt tokens never appear here.

One step of the objective is

    A      = group_advantages(R)                              (nano_gtalign/kernels/advantage.py, re-exported here)
    loss   = reduce_loss(policy_loss(logp, old_logp, A, mask), mask, mode, counts of the whole step)
           + beta * reduce_loss(kl_penalty(logp, ref_logp, kind), mask, mode, same counts)

Every aggregation divides by counts of the WHOLE optimisation step (all micro-batches on all ranks), so that
summing the micro-batch losses gives exactly the full-batch loss however the step is split.
"""
from __future__ import annotations

import torch

# One source of truth for advantages: the kernels package (Triton with a torch reference fallback).
from nano_gtalign.kernels.advantage import group_advantages, zero_spread_groups  # noqa: F401  (re-exported)

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
FINISH_REASONS = ("eos", "stop", "length")

# Shape and range checks of policy_loss's inputs on every call: off in a run (see check_loss_inputs).
CHECK_INPUTS = False

# Bounds that keep exp() finite; both are the values verl uses.
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def _check_mask(x: torch.Tensor, mask: torch.Tensor, name: str = "per_token") -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [rows, tokens], got shape {tuple(x.shape)}")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(x.shape)}")
    return mask.bool()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: float | None = 3.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss with the dual clip, and how often each clip was active.

        rho   = exp(logp - old_logp)                  (log-ratio clamped to +-20 so exp stays finite)
        l     = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A * dual_clip)   where A < 0  (dual clip; dual_clip=None turns it off)

    The dual clip bounds the loss of a negative-advantage token whose ratio has grown large (rho > c): without
    it one such token could dominate the step. Where a clip is active the loss is constant in logp, so its
    gradient is zero.

    logp: [R, T] log-probs under the current policy (with grad); old_logp: [R, T] under the policy that sampled
    (no grad); advantages: [R] (one per completion, broadcast over its tokens) or [R, T]; mask: [R, T].
    Returns (loss [R, T], zero where mask is False; stats) where stats holds 0-d float tensors over the masked
    tokens of this call: clip_frac (any clip active), clip_frac_low (rho < 1 - clip_low, A < 0),
    clip_frac_high (rho > 1 + clip_high, A > 0), dual_clip_frac, approx_kl (mean of old_logp - logp),
    and tokens (how many masked tokens the fractions are over, for weighting across micro-batches).
    """
    if CHECK_INPUTS:
        check_loss_inputs(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip)
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    adv = advantages.to(torch.float32)
    # Zero the log-ratio on padding before exp so garbage there can never make inf/NaN (also in backward).
    log_ratio = torch.where(mask, logp.float() - old_logp.float(), torch.zeros((), device=logp.device))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        dual_active = (adv < 0) & (loss > -adv * dual_clip)
        loss = torch.where(dual_active, -adv * dual_clip, loss)
    loss = torch.where(mask, loss, torch.zeros((), device=loss.device))

    with torch.no_grad():
        n = mask.sum()
        denom = n.clamp(min=1).float()
        stats = {
            "clip_frac": ((clip_active | dual_active) & mask).sum() / denom,
            "clip_frac_low": (clip_active & (ratio < 1.0 - clip_low) & mask).sum() / denom,
            "clip_frac_high": (clip_active & (ratio > 1.0 + clip_high) & mask).sum() / denom,
            "dual_clip_frac": (dual_active & mask).sum() / denom,
            "approx_kl": (-log_ratio * mask).sum() / denom,
            "tokens": n.float(),
        }
    return loss, stats


def check_loss_inputs(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    """policy_loss's inputs, checked when CHECK_INPUTS is on (the tests switch it on; train.py checks the clip
    ranges when it parses its flags and builds the shapes itself, so a run skips this every micro-batch)."""
    _check_mask(logp, mask, "logp")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} does not match logp shape {tuple(logp.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages has {advantages.shape[0]} rows but logp has {logp.shape[0]}")
    if advantages.dim() != 1 and advantages.shape != logp.shape:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be [R] or match logp {tuple(logp.shape)}")
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs (Schulman's k1/k2/k3).

        delta = clamp(ref_logp - logp, -20, 20)
        k1 = -delta                       (= logp - ref_logp; unbiased, can be negative)
        k2 = delta^2 / 2                  (low variance, biased)
        k3 = clamp(exp(delta) - delta - 1, -10, 10)   (unbiased and always >= 0)

    Mask and average it with `reduce_loss` like the policy loss. The clamps zero the gradient where they bind,
    which is the point: one wildly off token must not blow up the step.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r} (choose from {', '.join(KL_KINDS)})")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} does not match logp shape {tuple(logp.shape)}")
    delta = (ref_logp.float() - logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return -delta
    if kind == "k2":
        return 0.5 * delta.square()
    return (torch.exp(delta) - delta - 1.0).clamp(-K3_CLAMP, K3_CLAMP)


def step_counts(mask: torch.Tensor) -> tuple[int, int]:
    """(completion tokens, sequences with at least one token) in `mask`; sum these over every micro-batch and
    rank of a step (all_reduce) to get the global_token_count and global_seq_count that `reduce_loss` takes."""
    m = mask.bool()
    return int(m.sum()), int(m.any(dim=-1).sum())


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              global_token_count: int | float | torch.Tensor | None = None,
              max_len: int | None = None,
              global_seq_count: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token loss [R, T] to a scalar; this micro-batch's share of the step's loss.

        token-mean:              sum_{i,t} m_it x_it / N_tok               (DAPO; every token weighs the same)
        seq-mean-token-mean:     sum_i [ sum_t m_it x_it / sum_t m_it ] / N_seq   (GRPO paper)
        seq-mean-token-sum-norm: sum_i [ sum_t m_it x_it / max_len ] / N_seq      (Dr.GRPO; no length bias)

    N_tok (global_token_count) and N_seq (global_seq_count) are the totals over the WHOLE step, all
    micro-batches and all ranks (see `step_counts`); with them the micro-batch losses add up to the full-batch
    loss, so gradient accumulation and DDP averaging need no further rescaling (under DDP, which averages
    gradients over W ranks, multiply the loss by W). When omitted they default to this call's own counts (the
    step is this one batch). Only sequences with at least one masked token count towards N_seq, so a
    completion dropped by masking (truncated, failed judge) does not dilute the mean. max_len must be a fixed
    number (e.g. the generation limit), not the padded width of a batch, or splitting would change the loss.
    An empty batch gives 0 (still differentiable), never NaN.
    """
    mask = _check_mask(per_token, mask)
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r} (choose from {', '.join(AGGREGATIONS)})")
    m = mask.to(per_token.dtype)
    masked = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "token-mean":
        n_tok = m.sum() if global_token_count is None else global_token_count
        if not isinstance(n_tok, torch.Tensor) and n_tok < 0:
            raise ValueError(f"global_token_count must be >= 0, got {n_tok}")
        return masked.sum() / torch.clamp(torch.as_tensor(n_tok, dtype=per_token.dtype), min=1.0)
    seq_tokens = m.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / seq_tokens.clamp(min=1.0)
    else:
        if max_len is None or max_len <= 0:
            raise ValueError("seq-mean-token-sum-norm needs max_len > 0 (a fixed length such as max_new_tokens)")
        if seq_tokens.numel() and int(seq_tokens.max()) > max_len:
            raise ValueError(f"a sequence has {int(seq_tokens.max())} tokens, more than max_len={max_len}")
        per_seq = masked.sum(dim=-1) / max_len
    n_seq = (seq_tokens > 0).sum() if global_seq_count is None else global_seq_count
    if not isinstance(n_seq, torch.Tensor) and n_seq < 0:
        raise ValueError(f"global_seq_count must be >= 0, got {n_seq}")
    return per_seq.sum() / torch.clamp(torch.as_tensor(n_seq, dtype=per_token.dtype), min=1.0)


def mask_truncated(mask: torch.Tensor, finish_reasons: list[str]) -> torch.Tensor:
    """Copy of mask [R, T] with every row whose finish reason is "length" (cut off by max_new_tokens) zeroed.

    A truncated completion never reached its <response>, so its low score says little about the tokens it did
    write; dropping it from the loss (an option in train.py) avoids teaching "shorter is better" by accident.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [rows, tokens], got shape {tuple(mask.shape)}")
    if len(finish_reasons) != mask.shape[0]:
        raise ValueError(f"{len(finish_reasons)} finish reasons for {mask.shape[0]} mask rows")
    bad = sorted({r for r in finish_reasons if r not in FINISH_REASONS})
    if bad:
        raise ValueError(f"unknown finish reasons {bad} (expected {', '.join(FINISH_REASONS)})")
    keep = torch.tensor([r != "length" for r in finish_reasons], dtype=torch.bool, device=mask.device)
    return mask.bool() & keep[:, None]

