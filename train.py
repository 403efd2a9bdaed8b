"""GRPO training of a Qwen2/Qwen3 model with the GTAlign welfare reward, on CPU, one GPU or many.

    python train.py                                         # the built-in demo (about 10 minutes on 2 CPU cores)
    python train.py --model DIR --data train.jsonl --eval-data test.jsonl --judge http://localhost:8000/v1
    torchrun --nproc_per_node=8 train.py --model DIR --data train.jsonl --eval-data test.jsonl \
        --judge http://localhost:8000/v1#Qwen/Qwen3-32B --prompts-per-step 512 --mini-batch-size 32
    torchrun --nproc_per_node=8 train.py --fsdp ...         # shard parameters, grads and optimizer state
    python train.py --resume                                # continue OUT_DIR's latest checkpoint exactly

Without --model, train.py runs the demo: it writes the synthetic arith_demo task (data/demo/task.py),
trains a BPE tokenizer and builds a tiny Qwen2-style model (data/demo/build.py), warm-starts it with a
short supervised pass over deliberately imperfect four-block transcripts (data/demo/sft.py), then runs
GRPO with the Cobb-Douglas welfare and the rule judge. The demo changes a few defaults (DEMO_DEFAULTS
below: learning rate, batch sizes, lengths); a flag given on the command line always wins.

One step (SPEC section 7):
  1. take --prompts-per-step records (sharded across ranks) and sample --group-size completions for each
     (the prompt is prefilled once, the KV cache copied G times);
  2. score every completion: four-block format, payoff matrix, the judge's verdict -> U, L, W;
     a failed judgement is counted and its sample left out of the update, never scored as 0;
  3. advantages within each group of G: A = (W - mean) / (std + eps) (Dr.GRPO: W - mean);
  4. --ppo-epochs passes over mini-batches of --mini-batch-size prompts, one optimizer step each;
     each mini-batch is split into micro-batches of --micro-batch-size rows (gradient accumulation).
     Token log-probs come from the model's final hidden states through the fused kernel
     (kernels/logprob.py), never materialising [tokens, vocab] logits.

Old log-probs (the denominator of the PPO ratio). With one mini-batch and one epoch (the default), the
update is exactly on-policy: old_logp = logp.detach() of the same forward (ratio 1, no extra pass). With
several optimizer steps per rollout, --old-logp recompute (default) runs one no-grad pass before the first
update; --old-logp sampler takes the sampler's log-probs instead (the same distribution when top-k/top-p are
off, up to float noise between the KV-cache decode and the full forward; saves that pass).

Distributed: torchrun starts one process per GPU (gloo on CPU, nccl on CUDA). DDP by default; --fsdp
shards with FSDP2 (fully_shard on every transformer block and on the root). Every rank samples its own
share of the prompts, so every rank runs the same number of forward/backward micro-steps; token counts
for the loss are all-reduced before each mini-batch so the token-mean is over the whole step. Only rank 0
prints, writes metrics and checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from kernels.logprob import fused_logprobs
from nano_gtalign import grpo
from nano_gtalign.judges import JudgeUnavailableError, canonical_task, make_judge
from nano_gtalign.loader import CheckpointError, load_pretrained, load_tokenizer, save_pretrained
from nano_gtalign.metrics import group_metrics, sample_row
from nano_gtalign.reward import BLEUS, LLM_REWARDS, TASKS, WELFARES, normalize_by_source, score_batch
from nano_gtalign.sampling import Generation, SamplingParams, generate

RULE_TASKS = ("math-hard", "minerva", "arith_demo")  # what the offline rule judge can score
CHECKPOINT_FORMAT = 1


class UsageError(ValueError):
    """A bad flag or input file; printed as one line without a traceback."""


# -----------------------------------------------------------------------------
# configuration

# Demo defaults, applied only to flags not given on the command line. A tiny model learns fast with a large
# learning rate; the KL to the warm-started model holds its behaviour where the reward says nothing (the
# model cannot yet do the arithmetic, so answering or asking score alike on clear questions, and without
# the KL the strong "ask on vague questions" signal leaks into clear ones). The demo evaluates the policy
# it trains, sampled at temperature 1 (4 completions per held-out prompt, the same draws before and after),
# before and after training only. KL 0.2, not 0.1: with 0.1 the run drifted to asking on clear questions
# too (held-out act_DQ 0.85 -> 0.54); 0.2 kept it (0.85 -> 0.90) with a larger welfare gain (bench/RESULTS.md).
DEMO_DEFAULTS = dict(
    out_dir="out/demo", lr=6e-4, warmup_steps=2, steps=40, prompts_per_step=16, group_size=8,
    micro_batch_size=64, gen_batch_size=0, max_new_tokens=160, max_prompt_tokens=256, kl_coef=0.2,
    eval_every=0, eval_size=64, eval_batch_size=64, eval_temperature=1.0, eval_samples=4, save_every=0, threads=1,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GRPO training with the GTAlign welfare reward (no --model: the built-in demo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="demo defaults (no --model): " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items()),
    )
    a = p.add_argument_group("model and data")
    a.add_argument("--model", default=None, help="Hugging Face Qwen2/Qwen3 directory (omit for the demo)")
    a.add_argument("--data", nargs="+", default=None, help="training records: .jsonl or .parquet files (SPEC section 6)")
    a.add_argument("--eval-data", nargs="+", default=None,
                   help="held-out records (files); without it --holdout records of --data are held out")
    a.add_argument("--holdout", type=int, default=64, help="records held out of --data when there is no --eval-data")
    a.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are dropped (and counted)")
    a.add_argument("--judge", default="rule", help='"rule" (offline) or an OpenAI-compatible URL, "URL#model"')
    a.add_argument("--judge-concurrency", type=int, default=32, help="HTTP judge requests in flight per rank")
    a.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per HTTP judge request")
    a = p.add_argument_group("reward")
    a.add_argument("--welfare", default="cobb_douglas", choices=WELFARES, help="W = sqrt(U L) | (U+L)/2 | U | L")
    a.add_argument("--llm-reward", default="main", choices=LLM_REWARDS, help="L as in the paper, or its ablation")
    a.add_argument("--bleu", default="char", choices=BLEUS, help="BLEU for the writing task's A_user")
    a.add_argument("--normalize-by-source", action="store_true", help="z-score W per data source over the step")
    a = p.add_argument_group("GRPO")
    a.add_argument("--steps", type=int, default=None, help="training steps (default: one pass over the data)")
    a.add_argument("--prompts-per-step", type=int, default=64, help="prompts per step, over all ranks")
    a.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    a.add_argument("--mini-batch-size", type=int, default=None,
                   help="prompts per optimizer step (default: all of the step's prompts, i.e. on-policy)")
    a.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward/backward on each rank")
    a.add_argument("--ppo-epochs", type=int, default=1, help="passes over the step's samples")
    a.add_argument("--max-new-tokens", type=int, default=4096, help="completion length limit")
    a.add_argument("--gen-batch-size", type=int, default=8,
                   help="prompts per generate call (x G rows); bounds the KV cache (0: all of a rank's prompts)")
    a.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also divides the logits in the loss)")
    a.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    a.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    a.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below: 1 - clip_low")
    a.add_argument("--clip-high", type=float, default=0.2, help="ratio clip above: 1 + clip_high")
    a.add_argument("--dual-clip", type=float, default=3.0, help="dual clip c for A < 0 (0 = off)")
    a.add_argument("--kl-coef", type=float, default=0.0, help="beta of the KL to the frozen initial model")
    a.add_argument("--kl-estimator", default="k3", choices=grpo.KL_KINDS, help="k1, k2 or k3 (SPEC section 7)")
    a.add_argument("--loss-agg", default="token-mean", choices=grpo.AGGREGATIONS,
                   help="token-mean over the whole step (DAPO), per-sequence mean, or Dr.GRPO's sum / max length")
    a.add_argument("--adv-std", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group std (--no-adv-std: Dr.GRPO)")
    a.add_argument("--adv-eps", type=float, default=1e-6, help="eps in (W - mean) / (std + eps)")
    a.add_argument("--drop-zero-spread", action="store_true", help="leave groups whose G rewards are equal out of the loss")
    a.add_argument("--mask-truncated", action="store_true", help="leave completions cut at --max-new-tokens out of the loss")
    a.add_argument("--old-logp", default="recompute", choices=("recompute", "sampler"),
                   help="old log-probs when a rollout feeds several optimizer steps")
    a = p.add_argument_group("optimizer")
    a.add_argument("--lr", type=float, default=1e-6, help="peak learning rate")
    a.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    a.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps of linear warm-up from 0")
    a.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    a.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    a.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (all parameters)")
    a.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    a = p.add_argument_group("system")
    a.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    a.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype (autocast); weights and optimizer stay fp32. auto: bf16 on CUDA")
    a.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    a.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    a.add_argument("--logprob-backend", default="auto", choices=("auto", "triton", "torch", "naive"),
                   help="fused kernel backend; naive = full log_softmax (for comparison)")
    a.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default). On a busy or 2-core CPU, 1 avoids "
                        "threads waiting on each other")
    a.add_argument("--seed", type=int, default=0, help="data order, sampling and the demo's task/model")
    a = p.add_argument_group("evaluation, logging, checkpoints")
    a.add_argument("--out-dir", default="out/run", help="metrics.jsonl, checkpoints, final/ (and the demo's test.jsonl)")
    a.add_argument("--eval-every", type=int, default=50,
                   help="evaluate every K steps, and before and after training (0: only before/after; -1: never)")
    a.add_argument("--eval-size", type=int, default=256, help="held-out records evaluated (greedy)")
    a.add_argument("--eval-batch-size", type=int, default=32, help="prompts per generate call in evaluation")
    a.add_argument("--eval-temperature", type=float, default=0.0, help="0: greedy evaluation")
    a.add_argument("--eval-samples", type=int, default=1, help="completions per held-out prompt (with sampling)")
    a.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps (0: only when halting)")
    a.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT_DIR's latest checkpoint, or from the given checkpoint file")
    a.add_argument("--halt-after", type=int, default=None,
                   help="stop after this many steps of this run, with a checkpoint (for time-limited jobs)")
    a.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases")
    a = p.add_argument_group("demo (no --model)")
    a.add_argument("--demo-train-size", type=int, default=1000, help="arith_demo training questions")
    a.add_argument("--sft-steps", type=int, default=300, help="supervised warm-start steps")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Two passes: whether --model is given decides which defaults the full parser uses.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    demo = known.model is None
    if demo:
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    args.demo = demo
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.demo and (args.data or args.eval_data):
        raise UsageError("--data/--eval-data need --model (the demo writes its own task)")
    if not args.demo and not args.data:
        raise UsageError("--model needs --data (training records, .jsonl or .parquet)")
    positive = ("prompts_per_step", "group_size", "micro_batch_size", "ppo_epochs", "max_new_tokens",
                "max_prompt_tokens", "eval_size", "eval_batch_size", "eval_samples")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_temperature < 0 or (args.eval_temperature == 0 and args.eval_samples > 1):
        raise UsageError("--eval-temperature must be >= 0, and > 0 when --eval-samples > 1 (greedy draws are identical)")
    if args.gen_batch_size < 0:
        raise UsageError(f"--gen-batch-size must be >= 0 (0: one call), got {args.gen_batch_size}")
    if args.mini_batch_size is None:
        args.mini_batch_size = args.prompts_per_step
    if args.mini_batch_size < 1 or args.prompts_per_step % args.mini_batch_size:
        raise UsageError(f"--mini-batch-size {args.mini_batch_size} must divide --prompts-per-step {args.prompts_per_step}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.halt_after is not None and args.halt_after < 1:
        raise UsageError(f"--halt-after must be >= 1, got {args.halt_after}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 for GRPO sampling, got {args.temperature}")
    if args.old_logp == "sampler" and (args.top_k or args.top_p < 1):
        raise UsageError("--old-logp sampler needs --top-k 0 --top-p 1: the sampler's log-probs are then "
                         "under a truncated distribution, not the policy's")
    if args.lr <= 0 or args.warmup_steps < 0 or not 0 <= args.min_lr_ratio <= 1:
        raise UsageError("need --lr > 0, --warmup-steps >= 0 and 0 <= --min-lr-ratio <= 1")
    if args.kl_coef < 0:
        raise UsageError(f"--kl-coef must be >= 0, got {args.kl_coef}")


# -----------------------------------------------------------------------------
# data


def read_records(path: str | Path) -> list[dict]:
    """GTAlign records from JSONL (one JSON object a line) or parquet (needs pyarrow), each checked."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it "
                             "with data/gtalign/prepare.py") from None
        records = pq.read_table(path).to_pylist()
        where = [f"{path} row {i}" for i in range(len(records))]
    else:
        records, where = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                where.append(f"{path}:{n}")
    if not records:
        raise UsageError(f"{path}: no records")
    for record, w in zip(records, where):
        check_record(record, w)
    return records


