"""PPO with a learned value model, the algorithm of the GTAlign paper's own runs (`train.py --algo ppo`).

Upstream trains with one sample per prompt, a critic initialised from the policy, GAE with gamma = lambda = 1,
the critic at lr 2e-6 and the actor at 1e-6, no KL, on the same welfare reward as GRPO. One step:

    values     = critic(rollout)                       no grad, before any update (like the old log-probs)
    r_t        = W at the last completion token, 0 elsewhere                          (token_rewards)
    A, returns = GAE(r, values, gamma, lambda)                                          (gae_advantages)
    A          = (A - mean) / sqrt(var + 1e-8) over the step's valid tokens, all ranks  (whiten)
    critic     : clipped value loss against the returns                                 (value_loss)
    actor      : grpo.policy_loss with the per-token A (dual clip included), skipped for --critic-warmup steps

Both updates run the same epochs -> mini-batches -> micro-batches as GRPO (update.mini_batches and
micro_batches), with the same loss aggregation over the whole mini-batch's token counts. The rewards are
the rollout's (W, z-scored per data source with --normalize-by-source). Failed judgements are out of the loss mask,
so they are out of GAE, the whitening and both losses.

The critic is the policy's transformer with a scalar head: `Critic.forward` returns the value of the state
before each completion token, read from the hidden state that predicts that token (layout.completion_hidden),
inside the module's forward so that DDP and FSDP2 see it (see policy.py).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from nano_gtalign import grpo
from nano_gtalign.config import TrainConfig
from nano_gtalign.distributed import Dist, all_sum, grad_sync, unwrap
from nano_gtalign.errors import UsageError
from nano_gtalign.layout import completion_hidden, pack_rows
from nano_gtalign.loader import load_pretrained
from nano_gtalign.model import Transformer
from nano_gtalign.policy import autocast, compute_dtype
from nano_gtalign.report import UpdateStats
from nano_gtalign.rollout import Rollout
from nano_gtalign.update import micro_batches, mini_batches, optimizer_params, optimizer_step, update

VALUE_HEAD_FILE = "value_head.safetensors"  # beside the critic's transformer in OUT_DIR/final_critic


class Critic(nn.Module):
    """A transformer with a scalar head: one value per completion token (the state before that token)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        if hasattr(model, "lm_head"):  # kept so the critic exports as a plain checkpoint; never used, so frozen
            model.lm_head.requires_grad_(False)
        self.head = nn.Linear(model.config.hidden_size, 1)
        # Zeros: the first values are 0 (the first advantages are then the whitened rewards), not a random
        # head's noise.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, *, prompt_len: int, completion_len: int, **kwargs) -> torch.Tensor:
        """Flat [B*T] fp32 values of rows laid out by layout.pack_rows."""
        hidden = self.model(input_ids, return_hidden=True, **kwargs)
        h = completion_hidden(hidden, prompt_len, completion_len)
        with torch.autocast(device_type=h.device.type, enabled=False):  # values in fp32 whatever the autocast
            # A new tensor, not a view of the head's output: FSDP2's pre-backward hook can be lost on a view.
            return self.head(h.float()).reshape(-1).clone()


def make_critic(policy_model: Transformer, critic_dir: str | None, device: torch.device) -> Critic:
    """The critic before wrapping: a copy of the initial policy, or --critic-model DIR (a Hugging Face
    directory; its value_head.safetensors when it is a critic this script saved, else a zero head)."""
    if critic_dir is None:
        return Critic(copy.deepcopy(policy_model)).to(device)
    critic = Critic(load_pretrained(critic_dir, dtype=torch.float32, device=device))
    if critic.model.config.vocab_size < policy_model.config.vocab_size:
        raise UsageError(f"--critic-model {critic_dir}: vocabulary of {critic.model.config.vocab_size} tokens, "
                         f"smaller than the policy's {policy_model.config.vocab_size}")
    head = Path(critic_dir) / VALUE_HEAD_FILE
    if head.is_file():
        from safetensors.torch import load_file
        critic.head.load_state_dict({k.removeprefix("head."): v for k, v in load_file(str(head)).items()})
    return critic.to(device)


@dataclass
class CriticTrainer:
    module: nn.Module                  # the Critic (DDP/FSDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


