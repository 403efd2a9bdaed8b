"""Batched text generation with the static KV cache: the sampler GRPO and sample.py use.

One call of `generate` does:
  1. left-pad the (ragged) prompts and prefill each distinct prompt ONCE;
  2. expand the cache to `num_samples` rows per prompt (GRPO's group of G);
  3. decode one token per step for every row until each row has stopped on an
     EOS id, on a stop string, or at `max_new_tokens`.

Rows of the result are prompt-major: row i*G + g is sample g of prompt i.

Log-probs. `Generation.logprobs` holds log p(token) under the distribution the
token was drawn from: softmax(logits / temperature) after the top-k and top-p
filters (the filtered-out tokens get probability 0 and the rest is
renormalised). For greedy decoding (temperature 0) there is no sampling
distribution, so the log-prob is taken under the plain temperature-1 softmax
of the unfiltered logits.

Stop strings are matched on decoded text, so they may span several tokens: after
every step the tail of each running row's completion is decoded and searched,
and the row stops right after the token that completes a stop string (the stop
string stays in the text and in the mask). This is the only per-token Python
work in the decode loop, and it runs only when stop strings are set.

Two decode paths feed the new tokens back (`generate(..., decode=...)`):
  * "eager" (the default on a CPU): the cache grows by one column per step and attention reads only
    the columns filled so far; linear layers run on oneDNN-packed weights (cpu_packing.py).
  * "graph" (the default on CUDA): gpt-fast's static decode step (model.decode_step) -- the cache is
    written at a tensor position and attention reads all of it under a mask, so every step has the
    same shapes and reads nothing back to the host -- replayed as ONE CUDA graph per step instead of
    ~40 kernel launches per layer. "compile" runs the same step through torch.compile(fullgraph=True)
    (inductor fuses the elementwise work; on CUDA the compiled step is then captured the same way);
    "static" runs it eagerly (any device: the reference the other two are checked against).
    That step, its buffers and its CUDA-graph capture live in static_decode.py.
  On the static paths the loop asks the GPU whether every row has stopped only every
  `CHECK_EVERY` steps (each question is a host sync); the extra steps of finished rows are masked out.

Reading order (as in gpt-fast): `sample_tokens` draws one token per row from logits;
`generate` is the loop: `_setup` checks the inputs, `_prefill` runs the left-padded
prompts, `_Rows.sample` draws and records one column, `_StopStrings` watches the
decoded tails, `_eager_decoder` or `static_decode.StaticDecoder` feeds the new tokens back, `_finish`
builds the Generation. The model, its KV cache and the CPU weight packing live in model.py and
cpu_packing.py; the token layout (left padding) in layout.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from nano_gtalign.kernels.logprob import autocast_dtype
from nano_gtalign.cpu_packing import onednn_packing_applies, packed_linears
from nano_gtalign.layout import left_pad
from nano_gtalign.model import KVCache
from nano_gtalign.static_decode import StaticDecoder

# Row states during decoding; anything but RUNNING means the row has finished.
RUNNING, EOS, STOP = 0, 1, 2
_REASONS = {RUNNING: "length", EOS: "eos", STOP: "stop"}

DECODE_MODES = ("auto", "eager", "static", "graph", "compile")
DECODE_ENV = "NANO_GTALIGN_DECODE"  # overrides decode="auto", e.g. NANO_GTALIGN_DECODE=eager python train.py ...
CHECK_EVERY = 8  # static paths: steps between "has every row stopped?" checks (each one is a host sync)
CACHE_ALIGN = 64  # static paths: cache columns rounded up to this (aligned mask rows; fewer distinct shapes)


@dataclass
class SamplingParams:
    """How `generate` samples; checked on construction (a ValueError names the bad field)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    stop_strings: tuple[str, ...] = ()  # stop right after the token that completes one (kept in output + mask)
    eos_token_ids: tuple[int, ...] | None = None  # None: tokenizer.eos_token_ids; () disables EOS stopping
    seed: int | None = None  # used when no generator is passed to generate()

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stop_strings must be a tuple of strings, got the single string {self.stop_strings!r}")
        self.stop_strings = tuple(self.stop_strings)
        if any(not isinstance(s, str) or s == "" for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.eos_token_ids is not None:
            if isinstance(self.eos_token_ids, int):
                self.eos_token_ids = (self.eos_token_ids,)
            self.eos_token_ids = tuple(int(i) for i in self.eos_token_ids)
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")


@dataclass
class Generation:
    """What `generate` returns. Rows are prompt-major: row i*G + g is sample g of prompt i."""

    prompt_ids: list[list[int]]  # per row
    completion_ids: torch.LongTensor  # [R, T] right-padded with pad_token_id
    completion_mask: torch.BoolTensor  # [R, T] True for generated tokens incl. the EOS / stop-completing token
    logprobs: torch.Tensor  # [R, T] fp32 log-prob of each sampled token under the sampling distribution (0 where masked)
    texts: list[str]  # decoded completions (without the EOS token text)
    finish_reasons: list[str]  # "eos" | "stop" | "length"


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from fp32 logits [R, V]; return (tokens [R], log-probs [R]).

    temperature 0 is greedy: argmax, with the log-prob under softmax(logits).

    Whatever the logits, every token is an id in [0, V). A model that diverges or overflows gives NaN or inf
    logits: NaN counts as impossible and +inf as the largest float, so a +inf token takes all the mass (shared
    among several). A row with no usable logit at all (every one NaN or -inf) has no distribution: it gets
    an id in range and a NaN log-prob, which says so. Finite logits (-inf included) give the same tokens and
    log-probs as without this guard: one elementwise pass, no host sync.
    """
    if temperature == 0.0:
        logits = _finite_or_minus_inf(logits)
        # One max pass gives both the argmax and the logsumexp shift: log p = m - lse = -log sum exp(x - m).
        top, tokens = logits.max(dim=-1)
        logprobs = -(logits - top[:, None]).exp().sum(dim=-1).log()
        return tokens, logprobs
    # After the division: a finite logit over a small temperature can overflow to inf too.
    scores = _finite_or_minus_inf(logits / temperature)
    index = None
    if 0 < top_k < logits.shape[-1]:  # work on the k candidates only
        scores, index = scores.topk(top_k, dim=-1)
    logp = scores.log_softmax(dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        # The nucleus: the smallest set of most likely tokens reaching top_p. Walking the probabilities in
        # descending order, a token is kept while the mass strictly before it is below top_p (the most likely
        # always survives); tau is the last kept probability, and every token with p >= tau is kept (a tie
        # at the boundary keeps all tied tokens, so the result never depends on a sort's tie order).
        # Only the sorted VALUES are needed, never the permutation: on a CPU, numpy sorts values ~15x
        # faster than torch.sort sorts values with indices.
        desc = _sorted_descending(probs)
        before = desc.double().cumsum(dim=-1) - desc
        # At least 1: a row with no distribution (NaN probabilities) would otherwise gather at -1.
        n_keep = (before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        tau = desc.gather(-1, n_keep - 1)
        probs = torch.where(probs >= tau, probs, 0.0)
    # Cumulative sums in float64, so rounding never shifts a draw. Inverse-CDF draw with one uniform per row
    # (torch.multinomial costs ~10x more on CPU at a 32k vocabulary). The first cdf entry above u belongs to a
    # kept token (the cdf only rises at those); the minimum guards u rounding up to the total.
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype) * total
    choice = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, total))
    # A row with no distribution has a NaN cdf, and searchsorted puts NaN after everything: index V (or k),
    # one past the end ("index 300 is out of bounds"; on CUDA a device-side assert). Never on finite scores.
    choice = choice.clamp(max=scores.shape[-1] - 1)
    # Renormalising over the kept tokens is a shift by log(total) (log 1 = 0 without top-p).
    logprobs = logp.gather(-1, choice)[:, 0] - total[:, 0].log().float()
    tokens = choice[:, 0] if index is None else index.gather(-1, choice)[:, 0]
    return tokens, logprobs


def _finite_or_minus_inf(x: torch.Tensor) -> torch.Tensor:
    """x with NaN as -inf (never drawn) and +inf as the largest float (drawn before any finite score).
    The identity on finite values and -inf."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """The values of each row of x [R, V] in descending order."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.ascontiguousarray(np.sort(x.detach().numpy(), axis=-1)[:, ::-1]))
    return x.sort(dim=-1, descending=True).values


# ---------------------------------------------------------------------------- generate: the decode loop


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    pack_weights: bool | None = None,
    decode: str = "auto",
) -> Generation:
    """Sample `num_samples` completions for each prompt (lists of token ids).

    `generator` (on the model's device) drives the sampling; without one, a fresh
    generator seeded with `params.seed` is used, or torch's global RNG when the
    seed is None. The same prompts, params and seed give the same tokens.
    `pack_weights` (None: whenever cpu_packing.onednn_packing_applies, i.e. fp32 weights on a CPU
    outside autocast) runs the linear layers on weights packed for oneDNN, about 2x faster
    decoding on a CPU (see cpu_packing.packed_linears); False keeps plain F.linear. Eager decoding only.
    `decode` picks the decode path (module docstring): "auto" is "graph" on CUDA and "eager" elsewhere,
    unless NANO_GTALIGN_DECODE names another; "eager" | "static" | "graph" | "compile" force one.
    """
    mode = resolve_decode(decode, model.output_weight().device)
    if pack_weights is None:
        pack_weights = mode == "eager" and onednn_packing_applies(model)
    elif pack_weights and mode != "eager":
        raise ValueError(f"pack_weights=True applies to decode='eager' only (got decode={mode!r})")
    elif pack_weights and not onednn_packing_applies(model):
        raise ValueError("pack_weights=True needs plain fp32 weights on a CPU (bf16 where the CPU has native bf16), "
                         "no autocast, and a torch built with oneDNN")
    with packed_linears(model, pack_weights) as head:
        run = _setup(model, tokenizer, prompts, params, num_samples, generator)
        P = max(len(p) for p in run.prompts)
        static = mode != "eager"
        cache_len = _round_up(P + run.max_new, CACHE_ALIGN) if static else P + run.max_new
        cache, logits, positions, key_mask = _prefill(model, head, run, cache_len)
        if static:
            decoder = StaticDecoder(model, cache, positions, key_mask, mode, strict=decode != "auto")
            check_every = CHECK_EVERY
        else:
            decoder, check_every = _eager_decoder(model, head, cache, positions, key_mask, run.max_new), 1
        rows = _Rows(run)
        stops = _StopStrings(params.stop_strings, tokenizer, rows.n) if params.stop_strings else None
        for t in range(run.max_new):
            tok = rows.sample(t, logits, params, run.generator)
            if stops is not None:
                all_stopped = stops.update(tok, rows.state)
            else:
                all_stopped = (t + 1) % check_every == 0 and rows.none_running()
            if all_stopped or t == run.max_new - 1:
                break  # the last token needs no forward pass
            logits = decoder(tok, t)
        return _finish(rows, tokenizer, run)