def check_record(record: object, where: str) -> None:
    """The fields training reads (SPEC section 6); the reward checks the task-specific rest."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    messages = record.get("prompt")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise UsageError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} chat messages")
    source = record.get("data_source")
    if not isinstance(source, str) or canonical_task(source) not in TASKS:
        raise UsageError(f"{where}: unknown data_source {source!r} (known: {', '.join(TASKS)})")
    truth = (record.get("reward_model") or {}).get("ground_truth")
    if not isinstance(truth, str):
        raise UsageError(f"{where}: reward_model.ground_truth must be a string")


def encode_prompts(records: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], list[list[int]], int]:
    """Each record's own chat messages through the chat template; records over max_tokens are dropped."""
    kept, ids, dropped = [], [], 0
    for r in records:
        x = tokenizer.encode_chat(r["prompt"])
        if len(x) > max_tokens:
            dropped += 1
            continue
        kept.append(r)
        ids.append(x)
    return kept, ids, dropped


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order records are visited in one epoch: a fixed function of (seed, epoch), so resuming needs only
    (epoch, position) and every rank computes the same order without communicating."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def next_prompts(cursor: dict, n: int, per_step: int, seed: int) -> list[int]:
    """Indices of the next step's prompts (all ranks); an epoch's remainder smaller than a step is skipped."""
    if cursor["pos"] + per_step > n:
        cursor["epoch"] += 1
        cursor["pos"] = 0
    order = epoch_order(n, seed, cursor["epoch"])
    idx = order[cursor["pos"]: cursor["pos"] + per_step].tolist()
    cursor["pos"] += per_step
    return idx