# -----------------------------------------------------------------------------
# Rewards, GAE, whitening, the value loss: plain tensor functions


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[R, T] with rewards[i] at row i's last valid token and 0 elsewhere (a row with no valid token: 0)."""
    m = mask.bool()
    has = m.any(1)
    if torch.isnan(rewards[has]).any():
        raise ValueError("a row with valid tokens has a NaN reward (failed judgements must be out of the mask)")
    last = m.shape[1] - 1 - m.flip(1).int().argmax(1)
    out = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    rows = has.nonzero()[:, 0]
    out[rows, last[rows]] = rewards[rows].float()
    return out


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation on [B, T] tensors; returns (advantages, returns), 0 off the mask.

        delta_t = r_t + gamma * V_{t+1} - V_t            V past the last valid token counts as 0
        A_t     = delta_t + gamma * lam * A_{t+1}        returns_t = A_t + V_t

    t runs over the valid tokens only (masked columns are skipped, never read). With gamma = lam = 1 and the
    reward on the last token, A_t = R - V_t. Not whitened: that is `whiten`, a separate step.
    """
    m = mask.bool()
    r, v = token_rewards.float(), values.float()
    zero = torch.zeros(v.shape[0], dtype=torch.float32, device=v.device)
    next_value, next_adv = zero, zero
    adv = torch.zeros_like(v)
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        next_value = torch.where(m[:, t], v[:, t], next_value)
        next_adv = torch.where(m[:, t], a, next_adv)
        adv[:, t] = next_adv
    adv = torch.where(m, adv, 0.0)
    return adv, torch.where(m, adv + v, 0.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, d: Dist, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid tokens of every rank (unbiased var, as verl); 0 off the mask.
    The sums are fp64 and over ranks, so a run on several ranks whitens exactly as one process would."""
    m = mask.bool()
    vals = x[m].double()
    n, total = all_sum(d, [vals.numel(), float(vals.sum())])
    mean = total / max(n, 1)
    (sq,) = all_sum(d, [float(((vals - mean) ** 2).sum())])
    var = sq / max(n - 1, 1)
    return torch.where(m, (x.double() - mean) / (var + eps) ** 0.5, 0.0).to(x.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """Per-token clipped value loss [R, T] (0 off the mask) and {clip_frac, tokens}:

        V_clip = V_old + clamp(V - V_old, -clip, clip)
        l      = 0.5 * max((V - G)^2, (V_clip - G)^2)        G = the GAE returns; clip 0: 0.5 * (V - G)^2

    Where the clipped term is larger the loss is constant in V (no gradient): the value cannot move more
    than `clip` from the one the advantages were computed with, in the direction the loss pulls it.
    """
    m = mask.bool()
    v, old, ret = values.float(), old_values.float(), returns.float()
    unclipped = (v - ret) ** 2
    if clip > 0:
        clipped = (old + (v - old).clamp(-clip, clip) - ret) ** 2
        loss, active = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
    else:
        loss, active = 0.5 * unclipped, torch.zeros_like(m)
    n = m.sum()
    stats = {"clip_frac": (active & m).sum() / n.clamp(min=1), "tokens": n.float()}
    return torch.where(m, loss, 0.0), stats


# -----------------------------------------------------------------------------
# The step


def forward_values(critic, ro: Rollout, lo: int, hi: int, cfg: TrainConfig, pad_id: int, device: torch.device):
    """[rows, T] values of rollout rows lo:hi and their loss mask (the layout of update.forward_logp)."""
    ids, mask, P, T = pack_rows(ro.prompt_ids[lo:hi], ro.completion_ids[lo:hi], ro.attn_mask[lo:hi], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    with autocast(device, compute_dtype(cfg.dtype, device)):
        values = critic(ids, attention_mask=mask, prompt_len=P, completion_len=T)
    return values.view(hi - lo, T), ro.loss_mask[lo:hi, :T].to(device)


def rollout_values(critic, ro: Rollout, cfg: TrainConfig, pad_id: int, device: torch.device) -> torch.Tensor:
    """[R, T] values of the whole rollout under the critic before its update (no grad)."""
    out = torch.zeros(ro.loss_mask.shape, dtype=torch.float32)
    with torch.no_grad():
        for lo, hi in micro_batches(0, len(ro.prompt_ids), cfg.micro_batch_size):
            v, _ = forward_values(critic, ro, lo, hi, cfg, pad_id, device)
            out[lo:hi, :v.shape[1]] = v.float().cpu()
    return out


def value_stats(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> UpdateStats:
    """Sums over the valid tokens (combined over ranks later; report.step_metrics turns them into the mean
    value and the explained variance 1 - Var(G - V) / Var(G))."""
    m = mask.bool()
    v, g = values[m].double(), returns[m].double()
    e = g - v
    return UpdateStats(value_tokens=float(m.sum()), value_sum=float(v.sum()), return_sum=float(g.sum()),
                       return_sq=float((g * g).sum()), error_sum=float(e.sum()), error_sq=float((e * e).sum()))


def ppo_update(model, ref, optimizer, scheduler, critic: CriticTrainer, ro: Rollout, cfg: TrainConfig,
               step: int, pad_id: int, d: Dist) -> UpdateStats:
    """One PPO step after the rollout: values, GAE on the rollout's rewards, the critic's update, then the
    actor's (after the warm-up). `model` is the (wrapped) Policy, `ref` the frozen KL reference or None."""
    values = rollout_values(critic.module, ro, cfg, pad_id, d.device)
    rewards = token_rewards(ro.train_rewards, ro.loss_mask)
    adv, returns = gae_advantages(rewards, values, ro.loss_mask, cfg.gamma, cfg.lam)
    critic_stats = update_critic(critic, ro, values, returns, cfg, pad_id, d)
    if step <= cfg.critic_warmup:  # the actor waits until the values mean something
        stats = UpdateStats()
    else:
        stats = update(model, ref, optimizer, scheduler, ro, whiten(adv, ro.loss_mask, d), cfg, pad_id, d)
    step_values = value_stats(values, returns, ro.loss_mask)
    return replace(stats, nonfinite=stats.nonfinite or critic_stats.nonfinite,
                   **{name: getattr(step_values, name) for name in VALUE_FIELDS},
                   **{name: getattr(critic_stats, name) for name in CRITIC_FIELDS},
                   update_time=stats.update_time + critic_stats.update_time)  # one time for both models


VALUE_FIELDS = ("value_tokens", "value_sum", "return_sum", "return_sq", "error_sum", "error_sq")
CRITIC_FIELDS = ("value_loss", "value_clip", "value_trained_tokens", "critic_grad_norm", "critic_opt_steps")


def update_critic(critic: CriticTrainer, ro: Rollout, old_values: torch.Tensor, returns: torch.Tensor,
                  cfg: TrainConfig, pad_id: int, d: Dist) -> UpdateStats:
    """The critic's optimizer steps: the actor's epochs and mini-batches, the clipped value loss."""
    unwrap(critic.module).model.gradient_checkpointing = cfg.grad_checkpointing
    critic.module.train()
    params = optimizer_params(critic.optimizer)
    stats = UpdateStats()
    t0 = time.perf_counter()
    for _, lo, hi, n_tok, n_seq in mini_batches(ro.loss_mask, cfg, d):
        for a, b in micro_batches(lo, hi, cfg.micro_batch_size):
            with grad_sync(critic.module, b == hi, cfg.fsdp):
                values, mask = forward_values(critic.module, ro, a, b, cfg, pad_id, d.device)
                T = values.shape[1]
                loss_tok, st = value_loss(values, old_values[a:b, :T].to(d.device), returns[a:b, :T].to(d.device),
                                          mask, cfg.value_clip)
                loss = grpo.reduce_loss(loss_tok, mask, cfg.loss_agg, global_token_count=n_tok,
                                        max_len=cfg.max_new_tokens, global_seq_count=n_seq)
                (loss * d.world).backward()  # DDP/FSDP average over ranks; the loss is already a share of the sum
            stats.value_loss += float(loss.detach())
            stats.value_clip += float(st["clip_frac"]) * float(st["tokens"])
            stats.value_trained_tokens += float(st["tokens"])
        norm = optimizer_step(params, critic.optimizer, critic.scheduler, cfg.grad_clip)
        stats.critic_grad_norm += norm
        stats.critic_opt_steps += 1
        if not math.isfinite(norm):  # not applied; train.py stops the run with the weights as they were
            stats.nonfinite = True
            break
    stats.update_time = time.perf_counter() - t0
    return stats
