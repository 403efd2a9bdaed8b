"""One rank's share of a GRPO step before the update: sample G completions per prompt, score them, and
turn the welfare rewards into group advantages (docs/grpo.md).

By default a judgement that failed (NaN welfare) is never scored as 0: its sample is left out of the loss,
and for the group statistics it takes the mean of its group's valid rewards (`advantages_with_failures`).
With --judge-failure zero the reward scores it as a verdict of 0 instead (upstream's convention).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nano_gtalign import grpo
from nano_gtalign.config import TrainConfig
from nano_gtalign.distributed import Dist, all_gather, generation_mode
from nano_gtalign.policy import autocast, compute_dtype
from nano_gtalign.report import RolloutStats
from nano_gtalign.reward import normalize_by_source
from nano_gtalign.sampling import Generation, SamplingParams, generate
from nano_gtalign.scoring import score_batch


@dataclass
class Rollout:
    """One rank's share of a step: R = prompts * G rows, prompt-major (row i*G + g is sample g of prompt i).
    Everything is on the CPU."""
    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor      # [R, T]
    attn_mask: torch.Tensor           # [R, T] the tokens generated (attention)
    loss_mask: torch.Tensor           # [R, T] the tokens trained on (drops failed / filtered rows)
    sampler_logp: torch.Tensor        # [R, T]
    rewards: torch.Tensor             # [R] the welfare W, NaN where the judge failed
    train_rewards: torch.Tensor       # [R] what the advantages are computed from: W, z-scored per data source
                                      #     over the step with --normalize-by-source (NaN where the judge failed)
    advantages: torch.Tensor          # [R] group advantages of train_rewards (GRPO's; PPO computes its own)
    scores: list                      # scoring.RewardBreakdown per row
    stats: RolloutStats


def concat_generations(gens: list[Generation], pad_id: int) -> Generation:
    """One Generation from several generate calls (rows in call order), padded to the longest."""
    if len(gens) == 1:
        return gens[0]
    T = max(g.completion_ids.shape[1] for g in gens)

    def pad(t, value):
        return F.pad(t, (0, T - t.shape[1]), value=value)
    return Generation(
        prompt_ids=[p for g in gens for p in g.prompt_ids],
        completion_ids=torch.cat([pad(g.completion_ids, pad_id) for g in gens]),
        completion_mask=torch.cat([pad(g.completion_mask, False) for g in gens]),
        logprobs=torch.cat([pad(g.logprobs, 0.0) for g in gens]),
        texts=[t for g in gens for t in g.texts], finish_reasons=[r for g in gens for r in g.finish_reasons])


def sample_groups(policy, tokenizer, prompts: list[list[int]], cfg: TrainConfig, generator: torch.Generator,
                  device: torch.device) -> Generation:
    """G completions for each prompt, --gen-batch-size prompts per generate call (bounds the KV cache)."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p)
    size = cfg.gen_batch_size or len(prompts)
    with generation_mode(policy, cfg.fsdp), autocast(device, compute_dtype(cfg.dtype, device)):
        gens = [generate(policy, tokenizer, prompts[s: s + size], params, num_samples=cfg.group_size,
                         generator=generator) for s in range(0, len(prompts), size)]
    return concat_generations(gens, tokenizer.pad_token_id)


def normalized_across_ranks(welfare: list[float], sources: list[str], d: Dist) -> list[float]:
    """--normalize-by-source: z-scores per data source over the whole step (all ranks), this rank's share."""
    everything = all_gather(d, (welfare, sources))
    all_w = [w for part in everything for w in part[0]]
    all_s = [s for part in everything for s in part[1]]
    start = sum(len(part[0]) for part in everything[:d.rank])
    return normalize_by_source(all_w, all_s)[start: start + len(welfare)]


