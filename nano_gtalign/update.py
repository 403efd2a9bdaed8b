"""The policy update of one step: epochs -> mini-batches (one optimizer step each) -> micro-batches.

GRPO calls `update` with one advantage per completion; PPO (ppo.py) with one per token, and runs its critic
through the same `train_passes`.

Each micro-batch's loss is its share of the mini-batch's loss over the WHOLE step's token and sequence
counts on every rank (grpo.reduce_loss), so gradient accumulation and DDP averaging give exactly the
full-batch gradient however the step is split (docs/grpo.md#loss-aggregation).

Old log-probs (the denominator of the PPO ratio). With one mini-batch and one epoch the update is exactly
on-policy: old_logp = logp.detach() of the same forward (ratio 1, no extra pass). With several optimizer
steps per rollout, "recompute" runs one no-grad pass before the first update; "sampler" takes the sampler's
log-probs instead (the same distribution when top-k/top-p are off, up to float noise between the KV-cache
decode and the full forward; saves that pass).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from nano_gtalign import grpo
from nano_gtalign.distributed import Dist, all_sum, grad_sync, unwrap
from nano_gtalign.layout import pack_rows
from nano_gtalign.policy import autocast
from nano_gtalign.rollout import Rollout


@dataclass
class UpdateConfig:
    mini_batches: int = 1             # optimizer steps per epoch (the step's prompts split evenly)
    epochs: int = 1                   # passes over the step's samples (--ppo-epochs)
    micro_batch_size: int = 4         # rows per forward/backward
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "token-mean"
    max_new_tokens: int = 4096        # the fixed length of seq-mean-token-sum-norm
    temperature: float = 1.0          # divides the logits, as in sampling
    old_logp: str = "recompute"       # or "sampler"
    grad_clip: float = 1.0            # 0: off
    grad_checkpointing: bool = False
    fsdp: bool = False
    compute_dtype: torch.dtype = torch.float32


def lr_factor(opt_step: int, total: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warm-up from 0 over warmup_steps optimizer steps, then constant or cosine down to min_lr_ratio."""
    if opt_step < warmup_steps:
        return (opt_step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (opt_step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(module: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                   total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float):
    """AdamW over the module's trainable parameters and its learning-rate schedule (lr_factor) over
    total_steps optimizer steps."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, betas=betas,
                                  weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule, min_lr_ratio))
    return optimizer, scheduler


def micro_batches(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, hi)) for s in range(lo, hi, size)]


def forward_logp(model, ro: Rollout, lo: int, hi: int, cfg: UpdateConfig, pad_id: int, device: torch.device,
                 with_entropy: bool = False):
    """[rows, T] log-probs (and entropies, else None) of rollout rows lo:hi, and their loss mask."""
    ids, mask, P, T = pack_rows(ro.prompt_ids[lo:hi], ro.completion_ids[lo:hi], ro.attn_mask[lo:hi], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    with autocast(device, cfg.compute_dtype):
        out = model(ids, attention_mask=mask, targets=ids[:, P:], prompt_len=P, temperature=cfg.temperature,
                    with_entropy=with_entropy)
    B = hi - lo
    logp, ent = (out[0].view(B, T), out[1].view(B, T)) if with_entropy else (out.view(B, T), None)
    return logp, ent, ro.loss_mask[lo:hi, :T].to(device)


def old_logprobs(model, ro: Rollout, cfg: UpdateConfig, pad_id: int, device: torch.device) -> torch.Tensor:
    """[R, T] log-probs of the policy that sampled, for a rollout that feeds several optimizer steps."""
    if cfg.old_logp == "sampler":
        return ro.sampler_logp
    old = torch.zeros_like(ro.sampler_logp)
    with torch.no_grad():
        for lo, hi in micro_batches(0, len(ro.prompt_ids), cfg.micro_batch_size):
            lp, _, _ = forward_logp(model, ro, lo, hi, cfg, pad_id, device)
            old[lo:hi, :lp.shape[1]] = lp.float().cpu()
    return old


def empty_totals() -> dict:
    """The sums `update` returns, before any micro-batch (also what a step without an actor update reports)."""
    return dict(tokens=0.0, clip=0.0, approx_kl=0.0, entropy=0.0, kl=0.0, grad_norm=0.0, opt_steps=0.0,
                loss=0.0, mismatch=0.0, mismatch_tokens=0.0, update_time=0.0)


def update(model, ref, optimizer, scheduler, ro: Rollout, cfg: UpdateConfig, pad_id: int, d: Dist) -> dict:
    """Every optimizer step of one rollout. `model` is the (DDP/FSDP-wrapped) Policy, `ref` the frozen
    reference Policy for the KL term (None without one). ro.advantages is [R] (GRPO: one per completion) or
    [R, T] (PPO: one per token). Returns sums for report.step_metrics."""
    policy = unwrap(model)
    policy.model.gradient_checkpointing = cfg.grad_checkpointing
    policy.train()
    on_policy = cfg.mini_batches == 1 and cfg.epochs == 1
    old_logp = None if on_policy else old_logprobs(model, ro, cfg, pad_id, d.device)
    totals = empty_totals()
    t0 = time.perf_counter()

    def micro(lo: int, hi: int, counts: tuple, first: bool) -> None:
        micro_step(model, ref, ro, lo, hi, old_logp, counts, cfg, pad_id, d, totals, check_sampler=first)
    train_passes(model, optimizer, scheduler, ro.loss_mask, cfg, d, micro, totals)
    totals["update_time"] = time.perf_counter() - t0
    return totals


def train_passes(model, optimizer, scheduler, loss_mask: torch.Tensor, cfg: UpdateConfig, d: Dist, micro,
                 totals: dict, prefix: str = "") -> None:
    """cfg.epochs passes over cfg.mini_batches mini-batches of the rollout's rows, one optimizer step each.
    micro(lo, hi, (n_tok, n_seq), first) runs forward and backward of rows lo:hi, given the token and
    sequence counts of the whole mini-batch on all ranks; first is True in the first mini-batch of the first
    epoch. Adds {prefix}grad_norm and {prefix}opt_steps to totals."""
    rows_per_mini = loss_mask.shape[0] // cfg.mini_batches
    # The optimizer's own list, not model.parameters(): after a no-grad pass (old log-probs, values) an FSDP2
    # root stays unsharded and lists its unsharded tensors, whose gradients never arrive, so the norm
    # would miss them.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(cfg.epochs):
        for m in range(cfg.mini_batches):
            lo, hi = m * rows_per_mini, (m + 1) * rows_per_mini
            n_tok, n_seq = all_sum(d, list(grpo.step_counts(loss_mask[lo:hi])))
            if n_tok == 0:  # nothing to learn from on any rank: skip the optimizer step everywhere
                continue
            chunks = micro_batches(lo, hi, cfg.micro_batch_size)
            for i, (a, b) in enumerate(chunks):
                with grad_sync(model, i == len(chunks) - 1, cfg.fsdp):
                    micro(a, b, (n_tok, n_seq), epoch == 0 and m == 0)
            optimizer_step(params, optimizer, scheduler, cfg.grad_clip, totals, prefix)


def micro_step(model, ref, ro: Rollout, lo: int, hi: int, old_logp: torch.Tensor | None, counts: tuple,
               cfg: UpdateConfig, pad_id: int, d: Dist, totals: dict, check_sampler: bool) -> None:
    """Forward and backward of rollout rows lo:hi; adds this micro-batch's numbers to totals."""
    logp, ent, mask = forward_logp(model, ro, lo, hi, cfg, pad_id, d.device, with_entropy=True)
    T = logp.shape[1]
    old = logp.detach() if old_logp is None else old_logp[lo:hi, :T].to(d.device)
    adv = ro.advantages[lo:hi] if ro.advantages.dim() == 1 else ro.advantages[lo:hi, :T]
    loss_tok, st = grpo.policy_loss(logp, old, adv.to(d.device), mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    if ref is not None:
        with torch.no_grad():
            ref_logp, _, _ = forward_logp(ref, ro, lo, hi, cfg, pad_id, d.device)
        kl_tok = grpo.kl_penalty(logp, ref_logp, cfg.kl_estimator)
        loss_tok = loss_tok + cfg.kl_coef * kl_tok
        totals["kl"] += float((kl_tok.detach() * mask).sum())
    n_tok, n_seq = counts
    loss = grpo.reduce_loss(loss_tok, mask, cfg.loss_agg, global_token_count=n_tok,
                            max_len=cfg.max_new_tokens, global_seq_count=n_seq)
    # DDP and FSDP2 average gradients over ranks; the loss is already a share of the global sum, so scale
    # back up by the world size.
    (loss * d.world).backward()
    totals["loss"] += float(loss.detach())
    k = float(st["tokens"])
    totals["tokens"] += k
    totals["clip"] += float(st["clip_frac"]) * k
    totals["approx_kl"] += float(st["approx_kl"]) * k
    totals["entropy"] += float((ent.detach() * mask).sum())
    if check_sampler:  # weights still those that sampled: only float noise separates the two
        sampler = ro.sampler_logp[lo:hi, :T].to(d.device)
        totals["mismatch"] += float(((logp.detach() - sampler).abs() * mask).sum())
        totals["mismatch_tokens"] += k


def optimizer_step(params: list, optimizer, scheduler, grad_clip: float, totals: dict, prefix: str = "") -> None:
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    totals[prefix + "grad_norm"] += float(norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals[prefix + "opt_steps"] += 1
