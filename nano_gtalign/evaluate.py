"""Held-out evaluation: generate completions for records, score them, and summarise (docs/metrics.md).

eval.py and train.py share these steps: `generate_completions` (this rank's share of the prompts, in
batches), `score_completions` (reward breakdown + metrics row per completion) and, for train.py's
periodic evaluation, `evaluate_policy`, which adds the correct-action rates the before/after table shows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from nano_gtalign.distributed import Dist, gather_lists, generation_mode
from nano_gtalign.metrics import group_metrics, sample_row
from nano_gtalign.policy import autocast
from nano_gtalign.reward import score_batch
from nano_gtalign.sampling import SamplingParams, generate

# The correct strategies per question type, for records that say their type (arith_demo): a clear (DQ)
# question is served by answering (DA, AQ), a vague (VQ) one by a clarifying question (CQ).
GOOD_ACTIONS = {"DQ": ("DA", "AQ"), "VQ": ("CQ",)}


@dataclass(order=True)
class Completion:
    index: int                 # the record's index in the evaluated list
    sample: int                # which of the record's num_samples completions
    text: str
    finish_reason: str         # eos | stop | length
    generated_tokens: int      # tokens the sampler produced, EOS included


def generate_completions(model, tokenizer, prompts: dict[int, list[int]], order: list[int], params: SamplingParams,
                         *, batch_size: int, num_samples: int = 1, generator: torch.Generator | None = None,
                         log: Callable[[str], None] | None = None) -> list[Completion]:
    """num_samples completions of prompts[i] for every i in `order`, batch_size prompts per generate call."""
    out = []
    t0 = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = order[b: b + batch_size]
        gen = generate(model, tokenizer, [prompts[i] for i in batch], params, num_samples=num_samples,
                       generator=generator)
        n_tokens = gen.completion_mask.sum(dim=1).tolist()
        for r, text in enumerate(gen.texts):
            out.append(Completion(batch[r // num_samples], r % num_samples, text, gen.finish_reasons[r],
                                  int(n_tokens[r])))
        if log:
            log(f"generated {min(b + batch_size, len(order))}/{len(order)} prompts ({time.perf_counter() - t0:.1f}s)")
    return out


def score_completions(pairs: list[tuple[dict, str]], judge, *, welfare: str, llm_reward: str, bleu: str,
                      generated_tokens: list[int | None] | None = None,
                      count_tokens: Callable[[str], int] | None = None, chunk: int = 256,
                      log: Callable[[str], None] | None = None) -> tuple[list[dict], list]:
    """Metrics rows (metrics.sample_row) and reward breakdowns of (record, completion) pairs, `chunk` at a
    time (bounds memory, shows progress). Raises ValueError for a record the reward cannot use."""
    generated_tokens = generated_tokens or [None] * len(pairs)
    rows, breakdowns = [], []
    for c in range(0, len(pairs), chunk):
        part = pairs[c: c + chunk]
        scores = score_batch([p[1] for p in part], [p[0] for p in part], judge, welfare=welfare,
                             llm_reward=llm_reward, bleu=bleu)
        for (record, text), n, b in zip(part, generated_tokens[c: c + chunk], scores):
            rows.append(sample_row(b, text, record, count_tokens, n))
            breakdowns.append(b)
        if log:
            log(f"scored {min(c + chunk, len(pairs))}/{len(pairs)} completions")
    return rows, breakdowns


@dataclass
class EvalConfig:
    max_new_tokens: int
    temperature: float = 0.0       # 0: greedy
    samples: int = 1               # completions per prompt (with sampling)
    batch_size: int = 32           # prompts per generate call
    seed: int = 0
    welfare: str = "cobb_douglas"
    llm_reward: str = "main"
    bleu: str = "char"
    fsdp: bool = False
    compute_dtype: torch.dtype = torch.float32


def evaluate_policy(policy, tokenizer, records: list[dict], prompts: list[list[int]], cfg: EvalConfig, judge,
                    d: Dist) -> dict:
    """train.py's held-out evaluation: the metrics of docs/metrics.md over every rank's share, plus the
    correct-action rates per question type where records say their type.

    Sampled evaluation uses a generator seeded the same way at every evaluation, so two evaluations of
    the same policy draw the same tokens and a before/after difference is the policy's, not the dice's.
    """
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + 500 + d.rank)
    mine = list(range(d.rank, len(records), d.world))
    with generation_mode(policy, cfg.fsdp), autocast(d.device, cfg.compute_dtype):
        done = generate_completions(policy, tokenizer, dict(enumerate(prompts)), mine, params,
                                    batch_size=cfg.batch_size, num_samples=cfg.samples, generator=generator)
    rows, _ = score_completions([(records[c.index], c.text) for c in done], judge, welfare=cfg.welfare,
                                llm_reward=cfg.llm_reward, bleu=cfg.bleu,
                                generated_tokens=[c.generated_tokens for c in done])
    for row, c in zip(rows, done):
        row["true_type"] = (records[c.index].get("extra_info") or {}).get("question_type")
    return summarize(gather_lists(d, rows))


def summarize(rows: list[dict]) -> dict:
    """The before/after table's numbers (report.EVAL_COLUMNS) of scored rows carrying `true_type`."""
    m = group_metrics(rows)
    out = {k: m[k] for k in ("n", "welfare", "user", "llm", "answer_llm", "format_rate", "reasoning_chars",
                             "judge_failure_rate")}
    out["completion_tokens"] = sum(r["generated_tokens"] for r in rows) / max(len(rows), 1)
    for qtype, good in GOOD_ACTIONS.items():
        typed = [r for r in rows if r["true_type"] == qtype]
        out[f"action_ok_{qtype}"] = sum(r["strategy"] in good for r in typed) / len(typed) if typed else None
        scored = [r for r in typed if not r["judge_failed"]]
        out[f"answer_{qtype}"] = sum(r["answer_llm"] for r in scored) / len(scored) if scored else None
    return out