# -----------------------------------------------------------------------------
# distributed setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False  # whether we own (and must destroy) the process group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def setup_distributed(device_flag: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; plain `python train.py` uses no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if device_flag == "cuda" and world > 1:
        device_flag = f"cuda:{local}"
    device = torch.device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    d = Dist(rank, world, local, device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        d.initialized_here = True
    return d


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (fp64 so counts and sums stay exact)."""
    if not d.on:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_gather(d: Dist, obj) -> list:
    if not d.on:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def rank0_print(d: Dist, *a) -> None:
    if d.main:
        print(*a, flush=True)


# -----------------------------------------------------------------------------
# the policy: one module whose forward computes token log-probs


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                   backend: str, with_entropy: bool):
    """log softmax(W h / tau)[y] (and entropy) for flat [N, H] hidden states."""
    if backend == "naive":  # SPEC section 8's reference: holds [N, V] fp32 logits (bench/train_step.py compares)
        logp_all = (hidden @ weight.T).float().div(temperature).log_softmax(-1)
        logp = logp_all.gather(-1, targets[:, None])[:, 0]
        return (logp, -(logp_all.exp() * logp_all).sum(-1)) if with_entropy else logp
    return fused_logprobs(hidden, weight, targets, temperature, return_entropy=with_entropy, backend=backend)


class Policy(nn.Module):
    """The transformer plus its log-prob head behind ONE forward.

    DDP and FSDP2 only synchronise what runs inside a wrapped module's forward (FSDP2 also gathers the
    head weight there), so the log-probs must be computed here rather than in the training loop. Without
    `targets` the forward is the transformer's own, which is what the sampler calls.
    """

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
        if targets is None:
            return self.model(input_ids, **kwargs)
        hidden = self.model(input_ids, return_hidden=True, **kwargs)
        T = targets.shape[1]
        # Completion token j sits at column prompt_len + j and is predicted by the hidden state before it.
        h = hidden[:, prompt_len - 1: prompt_len - 1 + T].reshape(-1, hidden.shape[-1])
        w = self.model.output_weight()
        # One dtype for the kernel: the autocast dtype (fp32 weights are cast per call, a V x H copy).
        h, w = h.to(self.compute_dtype), w.to(self.compute_dtype)
        # Flat outputs: FSDP2 warns about (and cannot hook) views returned from a forward.
        return token_logprobs(h, w, targets.reshape(-1), temperature, self.backend, with_entropy)


def fsdp_api():
    """fully_shard and FSDPModule: public in torch>=2.6, under _composable before."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    if not hasattr(FSDPModule, "set_reshard_after_forward"):
        raise UsageError("--fsdp needs torch>=2.6 (FSDPModule.set_reshard_after_forward, used for generation)")
    return fully_shard, FSDPModule


def shard(policy: Policy, d: Dist) -> Policy:
    """FSDP2: one shard group per transformer block (gathered just before it runs) plus the root
    (embeddings, final norm, head)."""
    fully_shard, _ = fsdp_api()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in policy.model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return policy


@contextlib.contextmanager
def generation_mode(policy: Policy, fsdp: bool):
    """Eval mode; under FSDP2 also gather every parameter once and keep it gathered.

    Generation stops when every row has finished, which differs between ranks; with the parameters held
    unsharded no decode step needs a collective, so ranks may run different numbers of steps. The sampler
    calls the FSDP root (this Policy) so the root's hooks see every forward. Memory: one full copy of the
    weights per rank while generating, as in any RL trainer that samples from the model it trains.
    """
    was_training = policy.training
    policy.eval()
    modules = []
    if fsdp:
        _, FSDPModule = fsdp_api()
        modules = [m for m in policy.modules() if isinstance(m, FSDPModule)]
        policy.set_reshard_after_forward(False, recurse=True)
        for m in modules:
            m.unshard()
    try:
        yield policy
    finally:
        if fsdp:
            policy.set_reshard_after_forward(True, recurse=True)
            for m in modules:
                m.reshard()
        policy.train(was_training)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(module: nn.Module) -> Policy:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# -----------------------------------------------------------------------------
# rollout: sample, score, advantages


@dataclass
class Rollout:
    """One rank's share of a step: R = prompts * G rows, prompt-major."""
    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor      # [R, T]
    attn_mask: torch.Tensor           # [R, T] the tokens generated (attention)
    loss_mask: torch.Tensor           # [R, T] the tokens trained on (drops failed / filtered rows)
    sampler_logp: torch.Tensor        # [R, T]
    advantages: torch.Tensor          # [R]
    scores: list                      # RewardBreakdown per row
    stats: dict


def concat(gens: list[Generation], pad_id: int) -> Generation:
    """One Generation from several generate calls (rows in call order), padded to the longest."""
    if len(gens) == 1:
        return gens[0]
    T = max(g.completion_ids.shape[1] for g in gens)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)
    return Generation(
        prompt_ids=[p for g in gens for p in g.prompt_ids],
        completion_ids=torch.cat([pad(g.completion_ids, pad_id) for g in gens]),
        completion_mask=torch.cat([pad(g.completion_mask, False) for g in gens]),
        logprobs=torch.cat([pad(g.logprobs, 0.0) for g in gens]),
        texts=[t for g in gens for t in g.texts], finish_reasons=[r for g in gens for r in g.finish_reasons])


