"""Where tokens sit in a batch row: [left-padded prompt | completion | right padding].

Every row of a batch is padded on the left to the same prompt width P, so completion token j of
every row sits at column P + j and is predicted by the hidden state at column P + j - 1. The
sampler lays rows out this way (`left_pad`), the trainer rebuilds the same rows for the loss
(`pack_rows`), and the log-prob head reads the hidden states back at those columns
(`completion_hidden`). Nothing else in the project computes these columns.
"""
from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, P] and attention mask [B, P] (1 on real tokens, long) of prompts padded on the
    left to the longest length P, so that every prompt's last token is at column P - 1."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def pack_rows(prompt_ids: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Rows [left-padded prompt | completion | right padding] as the sampler laid them out.

    completion_ids and completion_mask are [B, T_max]; columns that no row used are dropped, so T is
    the longest completion in this batch. Returns input_ids [B, P + T], attention_mask [B, P + T]
    (long), P and T; padding inside the completion part holds pad_id and mask 0.
    """
    ids, mask = left_pad(prompt_ids, pad_id)
    P = ids.shape[1]
    completion_mask = completion_mask.cpu()
    used = completion_mask.any(0).nonzero()
    T = int(used.max()) + 1 if len(used) else 1
    completion = torch.where(completion_mask[:, :T], completion_ids.cpu()[:, :T], pad_id)
    ids = torch.cat([ids, completion], dim=1)
    mask = torch.cat([mask, completion_mask[:, :T].long()], dim=1)
    return ids, mask, P, T


def completion_hidden(hidden: torch.Tensor, prompt_len: int, completion_len: int) -> torch.Tensor:
    """The hidden states [B, T, H] that predict completion tokens 0..T-1 of rows laid out by `pack_rows`:
    token j at column P + j is predicted by the state at column P + j - 1."""
    return hidden[:, prompt_len - 1: prompt_len - 1 + completion_len]