def resolve_decode(decode: str, device: torch.device) -> str:
    """"auto" (or the NANO_GTALIGN_DECODE override) -> "eager" | "static" | "graph" | "compile"."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: expected one of {DECODE_MODES}")
    if decode == "auto":
        forced = os.environ.get(DECODE_ENV, "").strip().lower()
        if forced and forced not in DECODE_MODES:
            raise ValueError(f"{DECODE_ENV}={forced!r}: expected one of {DECODE_MODES}")
        decode = forced if forced and forced != "auto" else ("graph" if device.type == "cuda" else "eager")
    if decode == "graph" and device.type != "cuda":
        raise ValueError(f"decode='graph' captures CUDA graphs: it needs a CUDA model (got {device.type}); "
                         "decode='static' runs the same step eagerly")
    if decode == "compile" and not hasattr(torch, "compile"):
        raise ValueError(f"decode='compile' needs torch.compile (torch {torch.__version__} has none)")
    return decode


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class _Run:
    """What one `generate` call settled before the first forward pass."""
    prompts: list[list[int]]  # checked, as int lists
    num_samples: int  # G rows per prompt
    max_new: int
    eos_ids: list[int]  # empty: EOS stopping disabled
    pad_id: int
    device: torch.device
    cache_dtype: torch.dtype
    generator: torch.Generator | None


def _setup(model, tokenizer, prompts, params: SamplingParams, num_samples, generator) -> _Run:
    """Check the inputs and settle the ids, device, cache dtype and RNG the decode loop uses."""
    config = model.config
    prompts = _check_prompts(prompts, config.vocab_size)
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    max_new = int(params.max_new_tokens)
    P = max(len(p) for p in prompts)
    if P + max_new > config.max_position_embeddings:
        raise ValueError(
            f"longest prompt ({P} tokens) + max_new_tokens ({max_new}) = {P + max_new} exceeds the model's "
            f"max_position_embeddings ({config.max_position_embeddings}); shorten the prompt or lower max_new_tokens"
        )
    eos_ids = tokenizer.eos_token_ids if params.eos_token_ids is None else params.eos_token_ids
    eos_ids = [int(i) for i in (eos_ids or ())]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    weight = model.output_weight()
    # Training keeps fp32 weights and computes in bf16 under autocast: cache what attention computes with.
    cache_dtype = autocast_dtype(weight.device.type) or weight.dtype
    if generator is None and params.seed is not None:
        generator = torch.Generator(device=weight.device).manual_seed(int(params.seed))
    return _Run(prompts, int(num_samples), max_new, eos_ids, pad_id, weight.device, cache_dtype, generator)


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of ints, or a ValueError that says which prompt is wrong and how."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, str) or not isinstance(p, (list, tuple)):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(p).__name__} (encode text first)")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token to condition on")
        ids = [int(t) for t in p]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the model vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


def _prefill(model, head, run: _Run, cache_len: int
             ) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run each distinct prompt through the model ONCE, then give every prompt its G rows.

    Returns the cache (`cache_len` columns), the first next-token logits [R, V] (R = B*G rows,
    prompt-major), each row's prompt length (the position of its first new token), and each row's
    prompt mask [R, P] (1 = real token; None when no prompt is padded).
    """
    input_ids, prompt_mask = (t.to(run.device) for t in left_pad(run.prompts, run.pad_id))
    B, P = input_ids.shape
    G = run.num_samples
    ragged = min(len(p) for p in run.prompts) != P
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.config, B, cache_len, run.device, run.cache_dtype)
    logits = _next_logits(model, head, input_ids, position_ids, prompt_mask if ragged else None, cache)
    if G > 1:  # copying the prefilled rows is much cheaper than prefilling each sample
        cache = cache.repeat_interleave(G)
        logits = logits.repeat_interleave(G, dim=0)
    positions = torch.tensor([len(p) for p in run.prompts], device=run.device).repeat_interleave(G)
    key_mask = prompt_mask.repeat_interleave(G, dim=0) if ragged else None
    return cache, logits, positions, key_mask


