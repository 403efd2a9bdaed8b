"""The policy update of one step: epochs -> mini-batches (one optimizer step each) -> micro-batches.

GRPO calls `update` with each completion's group advantage on all its tokens; PPO (ppo.py) with GAE's per
token, and runs its critic over the same `mini_batches` and `micro_batches`.

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
import torch

from nano_gtalign import grpo
from nano_gtalign.config import TrainConfig
from nano_gtalign.distributed import Dist, all_sum, grad_sync, unwrap
from nano_gtalign.layout import pack_rows
from nano_gtalign.policy import autocast, compute_dtype
from nano_gtalign.report import UpdateStats
from nano_gtalign.rollout import Rollout


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


def mini_batches(loss_mask: torch.Tensor, cfg: TrainConfig, d: Dist):
    """(epoch, lo, hi, n_tok, n_seq) for each optimizer step: cfg.epochs passes over cfg.mini_batches
    slices lo:hi of the rollout's rows, with the slice's loss tokens and sequences summed over every rank
    (the loss of each micro-batch is its share of those). A slice with no loss token on any rank is skipped
    everywhere, optimizer step included."""
    rows_per_mini = loss_mask.shape[0] // cfg.mini_batches
    for epoch in range(cfg.epochs):
        for m in range(cfg.mini_batches):
            lo, hi = m * rows_per_mini, (m + 1) * rows_per_mini
            n_tok, n_seq = all_sum(d, list(grpo.step_counts(loss_mask[lo:hi])))
            if n_tok > 0:
                yield epoch, lo, hi, n_tok, n_seq


def forward_logp(model, ro: Rollout, lo: int, hi: int, cfg: TrainConfig, pad_id: int, device: torch.device,
                 with_entropy: bool = False):
    """[rows, T] log-probs (and entropies, else None) of rollout rows lo:hi, and their loss mask."""
    ids, mask, P, T = pack_rows(ro.prompt_ids[lo:hi], ro.completion_ids[lo:hi], ro.attn_mask[lo:hi], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    with autocast(device, compute_dtype(cfg.dtype, device)):
        out = model(ids, attention_mask=mask, targets=ids[:, P:], prompt_len=P, temperature=cfg.temperature,
                    with_entropy=with_entropy)
    B = hi - lo
    logp, ent = (out[0].view(B, T), out[1].view(B, T)) if with_entropy else (out.view(B, T), None)
    return logp, ent, ro.loss_mask[lo:hi, :T].to(device)


def old_logprobs(model, ro: Rollout, cfg: TrainConfig, pad_id: int, device: torch.device) -> torch.Tensor:
    """[R, T] log-probs of the policy that sampled, for a rollout that feeds several optimizer steps."""
    if cfg.old_logp == "sampler":
        return ro.sampler_logp
    old = torch.zeros_like(ro.sampler_logp)
    with torch.no_grad():
        for lo, hi in micro_batches(0, len(ro.prompt_ids), cfg.micro_batch_size):
            lp, _, _ = forward_logp(model, ro, lo, hi, cfg, pad_id, device)
            old[lo:hi, :lp.shape[1]] = lp.float().cpu()
    return old


def update(model, ref, optimizer, scheduler, ro: Rollout, advantages: torch.Tensor, cfg: TrainConfig, pad_id: int,
           d: Dist) -> UpdateStats:
    """Every optimizer step of one rollout. `model` is the (DDP/FSDP-wrapped) Policy, `ref` the frozen
    reference Policy for the KL term (None without one); advantages [R, T] (GRPO: each completion's group
    advantage on all its tokens; PPO: GAE's)."""
    policy = unwrap(model)
    policy.model.gradient_checkpointing = cfg.grad_checkpointing
    policy.train()
    on_policy = cfg.mini_batches == 1 and cfg.epochs == 1
    old_logp = None if on_policy else old_logprobs(model, ro, cfg, pad_id, d.device)
    params = optimizer_params(optimizer)
    stats = UpdateStats()
    t0 = time.perf_counter()
    for epoch, lo, hi, n_tok, n_seq in mini_batches(ro.loss_mask, cfg, d):
        for a, b in micro_batches(lo, hi, cfg.micro_batch_size):
            with grad_sync(model, b == hi, cfg.fsdp):
                logp, ent, mask = forward_logp(model, ro, a, b, cfg, pad_id, d.device, with_entropy=True)
                T = logp.shape[1]
                old = logp.detach() if old_logp is None else old_logp[a:b, :T].to(d.device)
                loss_tok, st = grpo.policy_loss(logp, old, advantages[a:b, :T].to(d.device), mask, cfg.clip_low,
                                                cfg.clip_high, cfg.dual_clip or None)
                if ref is not None:
                    with torch.no_grad():
                        ref_logp, _, _ = forward_logp(ref, ro, a, b, cfg, pad_id, d.device)
                    kl_tok = grpo.kl_penalty(logp, ref_logp, cfg.kl_estimator)
                    loss_tok = loss_tok + cfg.kl_coef * kl_tok
                    stats.kl += float((kl_tok.detach() * mask).sum())
                loss = grpo.reduce_loss(loss_tok, mask, cfg.loss_agg, global_token_count=n_tok,
                                        max_len=cfg.max_new_tokens, global_seq_count=n_seq)
                # DDP and FSDP2 average gradients over ranks; the loss is already a share of the global sum,
                # so scale back up by the world size.
                (loss * d.world).backward()
            stats.loss += float(loss.detach())
            k = float(st["tokens"])
            stats.tokens += k
            stats.clip += float(st["clip_frac"]) * k
            stats.approx_kl += float(st["approx_kl"]) * k
            stats.entropy += float((ent.detach() * mask).sum())
            if epoch == 0 and lo == 0:  # weights still those that sampled: only float noise separates the two
                sampler = ro.sampler_logp[a:b, :T].to(d.device)
                stats.mismatch += float(((logp.detach() - sampler).abs() * mask).sum())
                stats.mismatch_tokens += k
        norm = optimizer_step(params, optimizer, scheduler, cfg.grad_clip)
        stats.grad_norm += norm
        stats.opt_steps += 1
        if not math.isfinite(norm):  # not applied; train.py stops the run with the weights as they were
            stats.nonfinite = True
            break
    stats.update_time = time.perf_counter() - t0
    return stats


def optimizer_params(optimizer) -> list:
    """The optimizer's own parameter list, not model.parameters(): after a no-grad pass (old log-probs,
    values) an FSDP2 root stays unsharded and lists its unsharded tensors, whose gradients never arrive, so
    the norm would miss them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_step(params: list, optimizer, scheduler, grad_clip: float) -> float:
    """Clip the gradients (grad_clip 0: off), step the optimizer and the schedule; returns the norm before
    clipping. A NaN or inf norm (a non-finite loss or gradient) never reaches the weights: no step is taken."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    if math.isfinite(norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