def rollout(policy: Policy, tokenizer, records: list[dict], prompts: list[list[int]], args, judge,
            generator: torch.Generator, d: Dist) -> Rollout:
    G = args.group_size
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
    t0 = time.perf_counter()
    size = args.gen_batch_size or len(prompts)
    with generation_mode(policy, args.fsdp), autocast(d.device, args.compute_dtype):
        gen = concat([generate(policy, tokenizer, prompts[s: s + size], params, num_samples=G, generator=generator)
                      for s in range(0, len(prompts), size)], tokenizer.pad_token_id)
    t1 = time.perf_counter()
    rows = [r for r in records for _ in range(G)]
    scores = score_batch(gen.texts, rows, judge, welfare=args.welfare, llm_reward=args.llm_reward, bleu=args.bleu)
    t2 = time.perf_counter()

    W = [s.welfare for s in scores]  # NaN where the judge failed
    if args.normalize_by_source:  # statistics over the whole step (all ranks), not this rank's share
        everything = all_gather(d, (W, [r["data_source"] for r in rows]))
        allW = [w for part in everything for w in part[0]]
        allS = [s for part in everything for s in part[1]]
        start = sum(len(part[0]) for part in everything[:d.rank])
        W = normalize_by_source(allW, allS)[start: start + len(rows)]
    rewards = torch.tensor(W, dtype=torch.float32)
    failed = torch.isnan(rewards)
    # A failed sample is left out of the loss; for the group statistics it takes the mean of its group's
    # valid rewards, which leaves the group mean unchanged (the std, over G values, shrinks by a factor
    # sqrt((G_valid - 1) / (G - 1)); a group with no valid reward gets advantage 0 everywhere).
    groups = rewards.view(-1, G)
    ok = ~failed.view(-1, G)
    fill = torch.where(ok, groups, 0.0).sum(1) / ok.sum(1).clamp(min=1)
    filled = torch.where(ok, groups, fill[:, None]).view(-1)
    adv = grpo.group_advantages(filled, G, eps=args.adv_eps, std_normalize=args.adv_std)
    keep = ~failed
    zero_spread = grpo.zero_spread_groups(filled, G, tol=1e-6)
    if args.drop_zero_spread:
        keep &= ~zero_spread
    attn_mask = gen.completion_mask.cpu()
    loss_mask = attn_mask & keep[:, None]
    if args.mask_truncated:
        loss_mask = grpo.mask_truncated(loss_mask, gen.finish_reasons)

    scored = [s for s in scores if not s.judge_failed]
    strategies = [s.strategy for s in scores]
    stats = dict(
        gen_time=t1 - t0, score_time=t2 - t1,
        completion_tokens=int(attn_mask.sum()), rows=len(scores),
        W=sum(s.welfare for s in scored), U=sum(s.user for s in scored), L=sum(s.llm for s in scored),
        scored=len(scored), format=sum(s.format for s in scores),
        answer=sum(s.answer_llm for s in scored),
        DA=strategies.count("DA"), CQ=strategies.count("CQ"), AQ=strategies.count("AQ"),
        truncated=gen.finish_reasons.count("length"), judge_failed=int(failed.sum()),
        zero_spread_groups=int(zero_spread.view(-1, G)[:, 0].sum()), groups=len(records),
        train_rows=int(loss_mask.any(1).sum()),
    )
    return Rollout(gen.prompt_ids, gen.completion_ids.cpu(), attn_mask, loss_mask, gen.logprobs.cpu(),
                   adv, scores, stats)


# -----------------------------------------------------------------------------
# update: clipped policy loss over mini-batches and micro-batches


