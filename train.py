"""GRPO (or PPO) training of a Qwen2/Qwen3 model with the GTAlign welfare reward, on CPU, one GPU or many.

    python train.py                                         # the built-in demo (5 to 15 minutes on 2 CPU cores)
    python train.py --algo ppo                              # the demo with PPO: a value model and GAE
    python train.py --model DIR --data train.jsonl --eval-data test.jsonl --judge http://localhost:8000/v1
    torchrun --nproc_per_node=8 train.py --model DIR --data train.jsonl --eval-data test.jsonl \
        --judge http://localhost:8000/v1#Qwen/Qwen3-32B --prompts-per-step 512 --mini-batch-size 32
    torchrun --nproc_per_node=8 train.py --fsdp ...         # shard parameters, grads and optimizer state
    python train.py --resume                                # continue OUT_DIR's latest checkpoint exactly

Without --model, train.py runs the demo (data/demo/prepare.py): the synthetic arith_demo task, a BPE
tokenizer and a tiny Qwen2-style model warm-started on imperfect four-block transcripts, then GRPO with the
Cobb-Douglas welfare and the rule judge. The demo changes a few defaults (DEMO_DEFAULTS below); a flag given
on the command line always wins.

One step (docs/grpo.md):
  1. take --prompts-per-step records (sharded across ranks) and sample --group-size completions for each;
  2. score every completion: four-block format, payoff matrix, the judge's verdict -> U, L, W
     (a failed judgement is counted and its sample left out of the update, unless --judge-failure zero);
  3. advantages within each group of G: A = (W - mean) / (std + eps);
  4. --ppo-epochs passes over mini-batches of --mini-batch-size prompts, one optimizer step each, split into
     micro-batches of --micro-batch-size rows; token log-probs come from the fused kernel (docs/logprobs.md).
With --algo ppo (the paper's algorithm, nano_gtalign/ppo.py) step 3 is a value model's GAE instead, one sample
per prompt by default, and the value model trains beside the policy.

This file is wiring: flags, setup, the loop, the export. The machinery lives in nano_gtalign/ (rollout.py,
update.py, ppo.py, evaluate.py, checkpoint.py, distributed.py, report.py, data.py).
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data.demo import DEMO_OUT_DIR
from nano_gtalign import grpo
from nano_gtalign.checkpoint import export_final, load_checkpoint, prepare_out_dir, restore, save_checkpoint
from nano_gtalign.data import Cursor, encode_for_run, next_prompts, read_splits
from nano_gtalign.distributed import (Dist, exit_after_torchrun, print0, reduce_stats, setup_distributed, teardown,
                                      unwrap, wrap_for_training)
from nano_gtalign.errors import UsageError
from nano_gtalign.evaluate import EvalConfig, evaluate_policy
from nano_gtalign.http_judge import open_judge_from_flags
from nano_gtalign.interrupts import StopOnSignal
from nano_gtalign.judges import add_judge_arguments
from nano_gtalign.loader import CheckpointError, export_defaults, load_pretrained, load_tokenizer
from nano_gtalign.policy import LOGPROB_BACKENDS, Policy, compute_dtype
from nano_gtalign.ppo import VALUE_HEAD_FILE, CriticTrainer, PPOConfig, make_critic, ppo_update
from nano_gtalign.report import (SAME_ON_EVERY_RANK, MetricsLog, console_line, eval_lines, format_eval_table,
                                  judge_failure_rate, step_metrics)
from nano_gtalign.reward import BLEUS, LLM_REWARDS, WELFARES
from nano_gtalign.rollout import RolloutConfig, rollout
from nano_gtalign.update import UpdateConfig, make_optimizer, update

# Demo defaults, applied only to flags not given on the command line. A tiny model learns fast with a large
# learning rate; the KL to the warm-started model holds its behaviour where the reward says nothing (the
# model cannot yet do the arithmetic, so answering or asking score alike on clear questions, and without
# the KL the strong "ask on vague questions" signal leaks into clear ones). The demo evaluates the policy
# it trains, sampled at temperature 1 (4 completions per held-out prompt, the same draws before and after),
# before and after training only. KL 0.2, not 0.1: with 0.1 the run drifted to asking on clear questions
# too (held-out act_DQ 0.85 -> 0.54); 0.2 kept it (0.85 -> 0.90) with a larger welfare gain (bench/RESULTS.md).
DEMO_DEFAULTS = dict(
    out_dir=DEMO_OUT_DIR, lr=6e-4, warmup_steps=2, steps=40, prompts_per_step=16, group_size=8,
    micro_batch_size=64, gen_batch_size=0, max_new_tokens=160, max_prompt_tokens=256, kl_coef=0.2,
    eval_every=0, eval_size=64, eval_batch_size=64, eval_temperature=1.0, eval_samples=4, save_every=0, threads=1,
)
# --algo ppo: one sample per prompt, as upstream (a learned value model is the baseline, not the group).
PPO_DEFAULTS = dict(group_size=1)
# The demo with PPO (bench/RESULTS.md has both demos' tables): 128 prompts x 1 sample, the same 128 samples a
# step as GRPO's 16 x 8 (16 x 1 drifted to answering vague questions: act_VQ 0.56 -> 0.35); the critic's lr
# scaled up with the actor's (upstream 2e-6 for 1e-6, here 1e-3 for 6e-4): at 2e-6 the value model does not
# move in 40 steps (explained variance 0.00) and the run is REINFORCE with whitened rewards.
DEMO_PPO_DEFAULTS = dict(prompts_per_step=128, critic_lr=1e-3)
# Flags that may differ between a run and its resumption without a warning.
RESUMABLE_FLAGS = ("resume", "halt_after", "steps", "eval_every", "save_every", "wandb", "device")


def flag_list(defaults: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in defaults.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GRPO training with the GTAlign welfare reward (no --model: the built-in demo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="demo defaults (no --model): " + flag_list(DEMO_DEFAULTS) + "; with --algo ppo: " +
               flag_list(PPO_DEFAULTS) + " (the demo also " + flag_list(DEMO_PPO_DEFAULTS) + ")",
    )
    a = p.add_argument_group("model and data")
    a.add_argument("--model", default=None, help="Hugging Face Qwen2/Qwen3 directory (omit for the demo)")
    a.add_argument("--data", nargs="+", default=None, help="training records: .jsonl or .parquet files (docs/data.md)")
    a.add_argument("--eval-data", nargs="+", default=None,
                   help="held-out records (files); without it --holdout records of --data are held out")
    a.add_argument("--holdout", type=int, default=64, help="records held out of --data when there is no --eval-data")
    a.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are dropped (and counted)")
    add_judge_arguments(a)  # --judge, its sampling (the paper's judge by default) and --judge-failure
    a.add_argument("--max-judge-failures", type=float, default=0.5,
                   help="stop (with a checkpoint) when more than this share of judgements failed over the last "
                        "--judge-failure-window steps (1: never)")
    a.add_argument("--judge-failure-window", type=int, default=3, help="steps the judge failure share is taken over")
    a = p.add_argument_group("reward")
    a.add_argument("--welfare", default="cobb_douglas", choices=WELFARES, help="W = sqrt(U L) | (U+L)/2 | U | L")
    a.add_argument("--llm-reward", default="main", choices=LLM_REWARDS, help="L as in the paper, or its ablation")
    a.add_argument("--bleu", default="char", choices=BLEUS, help="BLEU for the writing task's A_user")
    a.add_argument("--normalize-by-source", action="store_true", help="z-score W per data source over the step")
    a = p.add_argument_group("GRPO")
    a.add_argument("--steps", type=int, default=None, help="training steps (None: one pass over the data)")
    a.add_argument("--prompts-per-step", type=int, default=64, help="prompts per step, over all ranks")
    a.add_argument("--group-size", type=int, default=8, help="completions per prompt (G); 1 with --algo ppo")
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
    a.add_argument("--kl-estimator", default="k3", choices=grpo.KL_KINDS, help="k1, k2 or k3 (docs/grpo.md)")
    a.add_argument("--loss-agg", default="token-mean", choices=grpo.AGGREGATIONS,
                   help="token-mean over the whole step (DAPO), per-sequence mean, or Dr.GRPO's sum / max length")
    a.add_argument("--adv-std", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group std (--no-adv-std: Dr.GRPO)")
    a.add_argument("--adv-eps", type=float, default=1e-6, help="eps in (W - mean) / (std + eps)")
    a.add_argument("--drop-zero-spread", action="store_true", help="leave groups whose G rewards are equal out of the loss")
    a.add_argument("--mask-truncated", action="store_true", help="leave completions cut at --max-new-tokens out of the loss")
    a.add_argument("--old-logp", default="recompute", choices=("recompute", "sampler"),
                   help="old log-probs when a rollout feeds several optimizer steps")
    a = p.add_argument_group("PPO (--algo ppo: a value model and GAE instead of group advantages)")
    a.add_argument("--algo", default="grpo", choices=("grpo", "ppo"), help="GRPO, or PPO as in the paper's runs")
    a.add_argument("--critic-model", default=None, metavar="DIR",
                   help="the value model's start (default: a copy of the initial policy)")
    a.add_argument("--critic-lr", type=float, default=2e-6, help="the value model's peak learning rate")
    a.add_argument("--value-clip", type=float, default=0.5, help="clip of the value change in the loss (0 = off)")
    a.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    a.add_argument("--lam", type=float, default=1.0, help="GAE lambda")
    a.add_argument("--critic-warmup", type=int, default=0, help="first steps that train only the value model")
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
    a.add_argument("--logprob-backend", default="auto", choices=LOGPROB_BACKENDS,
                   help="fused kernel backend; naive = full log_softmax (for comparison)")
    a.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default). On a busy or 2-core CPU, 1 avoids "
                        "threads waiting on each other")
    a.add_argument("--seed", type=int, default=0, help="data order, sampling and the demo's task/model")
    a = p.add_argument_group("evaluation, logging, checkpoints")
    a.add_argument("--export-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of OUT_DIR/final (auto: the --model checkpoint's; the demo's fp32)")
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


DEMO_ONLY_FLAGS = ("demo_train_size", "sft_steps")
PPO_ONLY_FLAGS = ("critic_model", "critic_lr", "value_clip", "gamma", "lam", "critic_warmup")


def applicable_flags(args: argparse.Namespace) -> dict:
    """The flags this run reads: the demo's only without --model, the value model's only with --algo ppo."""
    skip = (DEMO_ONLY_FLAGS if args.model else ()) + (PPO_ONLY_FLAGS if args.algo != "ppo" else ())
    return {k: v for k, v in vars(args).items() if k not in skip}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Two passes: whether --model and --algo ppo are given decides which defaults the full parser uses.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--algo", default="grpo")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    demo, ppo = known.model is None, known.algo == "ppo"
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        demo = ppo = False  # --help lists the real-run defaults; the epilog lists the demo's and PPO's overrides
    parser.set_defaults(**(DEMO_DEFAULTS if demo else {}) | (PPO_DEFAULTS if ppo else {}) |
                        (DEMO_PPO_DEFAULTS if demo and ppo else {}))
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.model is None and (args.data or args.eval_data):
        raise UsageError("--data/--eval-data need --model (the demo writes its own task)")
    if args.model is not None and not args.data:
        raise UsageError("--model needs --data (training records, .jsonl or .parquet)")
    for name in ("prompts_per_step", "group_size", "micro_batch_size", "ppo_epochs", "max_new_tokens",
                 "max_prompt_tokens", "eval_size", "eval_batch_size", "eval_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_temperature < 0 or (args.eval_temperature == 0 and args.eval_samples > 1):
        raise UsageError("--eval-temperature must be >= 0, and > 0 when --eval-samples > 1 (greedy draws are identical)")
    if args.gen_batch_size < 0:
        raise UsageError(f"--gen-batch-size must be >= 0 (0: one call), got {args.gen_batch_size}")
    mini = args.mini_batch_size or args.prompts_per_step
    if mini < 1 or args.prompts_per_step % mini:
        raise UsageError(f"--mini-batch-size {mini} must divide --prompts-per-step {args.prompts_per_step}")
    for name in ("steps", "halt_after"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 for GRPO sampling, got {args.temperature}")
    if args.old_logp == "sampler" and (args.top_k or args.top_p < 1):
        raise UsageError("--old-logp sampler needs --top-k 0 --top-p 1: the sampler's log-probs are then "
                         "under a truncated distribution, not the policy's")
    if args.lr <= 0 or args.warmup_steps < 0 or not 0 <= args.min_lr_ratio <= 1:
        raise UsageError("need --lr > 0, --warmup-steps >= 0 and 0 <= --min-lr-ratio <= 1")
    if args.kl_coef < 0:
        raise UsageError(f"--kl-coef must be >= 0, got {args.kl_coef}")
    if not 0 <= args.max_judge_failures <= 1 or args.judge_failure_window < 1:
        raise UsageError("need 0 <= --max-judge-failures <= 1 and --judge-failure-window >= 1")
    if args.algo == "grpo" and args.critic_model:
        raise UsageError("--critic-model needs --algo ppo (GRPO has no value model)")
    if args.algo == "ppo" and args.drop_zero_spread:
        raise UsageError("--drop-zero-spread compares a prompt's G samples; with --algo ppo the value model is the "
                         "baseline (and with G = 1 every group would be dropped)")
    if args.critic_lr <= 0 or args.value_clip < 0 or args.critic_warmup < 0:
        raise UsageError("need --critic-lr > 0, --value-clip >= 0 and --critic-warmup >= 0")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        raise UsageError(f"need 0 <= --gamma <= 1 and 0 <= --lam <= 1, got {args.gamma} and {args.lam}")


def check_world(args: argparse.Namespace, d: Dist) -> None:
    if args.fsdp and not d.on:
        raise UsageError("--fsdp needs several processes: torchrun --nproc_per_node=N train.py --fsdp ...")
    mini = args.mini_batch_size or args.prompts_per_step
    if args.prompts_per_step % d.world or mini % d.world:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} and --mini-batch-size {mini} "
                         f"must be multiples of the number of ranks ({d.world})")


def load_model_and_data(args: argparse.Namespace, d: Dist):
    """(model, tokenizer, train records, eval records): the demo's, or --model's and --data's."""
    if args.model is None:
        from data.demo.prepare import prepare_demo
        return prepare_demo(seed=args.seed, train_size=args.demo_train_size, test_size=args.eval_size,
                            sft_steps=args.sft_steps, out_dir=Path(args.out_dir), warm=args.resume is None, d=d)
    tokenizer = load_tokenizer(args.model)
    # Straight onto this rank's device: eight ranks each holding an fp32 copy in CPU memory would not fit.
    model = load_pretrained(args.model, dtype=torch.float32, device=d.device)
    train, evals = read_splits(args.data, args.eval_data, args.holdout, args.seed)
    return model, tokenizer, train, evals