def advantages_with_failures(rewards: torch.Tensor, group_size: int, eps: float, std_normalize: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group advantages of rewards [R] that may hold NaN (failed judgements); also returns the rewards with
    each NaN replaced by its group's mean valid reward.

    The fill leaves the group mean unchanged (the std, over G values, shrinks by a factor
    sqrt((G_valid - 1) / (G - 1))); a group with no valid reward gets advantage 0 everywhere.
    """
    groups = rewards.view(-1, group_size)
    ok = ~torch.isnan(groups)
    fill = torch.where(ok, groups, 0.0).sum(1) / ok.sum(1).clamp(min=1)
    filled = torch.where(ok, groups, fill[:, None]).view(-1)
    return grpo.group_advantages(filled, group_size, eps=eps, std_normalize=std_normalize), filled


def rollout(policy, tokenizer, records: list[dict], prompts: list[list[int]], cfg: TrainConfig, judge,
            generator: torch.Generator, d: Dist) -> Rollout:
    """Sample, score and compute advantages for this rank's prompts (records[i] goes with prompts[i])."""
    G = cfg.group_size
    t0 = time.perf_counter()
    gen = sample_groups(policy, tokenizer, prompts, cfg, generator, d.device)
    t1 = time.perf_counter()
    rows = [r for r in records for _ in range(G)]
    scores = score_batch(gen.texts, rows, judge, welfare=cfg.welfare, llm_reward=cfg.llm_reward, bleu=cfg.bleu,
                         judge_failure=cfg.judge.settings.failure)
    t2 = time.perf_counter()

    welfare = [s.welfare for s in scores]  # NaN where the judge failed
    train_welfare = welfare
    if cfg.normalize_by_source:
        train_welfare = normalized_across_ranks(welfare, [r["data_source"] for r in rows], d)
    # On the training device, so that on CUDA the group statistics run in the Triton kernel
    # (nano_gtalign/kernels/advantage.py).
    rewards = torch.tensor(train_welfare, dtype=torch.float32, device=d.device)
    failed = torch.isnan(rewards)
    adv, filled = advantages_with_failures(rewards, G, cfg.adv_eps, cfg.adv_std)
    zero_spread = grpo.zero_spread_groups(filled, G, tol=1e-6)
    keep = ~failed & ~zero_spread if cfg.drop_zero_spread else ~failed
    adv, failed, zero_spread, keep = adv.cpu(), failed.cpu(), zero_spread.cpu(), keep.cpu()  # the Rollout is on the CPU
    attn_mask = gen.completion_mask.cpu()
    loss_mask = attn_mask & keep[:, None]
    if cfg.mask_truncated:
        loss_mask = grpo.mask_truncated(loss_mask, gen.finish_reasons)
    stats = rollout_stats(scores, gen.finish_reasons, attn_mask, loss_mask, zero_spread, G)
    stats.gen_time, stats.score_time = t1 - t0, t2 - t1
    return Rollout(gen.prompt_ids, gen.completion_ids.cpu(), attn_mask, loss_mask, gen.logprobs.cpu(),
                   torch.tensor(welfare, dtype=torch.float32), rewards.cpu(), adv, scores, stats)


def rollout_stats(scores: list, finish_reasons: list[str], attn_mask: torch.Tensor, loss_mask: torch.Tensor,
                  zero_spread: torch.Tensor, group_size: int) -> RolloutStats:
    """Sums and counts (combined over ranks later); means are taken over the scored rows only."""
    scored = [s for s in scores if not math.isnan(s.welfare)]  # with --judge-failure zero a failure is scored
    strategies = [s.strategy for s in scores]
    return RolloutStats(
        completion_tokens=int(attn_mask.sum()), rows=len(scores),
        W=sum(s.welfare for s in scored), U=sum(s.user for s in scored), L=sum(s.llm for s in scored),
        scored=len(scored), format=sum(s.format for s in scores),
        answer=sum(s.answer_llm for s in scored),
        DA=strategies.count("DA"), CQ=strategies.count("CQ"), AQ=strategies.count("AQ"),
        truncated=finish_reasons.count("length"), judge_failed=sum(s.judge_failed for s in scores),
        zero_spread_groups=int(zero_spread.view(-1, group_size)[:, 0].sum()), groups=len(scores) // group_size,
        train_rows=int(loss_mask.any(1).sum()),
    )