def pack(prompt_ids: list[list[int]], completion_ids: torch.Tensor, attn_mask: torch.Tensor, pad_id: int,
         device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Rows [left-padded prompt | completion | right padding] as the sampler laid them out, so completion
    token j is at column P + j in every row. Returns input_ids, attention_mask, P, T."""
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    used = attn_mask.any(0).nonzero()
    T = int(used.max()) + 1 if len(used) else 1
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + T), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p): P] = 1
    ids[:, P:] = torch.where(attn_mask[:, :T], completion_ids[:, :T], pad_id)
    mask[:, P:] = attn_mask[:, :T].long()
    return ids.to(device), mask.to(device), P, T


def micro_batches(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, hi)) for s in range(lo, hi, size)]


def forward_logp(model, ro: Rollout, lo: int, hi: int, args, pad_id: int, d: Dist, with_entropy=False):
    """[rows, T] log-probs (and entropy) of rows lo:hi of the rollout, plus their loss mask."""
    ids, mask, P, T = pack(ro.prompt_ids[lo:hi], ro.completion_ids[lo:hi], ro.attn_mask[lo:hi], pad_id, d.device)
    targets = ids[:, P:]
    with autocast(d.device, args.compute_dtype):
        out = model(ids, attention_mask=mask, targets=targets, prompt_len=P, temperature=args.temperature,
                    with_entropy=with_entropy)
    B = hi - lo
    if with_entropy:
        return out[0].view(B, T), out[1].view(B, T), ro.loss_mask[lo:hi, :T].to(d.device)
    return out.view(B, T), None, ro.loss_mask[lo:hi, :T].to(d.device)


def set_grad_sync(model, sync: bool, args):
    """DDP: skip the all-reduce on all but the last micro-batch; FSDP2: the same with reduce-scatter."""
    if args.fsdp:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def update(model, ref, optimizer, scheduler, ro: Rollout, args, pad_id: int, d: Dist) -> dict:
    policy = unwrap(model)
    policy.model.gradient_checkpointing = args.grad_checkpointing
    policy.train()
    R = len(ro.prompt_ids)
    n_mini = args.prompts_per_step // args.mini_batch_size
    rows_per_mini = R // n_mini
    on_policy = n_mini == 1 and args.ppo_epochs == 1
    params = [p for p in model.parameters() if p.requires_grad]

    old_logp = None
    if not on_policy:
        if args.old_logp == "sampler":
            old_logp = ro.sampler_logp
        else:
            old_logp = torch.zeros_like(ro.sampler_logp)
            with torch.no_grad():
                for lo, hi in micro_batches(0, R, args.micro_batch_size):
                    lp, _, _ = forward_logp(model, ro, lo, hi, args, pad_id, d)
                    old_logp[lo:hi, :lp.shape[1]] = lp.float().cpu()

    totals = dict(tokens=0.0, clip=0.0, approx_kl=0.0, entropy=0.0, kl=0.0, grad_norm=0.0, opt_steps=0.0,
                  loss=0.0, mismatch=0.0, mismatch_tokens=0.0)
    t0 = time.perf_counter()
    for epoch in range(args.ppo_epochs):
        for m in range(n_mini):
            first_pass = epoch == 0 and m == 0
            lo_m, hi_m = m * rows_per_mini, (m + 1) * rows_per_mini
            n_tok, n_seq = all_sum(d, list(grpo.step_counts(ro.loss_mask[lo_m:hi_m])))
            if n_tok == 0:  # nothing to learn from on any rank: skip the optimizer step everywhere
                continue
            chunks = micro_batches(lo_m, hi_m, args.micro_batch_size)
            for i, (lo, hi) in enumerate(chunks):
                with set_grad_sync(model, i == len(chunks) - 1, args):
                    logp, ent, mask = forward_logp(model, ro, lo, hi, args, pad_id, d, with_entropy=True)
                    T = logp.shape[1]
                    old = logp.detach() if on_policy else old_logp[lo:hi, :T].to(d.device)
                    loss_tok, st = grpo.policy_loss(logp, old, ro.advantages[lo:hi].to(d.device), mask,
                                                    args.clip_low, args.clip_high, args.dual_clip or None)
                    if ref is not None:
                        with torch.no_grad():
                            ref_logp, _, _ = forward_logp(ref, ro, lo, hi, args, pad_id, d)
                        kl_tok = grpo.kl_penalty(logp, ref_logp, args.kl_estimator)
                        loss_tok = loss_tok + args.kl_coef * kl_tok
                        totals["kl"] += float((kl_tok.detach() * mask).sum())
                    loss = grpo.reduce_loss(loss_tok, mask, args.loss_agg, global_token_count=n_tok,
                                          max_len=args.max_new_tokens, global_seq_count=n_seq)
                    # DDP and FSDP2 average gradients over ranks; the loss is already a share of the global
                    # sum, so scale back up by the world size.
                    (loss * d.world).backward()
                totals["loss"] += float(loss.detach())
                k = float(st["tokens"])
                totals["tokens"] += k
                totals["clip"] += float(st["clip_frac"]) * k
                totals["approx_kl"] += float(st["approx_kl"]) * k
                totals["entropy"] += float((ent.detach() * mask).sum())
                if first_pass:  # weights still those that sampled: only float noise separates the two
                    sampler = ro.sampler_logp[lo:hi, :T].to(d.device)
                    totals["mismatch"] += float(((logp.detach() - sampler).abs() * mask).sum())
                    totals["mismatch_tokens"] += k
            if args.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            totals["grad_norm"] += float(norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals["opt_steps"] += 1
    totals["update_time"] = time.perf_counter() - t0
    return totals


# -----------------------------------------------------------------------------
# evaluation on the held-out split (greedy unless --eval-temperature)


def evaluate(policy: Policy, tokenizer, records: list[dict], prompts: list[list[int]], args, judge,
             d: Dist) -> dict:
    """SPEC section 10 metrics of completions of the held-out prompts (greedy unless --eval-temperature),
    plus the correct-action rates where the records say their question type (arith_demo): a clear (DQ)
    question is served by DA or AQ, a vague (VQ) one by CQ.

    Sampled evaluation uses a generator seeded the same way at every evaluation, so two evaluations of
    the same policy draw the same tokens and a before/after difference is the policy's, not the dice's.
    """
    n = args.eval_samples
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.eval_temperature)
    generator = torch.Generator(device=d.device).manual_seed(args.seed * 1000 + 500 + d.rank)
    mine = list(range(d.rank, len(records), d.world))
    rows = []
    with generation_mode(policy, args.fsdp), autocast(d.device, args.compute_dtype):
        for s in range(0, len(mine), args.eval_batch_size):
            idx = mine[s: s + args.eval_batch_size]
            gen = generate(policy, tokenizer, [prompts[i] for i in idx], params, num_samples=n, generator=generator)
            recs = [records[i] for i in idx for _ in range(n)]
            scores = score_batch(gen.texts, recs, judge, welfare=args.welfare, llm_reward=args.llm_reward,
                                 bleu=args.bleu)
            lengths = gen.completion_mask.sum(1).tolist()
            for b, text, rec, n in zip(scores, gen.texts, recs, lengths):
                row = sample_row(b, text, rec)
                row["true_type"] = (rec.get("extra_info") or {}).get("question_type")
                row["tokens"] = n
                rows.append(row)
    rows = [r for part in all_gather(d, rows) for r in part]
    m = group_metrics(rows)
    out = {k: m[k] for k in ("n", "welfare", "user", "llm", "answer_llm", "format_rate", "reasoning_chars",
                             "judge_failure_rate")}
    out["completion_tokens"] = sum(r["tokens"] for r in rows) / max(len(rows), 1)
    for qtype, good in (("DQ", ("DA", "AQ")), ("VQ", ("CQ",))):
        typed = [r for r in rows if r["true_type"] == qtype]
        out[f"action_ok_{qtype}"] = sum(r["strategy"] in good for r in typed) / len(typed) if typed else None
        scored = [r for r in typed if not r["judge_failed"]]
        out[f"answer_{qtype}"] = sum(r["answer_llm"] for r in scored) / len(scored) if scored else None
    return out


EVAL_COLUMNS = (  # (key, header, format, meaning) of the before/after table
    ("welfare", "W", "{:.3f}", "mean welfare W (the training score)"),
    ("user", "U", "{:.3f}", "mean user reward U"),
    ("llm", "L", "{:.3f}", "mean LLM reward L"),
    ("answer_llm", "answer", "{:.3f}", "judge's answer score (demo: right number, or asked for the number)"),
    ("action_ok_DQ", "act_DQ", "{:.3f}", "clear (DQ) questions served by DA or AQ"),
    ("action_ok_VQ", "act_VQ", "{:.3f}", "vague (VQ) questions served by CQ"),
    ("format_rate", "format", "{:.3f}", "four-block format rate"),
    ("reasoning_chars", "reas_ch", "{:.0f}", "mean characters before <response>"),
    ("completion_tokens", "tokens", "{:.1f}", "mean completion tokens"),
)


def format_eval_table(before: dict, after: dict) -> str:
    def cell(v, f):
        return "-" if v is None else f.format(v)
    lines = [" " * 8 + "".join(f"{h:>9s}" for _, h, _, _ in EVAL_COLUMNS)]
    for name, m in (("before", before), ("after", after)):
        lines.append(f"{name:8s}" + "".join(f"{cell(m.get(k), f):>9s}" for k, _, f, _ in EVAL_COLUMNS))
    diffs = [None if before.get(k) is None or after.get(k) is None else after[k] - before[k]
             for k, _, _, _ in EVAL_COLUMNS]
    lines.append(f"{'change':8s}" + "".join(f"{cell(v, f.replace('{:', '{:+')):>9s}"
                                            for v, (_, _, f, _) in zip(diffs, EVAL_COLUMNS)))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, a manifest with sizes and hashes, the last two kept

MANIFEST = "checkpoints.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over the target: a reader
    sees the old file or the complete new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_manifest(out_dir: Path) -> list[dict]:
    path = out_dir / MANIFEST
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["checkpoints"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint manifest ({e})") from None
    return entries


def model_state(model, args) -> dict:
    """Full (unsharded) parameters on CPU. Under FSDP every rank must call this; rank 0 gets the tensors."""
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def optimizer_state(model, optimizer, args) -> dict:
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def rng_state(generator: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "sampler": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["sampler"])


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, cursor: dict, generator, args,
                    d: Dist) -> Path | None:
    """Everything needed to continue bit for bit: weights, optimizer and scheduler state, every rank's
    RNG states and the data position. Collective (all ranks call it); rank 0 writes."""
    rngs = all_gather(d, rng_state(generator))
    if not (d.main or args.fsdp):  # FSDP gathers the full state collectively; DDP ranks hold identical copies
        return None
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, "model": model_state(model, args),
        "optimizer": optimizer_state(model, optimizer, args), "scheduler": scheduler.state_dict(),
        "cursor": dict(cursor), "rng": rngs, "args": vars(args).copy(), "world": d.world, "fsdp": args.fsdp,
    }
    state["args"].pop("compute_dtype", None)
    if not d.main:
        return None
    name = f"step_{step:06d}.pt"
    path = out_dir / name
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    entry = {"step": step, "file": name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
    entries = [e for e in read_manifest(out_dir) if e["step"] != step] + [entry]
    keep, drop = entries[-2:], entries[:-2]  # the new one and the previous one
    atomic_write_bytes(out_dir / MANIFEST, lambda f: f.write(json.dumps({"checkpoints": keep}, indent=1).encode()))
    for e in drop:  # only after the manifest no longer lists them
        (out_dir / e["file"]).unlink(missing_ok=True)
    return path


def load_checkpoint(spec: str, out_dir: Path) -> tuple[dict, Path]:
    """The checkpoint --resume names ("latest": the newest in OUT_DIR's manifest), verified against the
    manifest's size and SHA-256 before loading. A bad file is refused and left alone."""
    entries = read_manifest(out_dir)
    if spec == "latest":
        if not entries:
            raise CheckpointError(f"{out_dir / MANIFEST}: no checkpoint to resume from")
        entry = entries[-1]
        path = out_dir / entry["file"]
    else:
        path = Path(spec)
        entries = read_manifest(path.parent)
        entry = next((e for e in entries if e["file"] == path.name), None)
    others = [e["file"] for e in entries if entry is None or e["file"] != entry["file"]]
    hint = f"; the previous checkpoint {path.parent / others[-1]} is intact: --resume {path.parent / others[-1]}" \
        if others else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing{hint}")
    if entry is not None:
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes, the manifest says "
                                  f"{entry['bytes']}){hint}")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: corrupt checkpoint (SHA-256 differs from the manifest){hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are pickled
    except Exception as e:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train.py checkpoint (format {CHECKPOINT_FORMAT})")
    return state, path


def restore(state: dict, model, optimizer, scheduler, generator, args, d: Dist) -> None:
    if state["fsdp"] != args.fsdp:
        raise CheckpointError(f"checkpoint was written with fsdp={state['fsdp']}; resume with the same --fsdp setting")
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world"] == d.world:
        set_rng_state(state["rng"][d.rank], generator)
    else:
        rank0_print(d, f"warning: checkpoint was written by {state['world']} ranks, this run has {d.world}: "
                       "sampling RNG streams restart (the run continues, but not bit for bit)")


def export_final(model, tokenizer, path: Path, args, d: Dist) -> None:
    """Hugging Face directory (config.json + safetensors + tokenizer) for sample.py, eval.py, transformers,
    vLLM. Collective under FSDP (gathering the weights)."""
    if not (d.main or args.fsdp):
        return
    state = model_state(model, args)
    if not d.main:
        return
    config = unwrap(model).model.config
    with torch.device("meta"):
        from nano_gtalign.model import Transformer
        plain = Transformer(config)
    prefix = "model."
    plain.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, assign=True)
    plain.init_buffers("cpu")
    save_pretrained(plain, tokenizer, path)


# -----------------------------------------------------------------------------
# logging


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_metrics(step: int, total: int, ro_sums: dict, up: dict, lr: float, elapsed: float, step_time: float,
                 eta: float, args) -> dict:
    """One step's numbers, already summed over ranks."""
    n, scored, tok = ro_sums["rows"], max(ro_sums["scored"], 1), max(up["tokens"], 1)
    opt = max(up["opt_steps"], 1)
    return {
        "kind": "train", "step": step, "steps": total, "lr": lr, "time": elapsed, "step_time": step_time,
        "prompts_per_s": ro_sums["groups"] / step_time, "tokens_per_s": ro_sums["completion_tokens"] / step_time,
        "gen_tokens_per_s": ro_sums["completion_tokens"] / max(ro_sums["gen_time"], 1e-9),
        "update_tokens_per_s": ro_sums["completion_tokens"] * args.ppo_epochs / max(up["update_time"], 1e-9),
        "W": ro_sums["W"] / scored, "U": ro_sums["U"] / scored, "L": ro_sums["L"] / scored,
        "answer": ro_sums["answer"] / scored, "format": ro_sums["format"] / n,
        "DA": ro_sums["DA"] / n, "CQ": ro_sums["CQ"] / n, "AQ": ro_sums["AQ"] / n,
        "completion_len": ro_sums["completion_tokens"] / n, "truncated": ro_sums["truncated"] / n,
        "judge_failed": int(ro_sums["judge_failed"]), "zero_spread_groups": int(ro_sums["zero_spread_groups"]),
        "train_rows": int(ro_sums["train_rows"]),
        "kl": up["kl"] / tok if args.kl_coef > 0 else None,
        "approx_kl": up["approx_kl"] / tok, "clip_frac": up["clip"] / tok, "entropy": up["entropy"] / tok,
        "logp_mismatch": up["mismatch"] / max(up["mismatch_tokens"], 1), "grad_norm": up["grad_norm"] / opt, "loss": up["loss"] / opt,
        "opt_steps": int(up["opt_steps"]),
        "gen_time": ro_sums["gen_time"], "score_time": ro_sums["score_time"], "update_time": up["update_time"],
        "eta_s": eta,
    }


def console_line(m: dict) -> str:
    kl = "-" if m["kl"] is None else f"{m['kl']:.4f}"
    return (f"step {m['step']:4d}/{m['steps']} | {m['prompts_per_s']:5.2f} p/s {m['tokens_per_s']:6.0f} tok/s | "
            f"W {m['W']:.3f} U {m['U']:.3f} L {m['L']:.3f} | fmt {m['format']:.2f} ans {m['answer']:.2f} | "
            f"DA {m['DA']:.2f} CQ {m['CQ']:.2f} AQ {m['AQ']:.2f} | len {m['completion_len']:5.1f} | kl {kl} | "
            f"clip {m['clip_frac']:.3f} | gnorm {m['grad_norm']:.3f} | lr {m['lr']:.1e} | "
            f"{m['step_time']:.1f}s eta {fmt_time(m['eta_s'])}")


def eval_line(step: int, m: dict) -> str:
    def cell(v, f="{:.3f}"):
        return "-" if v is None else f.format(v)
    return (f"eval step {step} | n {m['n']} | W {cell(m['welfare'])} U {cell(m['user'])} L {cell(m['llm'])} | "
            f"answer {cell(m['answer_llm'])} | act_DQ {cell(m['action_ok_DQ'])} act_VQ {cell(m['action_ok_VQ'])} | "
            f"format {cell(m['format_rate'])} | reas_ch {cell(m['reasoning_chars'], '{:.0f}')} | "
            f"tokens {cell(m['completion_tokens'], '{:.1f}')}")


def combine(d: Dist, stats: dict, same=("grad_norm", "opt_steps"),
            slowest=("gen_time", "score_time", "update_time")) -> dict:
    """Sum per-rank numbers over ranks; times are the slowest rank's; some are identical on every rank."""
    if not d.on:
        return dict(stats)
    parts = all_gather(d, stats)
    return {k: stats[k] if k in same else max(p[k] for p in parts) if k in slowest else sum(p[k] for p in parts)
            for k in stats}


def lr_factor(opt_step: int, total: int, args) -> float:
    """Linear warm-up from 0 over --warmup-steps optimizer steps, then constant or cosine to min_lr_ratio."""
    if opt_step < args.warmup_steps:
        return (opt_step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (opt_step - args.warmup_steps) / max(1, total - args.warmup_steps))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MetricsLog:
    """OUT_DIR/metrics.jsonl (rank 0): one JSON line per training step and per evaluation."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():  # drop lines written after the checkpoint we resume from
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evals(self) -> list[dict]:
        if not self.enabled or not self.path.exists():
            return []
        lines = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        return [ln for ln in lines if ln["kind"] == "eval"]


# -----------------------------------------------------------------------------
# the built-in demo


def prepare_demo(args, d: Dist, warm: bool):
    """Task records, BPE tokenizer, tiny Qwen2 model, supervised warm-start (data/demo/). Every rank
    builds the same (seeded) tokenizer and model; rank 0's weights are then broadcast so that the ranks
    start identical whatever float differences the warm-start had."""
    from data.demo.build import build_tokenizer, demo_corpus, demo_model_config
    from data.demo.sft import warm_start
    from data.demo.task import make_split, write_jsonl
    from data.demo.transcripts import make_transcripts
    from nano_gtalign.model import Transformer

    t0 = time.perf_counter()
    train = make_split(args.demo_train_size, args.seed, "train")
    test = make_split(args.eval_size, args.seed, "test")
    completions = [t.completion for t in make_transcripts(train, seed=args.seed)]
    tokenizer = build_tokenizer(demo_corpus(train, completions))
    torch.manual_seed(args.seed)
    model = Transformer(demo_model_config(tokenizer.vocab_size))
    rank0_print(d, f"demo: {len(train)} train / {len(test)} test questions, vocab {tokenizer.vocab_size}, "
                   f"model {model.num_parameters() / 1e6:.2f}M parameters")
    if warm:
        stats = warm_start(model, tokenizer, train, completions, steps=args.sft_steps, seed=args.seed,
                           log_every=25 if d.main else 0)
        rank0_print(d, f"demo: warm-start {stats.steps} steps in {stats.seconds:.0f}s, "
                       f"loss {stats.first_loss:.3f} -> {stats.final_loss:.3f}")
    if d.on:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    if d.main:
        write_jsonl(test, Path(args.out_dir) / "test.jsonl")  # where eval.py looks by default
    rank0_print(d, f"demo: ready in {time.perf_counter() - t0:.0f}s")
    return model, tokenizer, train, test


# -----------------------------------------------------------------------------
# main


@dataclass
class RunResult:
    policy: nn.Module                  # the trained module (DDP/FSDP-wrapped under torchrun)
    history: list[dict]                # per-step metrics of this run
    evals: list[dict]                  # evaluation lines (from metrics.jsonl, across resumes)
    table: str | None                  # before/after table when there were two evaluations
    out_dir: Path
    final_dir: Path | None             # the exported Hugging Face directory (None when halted early)


def load_data(args, tokenizer, d: Dist):
    train = [r for path in args.data for r in read_records(path)]
    if args.eval_data:
        evals = [r for path in args.eval_data for r in read_records(path)]
    else:  # a seeded hold-out of the training file
        order = np.random.default_rng([args.seed, 1]).permutation(len(train)).tolist()
        held = set(order[:args.holdout])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return train, evals


def run(args, d: Dist) -> RunResult:
    args.compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                          "auto": torch.bfloat16 if d.device.type == "cuda" else torch.float32}[args.dtype]
    if args.fsdp:
        if not d.on:
            raise UsageError("--fsdp needs several processes: torchrun --nproc_per_node=N train.py --fsdp ...")
        fsdp_api()
    if args.prompts_per_step % d.world or args.mini_batch_size % d.world:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} and --mini-batch-size {args.mini_batch_size} "
                         f"must be multiples of the number of ranks ({d.world})")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    shown = {k: v for k, v in vars(args).items() if k != "compute_dtype"}
    rank0_print(d, "config: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    rank0_print(d, f"ranks {d.world} | device {d.device} | compute {str(args.compute_dtype).removeprefix('torch.')} | "
                   f"{'FSDP2' if args.fsdp else 'DDP' if d.on else 'single process'}")

    if args.demo:
        model, tokenizer, train, evals = prepare_demo(args, d, warm=args.resume is None)
    else:
        tokenizer = load_tokenizer(args.model)
        # Straight onto this rank's device: eight ranks each holding an fp32 copy in CPU memory would not fit.
        model = load_pretrained(args.model, dtype=torch.float32, device=d.device)
        train, evals = load_data(args, tokenizer, d)
    if args.judge == "rule":
        unscorable = sorted({r["data_source"] for r in train + evals if canonical_task(r["data_source"]) not in RULE_TASKS})
        if unscorable:
            raise UsageError(f"the rule judge cannot score data_source {', '.join(unscorable)}; "
                             "pass --judge http://HOST:PORT/v1 (an OpenAI-compatible server)")
        judge = make_judge("rule")
    else:
        judge = make_judge(args.judge, timeout=args.judge_timeout, max_concurrency=args.judge_concurrency)
        try:
            judge.check()  # fail fast: an unreachable judge would otherwise turn every sample into a failure
        except JudgeUnavailableError as e:
            raise UsageError(str(e)) from None
    train, train_ids, dropped = encode_prompts(train, tokenizer, args.max_prompt_tokens)
    evals, eval_ids, dropped_eval = encode_prompts(evals[:args.eval_size], tokenizer, args.max_prompt_tokens)
    if dropped or dropped_eval:
        rank0_print(d, f"dropped {dropped} train / {dropped_eval} eval prompts over --max-prompt-tokens {args.max_prompt_tokens}")
    if len(train) < args.prompts_per_step:
        raise UsageError(f"{len(train)} training records, fewer than --prompts-per-step {args.prompts_per_step}")
    longest = max(len(x) for x in train_ids + eval_ids)
    limit = model.config.max_position_embeddings
    if longest + args.max_new_tokens > limit:
        raise UsageError(f"the longest prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's max_position_embeddings ({limit}); lower --max-new-tokens or --max-prompt-tokens")
    total_steps = args.steps or len(train) // args.prompts_per_step
    rank0_print(d, f"data: {len(train)} train records, {len(evals)} eval records, {total_steps} steps")

    model = model.to(device=d.device, dtype=torch.float32)
    policy = Policy(model, args.compute_dtype, args.logprob_backend)
    ref = None
    if args.kl_coef > 0:  # the frozen initial policy
        ref = Policy(copy.deepcopy(model).requires_grad_(False).eval(), args.compute_dtype, args.logprob_backend)
    if args.fsdp:
        shard(policy, d)
        if ref is not None:
            shard(ref, d)
        trained = policy
    elif d.on:
        # The only buffer is the RoPE table, the same on every rank: no need to broadcast it each forward.
        trained = nn.parallel.DistributedDataParallel(policy, device_ids=[d.device.index] if d.device.type == "cuda"
                                                      else None, broadcast_buffers=False)
    else:
        trained = policy
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                  weight_decay=args.weight_decay)
    opt_per_step = args.prompts_per_step // args.mini_batch_size * args.ppo_epochs
    total_opt = total_steps * opt_per_step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_opt, args))
    # Per-rank sampling stream; its state is checkpointed so a resumed run draws the same tokens.
    generator = torch.Generator(device=d.device).manual_seed(args.seed * 1000 + d.rank)
    cursor, start = {"epoch": 0, "pos": 0}, 0
    if args.resume:
        state, path = load_checkpoint(args.resume, out_dir)
        restore(state, trained, optimizer, scheduler, generator, args, d)
        cursor, start = dict(state["cursor"]), state["step"]
        changed = {k: (state["args"].get(k), v) for k, v in shown.items()
                   if k not in ("resume", "halt_after", "steps", "eval_every", "save_every", "wandb", "device")
                   and state["args"].get(k) != v}
        rank0_print(d, f"resumed from {path} at step {start}" + (f"; changed flags: {changed}" if changed else ""))
    log = MetricsLog(out_dir / "metrics.jsonl", start if args.resume else None, d.main)
    wandb = None
    if args.wandb and d.main:
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb needs the wandb package (pip install wandb)") from None
        wandb.init(project=args.wandb, config=shown, dir=str(out_dir), resume="allow")

    def do_eval(step: int) -> None:
        if not evals:
            return
        m = evaluate(policy, tokenizer, evals, eval_ids, args, judge, d)
        log.write({"kind": "eval", "step": step, **m})
        rank0_print(d, eval_line(step, m))
        if wandb:
            wandb.log({f"eval/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, step=step)

    if args.eval_every >= 0 and not args.resume:
        do_eval(0)
    history: list[dict] = []
    t_start = time.perf_counter()
    step = start
    for step in range(start + 1, total_steps + 1):
        t0 = time.perf_counter()
        idx = next_prompts(cursor, len(train), args.prompts_per_step, args.seed)
        share = args.prompts_per_step // d.world
        mine = idx[d.rank * share: (d.rank + 1) * share]
        ro = rollout(policy, tokenizer, [train[i] for i in mine], [train_ids[i] for i in mine], args, judge,
                     generator, d)
        up = update(trained, ref, optimizer, scheduler, ro, args, tokenizer.pad_token_id, d)
        ro_sums, up = combine(d, ro.stats), combine(d, up)
        now = time.perf_counter()
        done = step - start
        eta = (now - t_start) / done * (total_steps - step)
        m = step_metrics(step, total_steps, ro_sums, up, scheduler.get_last_lr()[0], now - t_start, now - t0, eta, args)
        history.append(m)
        log.write(m)
        rank0_print(d, console_line(m))
        if wandb:
            wandb.log({f"train/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, step=step)
        if args.eval_every > 0 and step % args.eval_every == 0 and step != total_steps:
            do_eval(step)
        halting = args.halt_after is not None and done == args.halt_after and step != total_steps
        if halting or (args.save_every > 0 and step % args.save_every == 0):
            saved = save_checkpoint(out_dir, step, trained, optimizer, scheduler, cursor, generator, args, d)
            if saved:
                rank0_print(d, f"saved {saved}")
        if halting:
            rank0_print(d, f"halted after {done} steps; continue with --resume")
            return RunResult(trained, history, log.evals(), None, out_dir, None)

    if args.eval_every >= 0 and step == total_steps and (step != start or not args.resume):
        do_eval(total_steps)
    final = out_dir / "final"
    export_final(trained, tokenizer, final, args, d)
    rank0_print(d, f"saved the final model to {final} (Hugging Face format)")
    evals_logged = log.evals()
    table = None
    if len(evals_logged) >= 2:
        table = format_eval_table(evals_logged[0], evals_logged[-1])
        mode = "greedy" if args.eval_temperature == 0 else \
            f"sampled at temperature {args.eval_temperature:g}, {args.eval_samples} per prompt"
        rank0_print(d, f"\nheld-out evaluation, {len(evals)} prompts, {mode} (step {evals_logged[0]['step']} vs "
                       f"step {evals_logged[-1]['step']}):")
        rank0_print(d, table)
    if wandb:
        wandb.finish()
    return RunResult(trained, history, evals_logged, table, out_dir, final)


def main(argv: list[str] | None = None) -> RunResult:
    args = parse_args(argv)
    d = setup_distributed(args.device)
    try:
        return run(args, d)
    finally:
        if d.initialized_here:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (UsageError, CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun (gloo), a worker thread of torch's process group can still be releasing the last
        # collective's tensors when Python finalizes, which aborts the process ("terminate called without
        # an active exception", seen in about 1 run in 10). Everything is written and flushed: skip finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