def _eager_decoder(model, head, cache: KVCache, positions: torch.Tensor, key_mask: torch.Tensor | None,
                   max_new: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """decoder(tok, t): feed each row's newest token [R] (step t) and return the next fp32 logits [R, V].

    The cache grows by one column per step. Keys seen at step t are the first P+t+1 columns; generated
    columns are always real, so the whole mask is built once. Unpadded batches need no mask.
    """
    decode_mask = None
    if key_mask is not None:
        new_columns = torch.ones((key_mask.shape[0], max_new), dtype=torch.long, device=key_mask.device)
        decode_mask = torch.cat([key_mask, new_columns], dim=1)

    def decoder(tok: torch.Tensor, t: int) -> torch.Tensor:
        mask = None if decode_mask is None else decode_mask[:, :cache.seq_len + 1]
        return _next_logits(model, head, tok[:, None], (positions + t)[:, None], mask, cache)
    return decoder


def _next_logits(model, head, input_ids, position_ids, attention_mask, kv_cache) -> torch.Tensor:
    """fp32 logits [R, V] of the last position only (prefill would otherwise build [B, P, V])."""
    hidden = model(
        input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        kv_cache=kv_cache,
        return_hidden=True,
    )
    return head(hidden[:, -1]).float()


class _Rows:
    """Every row's completion so far, filled one column per step, and whether (and why) it stopped."""

    def __init__(self, run: _Run):
        R = len(run.prompts) * run.num_samples
        self.n = R
        device = run.device
        self.pad_id = run.pad_id
        self.tokens = torch.full((R, run.max_new), run.pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros((R, run.max_new), dtype=torch.float32, device=device)
        self.mask = torch.zeros((R, run.max_new), dtype=torch.bool, device=device)
        self.state = torch.full((R,), RUNNING, dtype=torch.long, device=device)
        self.eos_ids = torch.tensor(run.eos_ids, dtype=torch.long, device=device) if run.eos_ids else None

    def sample(self, t: int, logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> torch.Tensor:
        """Draw column t for every row and record it; rows drawing an EOS id stop. Returns the tokens [R]."""
        running = self.state == RUNNING
        tok, logp = sample_tokens(logits, params.temperature, params.top_k, params.top_p, generator)
        # Finished rows keep feeding pad tokens (static batch); their columns are masked out.
        tok = torch.where(running, tok, self.pad_id)
        self.tokens[:, t] = tok
        self.logprobs[:, t] = torch.where(running, logp, 0.0)
        self.mask[:, t] = running
        if self.eos_ids is not None:
            self.state = torch.where(running & torch.isin(tok, self.eos_ids), EOS, self.state)
        return tok

    def none_running(self) -> bool:
        """True once every row has drawn an EOS id."""
        # Without EOS ids every row runs to max_new_tokens: skip the device sync.
        return self.eos_ids is not None and not bool((self.state == RUNNING).any())


class _StopStrings:
    """Stops rows whose completion just completed a stop string.

    Holds every row's generated tokens in Python and, after each step, decodes only the
    last `_stop_window` tokens of each running row: enough to contain any stop string
    the newest token completed, so the cost per step does not grow with the completion.
    """

    def __init__(self, stop_strings: tuple[str, ...], tokenizer, n_rows: int):
        self.strings = stop_strings
        self.tokenizer = tokenizer
        self.window = _stop_window(stop_strings)
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.done = [False] * n_rows

    def update(self, tok: torch.Tensor, state: torch.Tensor) -> bool:
        """Append this step's tokens [R]; set STOP in `state` (in place) where a stop string just
        completed. Returns True once every row has finished (EOS or stop)."""
        new_tokens, states = tok.tolist(), state.tolist()
        stopped = []
        for r, done in enumerate(self.done):
            if done:
                continue
            self.tokens[r].append(new_tokens[r])
            if states[r] != RUNNING:  # just produced an EOS
                self.done[r] = True
                continue
            tail = self.tokenizer.decode(self.tokens[r][-self.window:])
            if any(s in tail for s in self.strings):
                self.done[r] = True
                stopped.append(r)
        if stopped:
            state[torch.tensor(stopped, device=state.device)] = STOP
        return all(self.done)


def _stop_window(stop_strings: tuple[str, ...]) -> int:
    """How many trailing tokens can hold a stop string that the newest token completed.

    Every token covering part of the string contributes at least one of its UTF-8
    bytes, so the byte length bounds the token count (byte-level BPE, as in Qwen).
    """
    return max(len(s.encode("utf-8")) for s in stop_strings)


def _finish(rows: _Rows, tokenizer, run: _Run) -> Generation:
    """Drop the columns no row used, decode the texts (without the EOS token) and build the Generation."""
    used = int(rows.mask.sum(dim=1).max())
    tokens, logprobs, mask = rows.tokens[:, :used], rows.logprobs[:, :used], rows.mask[:, :used]
    states = rows.state.tolist()
    lengths = mask.sum(dim=1).tolist()
    ids = tokens.cpu().tolist()
    texts = []
    for r in range(rows.n):
        n = lengths[r] - (1 if states[r] == EOS else 0)  # texts leave the EOS out
        texts.append(tokenizer.decode(ids[r][:n]))
    return Generation(
        prompt_ids=[list(p) for p in run.prompts for _ in range(run.num_samples)],
        completion_ids=tokens,
        completion_mask=mask,
        logprobs=logprobs,
        texts=texts,
        finish_reasons=[_REASONS[s] for s in states],
    )
