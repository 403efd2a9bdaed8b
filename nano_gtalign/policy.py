"""The policy being trained: the transformer and its token log-prob head behind ONE forward.

DDP and FSDP2 only synchronise what runs inside a wrapped module's forward (FSDP2 also gathers the head
weight there), so the log-probs of completion tokens are computed inside `Policy.forward` rather than in
the training loop. Called without `targets` the forward is the transformer's own, which is what the
sampler calls. Log-probs come from the final hidden states through the fused kernel (docs/logprobs.md),
never materialising [tokens, vocab] logits, unless the `naive` backend is asked for as a comparison.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from nano_gtalign.kernels.logprob import fused_logprobs
from nano_gtalign.layout import completion_hidden

LOGPROB_BACKENDS = ("auto", "triton", "torch", "naive")


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                   backend: str, with_entropy: bool):
    """log softmax(W h / tau)[y] (and the entropy of that softmax) for flat [N, H] hidden states."""
    if backend == "naive":  # the textbook reference: holds [N, V] fp32 logits (bench/train_step.py compares)
        logp_all = (hidden @ weight.T).float().div(temperature).log_softmax(-1)
        logp = logp_all.gather(-1, targets[:, None])[:, 0]
        return (logp, -(logp_all.exp() * logp_all).sum(-1)) if with_entropy else logp
    return fused_logprobs(hidden, weight, targets, temperature, return_entropy=with_entropy, backend=backend)


class Policy(nn.Module):
    """A Transformer whose forward, given `targets`, returns the completion tokens' log-probs."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype, backend: str):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype
        self.backend = backend

    @property
    def config(self):
        return self.model.config

    def output_weight(self) -> torch.Tensor:
        return self.model.output_weight()

    def forward(self, input_ids, *, targets=None, prompt_len: int = 0, temperature: float = 1.0,
                with_entropy: bool = False, **kwargs):
        """targets [B, T]: the completion tokens of rows laid out by layout.pack_rows with prompt width
        prompt_len. Returns flat [B*T] log-probs (and entropies): FSDP2 cannot hook views returned from a
        forward."""
        if targets is None:
            return self.model(input_ids, **kwargs)
        hidden = self.model(input_ids, return_hidden=True, **kwargs)
        h = completion_hidden(hidden, prompt_len, targets.shape[1]).reshape(-1, hidden.shape[-1])
        # One dtype for the kernel: the autocast dtype (fp32 weights are cast per call, a V x H copy).
        h, w = h.to(self.compute_dtype), self.model.output_weight().to(self.compute_dtype)
        return token_logprobs(h, w, targets.reshape(-1), temperature, self.backend, with_entropy)


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype auto | float32 | bfloat16 -> the autocast dtype (auto: bf16 on CUDA, fp32 elsewhere)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward passes: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