def build_policy(model: nn.Module, args, dtype: torch.dtype, d: Dist):
    """(trained module, frozen KL reference or None, PPO's value model or None): DDP or FSDP2 under torchrun,
    the plain modules otherwise."""
    model = model.to(device=d.device, dtype=torch.float32)
    policy = Policy(model, dtype, args.logprob_backend)
    ref = critic = None
    if args.kl_coef > 0:  # the frozen initial policy
        ref = Policy(copy.deepcopy(model).requires_grad_(False).eval(), dtype, args.logprob_backend)
    if args.algo == "ppo":  # copied (or loaded) before the policy is sharded
        critic = make_critic(model, args.critic_model, d.device)
    return tuple(m if m is None else wrap_for_training(m, args.fsdp, d) for m in (policy, ref, critic))


@dataclass
class RunResult:
    policy: nn.Module                  # the trained module (DDP/FSDP-wrapped under torchrun)
    history: list[dict]                # per-step metrics of this run
    evals: list[dict]                  # evaluation lines (from metrics.jsonl, across resumes)
    table: str | None                  # before/after table when there were two evaluations
    out_dir: Path
    final_dir: Path | None             # the exported Hugging Face directory (None when halted early)
    exit_code: int = 0                 # 3: the judge kept failing; 128 + N: stopped by signal N
    critic: nn.Module | None = None    # PPO's value model (wrapped like the policy)


