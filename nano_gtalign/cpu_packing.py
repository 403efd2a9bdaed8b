"""CPU decoding speed: run a model's linear layers on weights packed once into oneDNN's layout.

Its one job is `packed_linears`, the context the sampler decodes in. Why it exists: at decoding's
few rows per step a CPU step is bound by reading the weights, and F.linear's MKL path reads them
3-4x slower than oneDNN does from its blocked layout (`torch.ops.mkldnn._linear_pointwise`, what
inductor's CPU freezing uses); `generate` decodes about 2x faster end to end
(bench/sample_speed.py, bench/RESULTS.md).

When it applies (`onednn_packing_applies`): plain fp32 weights on a CPU (bf16 only where the CPU
has native bf16 dot products), outside autocast, not FSDP2 shards, and a torch built with oneDNN.
The fallback, everywhere else or with pack=False: the model is left untouched and the head is a
plain F.linear, so GPUs, autocast and training never see a packed weight.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from nano_gtalign.kernels.logprob import autocast_dtype

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden states [..., H] -> logits [..., V]


def onednn_packing_applies(model: nn.Module) -> bool:
    """Whether `packed_linears` can pack this model: plain fp32 CPU weights (bf16 on CPUs with native bf16),
    no autocast, and a torch built with oneDNN."""
    w = model.output_weight()
    ops = torch.ops.mkldnn
    # bf16 only where the CPU has native bf16 dot products (elsewhere oneDNN emulates them slowly).
    native_bf16 = hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported()
    # Under CPU autocast F.linear would compute in the autocast dtype; the packed op would not.
    return (w.device.type == "cpu" and autocast_dtype("cpu") is None
            and (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and native_bf16))
            and type(w.data) is torch.Tensor  # not an FSDP2 DTensor shard
            and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


@contextmanager
def packed_linears(model: nn.Module, pack: bool) -> Iterator[Head]:
    """Inference only (no autograd): yields head(hidden) -> logits, and with pack=True runs every linear layer
    and the head through oneDNN with its weight reordered once into oneDNN's blocked layout. `model` is a
    Transformer or a wrapper that exposes output_weight() (the trainer's policy).

    Same weights and dtype; results differ from F.linear only by summation order (~1e-6 in fp32). Packing
    takes ~50 ms per 55M parameters and is redone on every entry, so weights changed by training in between
    are always picked up. The model is restored on exit.
    """
    if not pack:
        yield lambda h: F.linear(h, model.output_weight())
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        # An instance attribute shadows nn.Linear.forward; deleting it on exit restores the class method.
        m.forward = _packed_linear(m.weight, m.bias)
    head_weight = model.output_weight()
    untied_head = [m for m in linears if m.weight is head_weight and m.bias is None]
    try:
        yield untied_head[0].forward if untied_head else _packed_linear(head_weight, None)
    finally:
        for m in linears:
            del m.forward


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Head:
    """x -> x·weightᵀ + bias through oneDNN, with the weight reordered into its packed layout now."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    bias = None if bias is None else bias.detach()
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
