"""The demo's supervised warm-start: teach a freshly initialised tiny model the four-block format.

Next-token cross-entropy on the completion tokens only (the prompt is context, not a target), AdamW with a
short linear warm-up, batches padded on the right to their own longest example. train.py calls
`warm_start` before GRPO; the transcripts are imperfect on purpose (data/demo/transcripts.py), so the
warm-started policy does many things and GRPO has something to improve.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nano_gtalign.model import Transformer
from nano_gtalign.tokenizer import Tokenizer


@dataclass
class SFTStats:
    steps: int
    seconds: float
    examples: int
    completion_tokens: int          # target tokens seen over all steps
    first_loss: float
    final_loss: float               # mean over the last 10 steps
    losses: list[float] = field(default_factory=list)


def encode_examples(tokenizer: Tokenizer, records: list[dict], completions: list[str],
                    max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per example. The two are encoded separately, exactly as GRPO sees
    them: the sampler continues from the prompt ids, so a merge across the boundary must never be learned."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    if not records:
        raise ValueError("warm-start needs at least one example")
    eos = tokenizer.eos_token_ids[0]
    out = []
    for i, (r, c) in enumerate(zip(records, completions)):
        prompt = tokenizer.encode_chat(r["prompt"], add_generation_prompt=True)
        target = tokenizer.encode(c) + [eos]
        if max_len is not None and len(prompt) + len(target) > max_len:
            raise ValueError(f"example {i} has {len(prompt) + len(target)} tokens, more than max_len={max_len}")
        out.append((prompt, target))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [B, L] right-padded to the longest example, and labels [B, L] (the next token, -100 where
    there is nothing to learn: prompt positions and padding)."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        seq = p + c
        ids[i, :len(seq)] = torch.tensor(seq)
        # position t predicts token t+1: the targets are the completion tokens, predicted from len(p)-1 on
        labels[i, len(p) - 1:len(seq) - 1] = torch.tensor(c)
    return ids, labels


def warm_start(model: Transformer, tokenizer: Tokenizer, records: list[dict], completions: list[str], *,
               steps: int = 300, lr: float = 3e-3, batch_size: int = 16, seed: int = 0,
               weight_decay: float = 0.0, warmup_steps: int = 20, max_grad_norm: float = 1.0,
               log_every: int = 25) -> SFTStats:
    """Train model in place on (record prompt, completion) pairs for `steps` AdamW steps.

    Batches are drawn at random (with a generator seeded by seed) without replacement within an epoch.
    Right padding needs no attention mask: causal attention never lets a real token see the padding after it.
    The learning rate rises linearly over warmup_steps, then stays constant. Every parameter's .grad is None
    on return.
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0; got steps={steps}, batch_size={batch_size}, lr={lr}")
    examples = encode_examples(tokenizer, records, completions, max_len=model.config.max_position_embeddings)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    model.train()
    order: list[int] = []
    losses: list[float] = []
    n_tokens = 0
    t0 = time.time()
    for step in range(steps):
        if len(order) < batch_size:  # new epoch
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        ids, labels = collate(batch, tokenizer.pad_token_id)
        ids, labels = ids.to(device), labels.to(device)
        logits = model(ids)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        n_tokens += int((labels != -100).sum())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"warm-start loss became {losses[-1]} at step {step}; lower the learning rate")
        if log_every and (step % log_every == 0 or step == steps - 1):
            el = time.time() - t0
            print(f"sft step {step + 1:4d}/{steps} | loss {losses[-1]:.3f} | lr {sched.get_last_lr()[0]:.2e} "
                  f"| {n_tokens / max(el, 1e-9):,.0f} tok/s | {el:.0f}s", flush=True)
    # The last step's (clipped) gradient would otherwise stay on the parameters and be added to GRPO's first
    # optimizer step; the caller gets a model with no gradient at all, as if freshly loaded.
    opt.zero_grad(set_to_none=True)
    model.eval()
    return SFTStats(steps=steps, seconds=time.time() - t0, examples=len(examples), completion_tokens=n_tokens,
                    first_loss=losses[0], final_loss=sum(losses[-10:]) / len(losses[-10:]), losses=losses)