def run(args: argparse.Namespace, d: Dist) -> RunResult:
    # ---- setup
    check_world(args, d)
    dtype = compute_dtype(args.dtype, d.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if d.main:
        for stale in prepare_out_dir(out_dir):
            print0(d, f"removed {stale} (left by an interrupted save)")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    flags = vars(args)   # all of them go into checkpoints and metrics.jsonl; the console shows what applies
    print0(d, "config: " + " ".join(f"{k}={v}" for k, v in applicable_flags(args).items()))
    print0(d, f"ranks {d.world} | device {d.device} | compute {str(dtype).removeprefix('torch.')} | "
              f"{'FSDP2' if args.fsdp else 'DDP' if d.on else 'single process'}")
    model, tokenizer, train, evals = load_model_and_data(args, d)
    judge = open_judge_from_flags(args, sources=[r["data_source"] for r in train + evals])
    train, train_ids, evals, eval_ids = encode_for_run(
        train, evals, tokenizer, max_prompt_tokens=args.max_prompt_tokens, eval_size=args.eval_size, seed=args.seed,
        prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
        max_positions=model.config.max_position_embeddings, evaluate=args.eval_every >= 0, log=lambda m: print0(d, m))
    total_steps = args.steps or len(train) // args.prompts_per_step
    print0(d, f"data: {len(train)} train records, {len(evals)} eval records, {total_steps} steps")

    trained, ref, critic_module = build_policy(model, args, dtype, d)
    policy = unwrap(trained)  # what samples; `trained` (the DDP wrapper under torchrun) is what the optimizer steps
    mini_batches = args.prompts_per_step // (args.mini_batch_size or args.prompts_per_step)
    opt_per_step = mini_batches * args.ppo_epochs
    actor_steps = total_steps - (args.critic_warmup if args.algo == "ppo" else 0)  # --critic-warmup: no actor steps
    adamw = dict(betas=(args.beta1, args.beta2), weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                 schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio)
    optimizer, scheduler = make_optimizer(trained, lr=args.lr, total_steps=max(actor_steps, 0) * opt_per_step, **adamw)
    critic = None if critic_module is None else CriticTrainer(critic_module, *make_optimizer(
        critic_module, lr=args.critic_lr, total_steps=total_steps * opt_per_step, **adamw))
    # Per-rank sampling stream; its state is checkpointed so a resumed run draws the same tokens.
    generator = torch.Generator(device=d.device).manual_seed(args.seed * 1000 + d.rank)
    cursor, start = Cursor(), 0
    if args.resume:
        state, path = load_checkpoint(args.resume, out_dir)
        cursor, start = restore(state, trained, optimizer, scheduler, generator, args.fsdp, d, critic), state["step"]
        changed = {k: (state["args"].get(k), v) for k, v in flags.items()
                   if k not in RESUMABLE_FLAGS and state["args"].get(k) != v}
        print0(d, f"resumed from {path} at step {start}" + (f"; changed flags: {changed}" if changed else ""))
    log = MetricsLog(out_dir / "metrics.jsonl", start if args.resume else None, d.main, args.wandb, flags)

    rollout_cfg = RolloutConfig(
        group_size=args.group_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, gen_batch_size=args.gen_batch_size, welfare=args.welfare,
        llm_reward=args.llm_reward, bleu=args.bleu, normalize_by_source=args.normalize_by_source,
        adv_eps=args.adv_eps, adv_std=args.adv_std, drop_zero_spread=args.drop_zero_spread,
        mask_truncated=args.mask_truncated, judge_failure=args.judge_failure, fsdp=args.fsdp, compute_dtype=dtype)
    ppo_cfg = PPOConfig(gamma=args.gamma, lam=args.lam, value_clip=args.value_clip, critic_warmup=args.critic_warmup,
                        normalize_by_source=args.normalize_by_source)
    update_cfg = UpdateConfig(
        mini_batches=mini_batches, epochs=args.ppo_epochs, micro_batch_size=args.micro_batch_size,
        clip_low=args.clip_low, clip_high=args.clip_high, dual_clip=args.dual_clip or None, kl_coef=args.kl_coef,
        kl_estimator=args.kl_estimator, loss_agg=args.loss_agg, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, old_logp=args.old_logp, grad_clip=args.grad_clip,
        grad_checkpointing=args.grad_checkpointing, fsdp=args.fsdp, compute_dtype=dtype)
    eval_cfg = EvalConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.eval_temperature, samples=args.eval_samples,
        batch_size=args.eval_batch_size, seed=args.seed, welfare=args.welfare, llm_reward=args.llm_reward,
        bleu=args.bleu, judge_failure=args.judge_failure, fsdp=args.fsdp, compute_dtype=dtype)

    def do_eval(step: int) -> None:
        if not evals:
            return
        m = evaluate_policy(policy, tokenizer, evals, eval_ids, eval_cfg, judge, d)
        log.write({"kind": "eval", "step": step, **m})
        for line in eval_lines(step, m):
            print0(d, line)

    # ---- the loop: prompts -> generate -> score -> advantages -> update -> log / evaluate / checkpoint
    if args.eval_every >= 0 and not args.resume:
        do_eval(0)
    history: list[dict] = []
    t_start = time.perf_counter()
    step = start
    with StopOnSignal() as signals:
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            idx = next_prompts(cursor, len(train), args.prompts_per_step, args.seed)
            share = args.prompts_per_step // d.world
            mine = idx[d.rank * share: (d.rank + 1) * share]
            ro = rollout(policy, tokenizer, [train[i] for i in mine], [train_ids[i] for i in mine], rollout_cfg,
                         judge, generator, d)
            if critic is None:
                up = update(trained, ref, optimizer, scheduler, ro, update_cfg, tokenizer.pad_token_id, d)
            else:
                up = ppo_update(trained, ref, optimizer, scheduler, critic, ro, update_cfg, ppo_cfg, step,
                                tokenizer.pad_token_id, d)
            now, done = time.perf_counter(), step - start
            m = step_metrics(step, total_steps, reduce_stats(d, ro.stats), reduce_stats(d, up, SAME_ON_EVERY_RANK),
                             lr=scheduler.get_last_lr()[0], elapsed=now - t_start, step_time=now - t0,
                             eta=(now - t_start) / done * (total_steps - step), epochs=args.ppo_epochs,
                             with_kl=args.kl_coef > 0)
            history.append(m)
            log.write(m)
            print0(d, console_line(m))
            if args.eval_every > 0 and step % args.eval_every == 0 and step != total_steps:
                do_eval(step)
            # Stop early, with a checkpoint: a persistently failing judge, a signal, or --halt-after.
            failing = judge_failure_rate(history, args.judge_failure_window)
            judge_down = failing is not None and failing > args.max_judge_failures
            interrupted = signals.requested(d)
            halting = args.halt_after is not None and done == args.halt_after and step != total_steps
            if judge_down or interrupted or halting or (args.save_every > 0 and step % args.save_every == 0):
                saved = save_checkpoint(out_dir, step, trained, optimizer, scheduler, cursor, generator, flags,
                                        args.fsdp, d, critic)
                if saved:
                    print0(d, f"saved {saved}")
            if judge_down:
                example = next((s.judge_error for s in ro.scores if s.judge_failed), None)
                print0(d, f"stopped after step {step}: the judge failed on {failing:.0%} of the last "
                          f"{args.judge_failure_window} steps' samples (over --max-judge-failures "
                          f"{args.max_judge_failures:g}); {example or 'see judge_failed in metrics.jsonl'}. "
                          "Fix the judge, then continue with --resume")
                return RunResult(trained, history, log.evals(), None, out_dir, None, exit_code=3)
            if interrupted:
                print0(d, f"interrupted by {signals.name} after step {step}; continue with --resume")
                return RunResult(trained, history, log.evals(), None, out_dir, None, exit_code=signals.exit_code)
            if halting:
                print0(d, f"halted after {done} steps; continue with --resume")
                return RunResult(trained, history, log.evals(), None, out_dir, None, critic=critic_module)

    # ---- export and the before/after table
    if args.eval_every >= 0 and step == total_steps and (step != start or not args.resume):
        do_eval(total_steps)
    final = out_dir / "final"
    keep = export_defaults(args.model) if args.model else None  # the input's dtype and sampling defaults
    dtype = (keep and keep.dtype) if args.export_dtype == "auto" else args.export_dtype
    export_final(trained, tokenizer, final, args.fsdp, d, dtype=dtype,
                 generation_config=keep.generation_config if keep else None)
    print0(d, f"saved the final model to {final} (Hugging Face format)")
    if critic is not None:
        export_final(critic.module, tokenizer, out_dir / "final_critic", args.fsdp, d, head_file=VALUE_HEAD_FILE)
        print0(d, f"saved the value model to {out_dir / 'final_critic'} (--critic-model loads it)")
    evals_logged = log.evals()
    table = None
    if len(evals_logged) >= 2:
        table = format_eval_table(evals_logged[0], evals_logged[-1])
        mode = "greedy" if args.eval_temperature == 0 else \
            f"sampled at temperature {args.eval_temperature:g}, {args.eval_samples} per prompt"
        print0(d, f"\nheld-out evaluation, {len(evals)} prompts, {mode} (step {evals_logged[0]['step']} vs "
                  f"step {evals_logged[-1]['step']}):")
        print0(d, table)
    log.close()
    return RunResult(trained, history, evals_logged, table, out_dir, final, critic=critic_module)


def main(argv: list[str] | None = None) -> RunResult:
    args = parse_args(argv)
    d = setup_distributed(args.device)
    try:
        return run(args, d)
    finally:
        teardown(d)


if __name__ == "__main__":
    try:
        result = main()
    except (UsageError, CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    exit_after_torchrun(result.exit_code)
