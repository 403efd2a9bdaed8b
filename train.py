"""GRPO (or PPO) training of a Qwen2/Qwen3/Llama model with the GTAlign welfare reward, on CPU, one GPU or many.

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
  4. --epochs passes over mini-batches of --mini-batch-size prompts, one optimizer step each, split into
     micro-batches of --micro-batch-size rows; token log-probs come from the fused kernel (docs/logprobs.md).
With --algo ppo (the paper's algorithm, nano_gtalign/ppo.py) step 3 is a value model's GAE instead, one sample
per prompt by default, and the value model trains beside the policy.

This file is wiring: flags, setup, the loop, the export. The machinery lives in nano_gtalign/ (rollout.py,
update.py, ppo.py, evaluate.py, checkpoint.py, distributed.py, report.py, data.py).
"""
from __future__ import annotations

import argparse
import copy
import functools
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data.demo import DEMO_OUT_DIR
from nano_gtalign.checkpoint import (export_final, load_checkpoint, prepare_out_dir, remove_stale_temporaries,
                                     restore, save_checkpoint)
from nano_gtalign.config import MAY_CHANGE_ON_RESUME, TrainConfig, applicable_flags, parse_config
from nano_gtalign.data import Cursor, encode_for_run, next_prompts, read_splits
from nano_gtalign.distributed import (Dist, exit_after_torchrun, print0, setup_distributed, teardown, unwrap,
                                      wrap_for_training)
from nano_gtalign.errors import UsageError
from nano_gtalign.evaluate import evaluate_policy
from nano_gtalign.http_judge import open_configured_judge
from nano_gtalign.interrupts import StopOnSignal
from nano_gtalign.loader import CheckpointError, export_defaults, load_pretrained, load_tokenizer
from nano_gtalign.outdir import check_fresh_start, check_resume, data_fingerprint, exclusive
from nano_gtalign.policy import Policy, compute_dtype
from nano_gtalign.ppo import VALUE_HEAD_FILE, CriticTrainer, make_critic, ppo_update
from nano_gtalign.report import (MetricsLog, console_line, eval_lines, format_eval_table, judge_failure_rate,
                                  over_ranks, step_metrics)
from nano_gtalign.rollout import rollout
from nano_gtalign.update import make_optimizer, update

# The demo's preset, for flags not given on the command line (bench/RESULTS.md has the runs behind each
# choice). A tiny model learns fast with a large learning rate; the KL to the warm-started model holds its
# behaviour where the reward says nothing (while the model cannot do the arithmetic, answering and asking
# score alike on clear questions, and without the KL the strong "ask on vague questions" signal leaks into
# clear ones; a smaller KL let it drift that way). The policy is evaluated before and after training only,
# sampled at temperature 1 with the same draws both times.
DEMO_DEFAULTS = dict(
    out_dir=DEMO_OUT_DIR, lr=6e-4, warmup_steps=2, steps=40, prompts_per_step=16, group_size=8,
    micro_batch_size=64, gen_batch_size=0, max_new_tokens=160, max_prompt_tokens=256, kl_coef=0.2,
    eval_every=0, eval_size=64, eval_batch_size=64, eval_temperature=1.0, eval_samples=4, save_every=0, threads=1,
)
# --algo ppo: one sample per prompt, as upstream (a learned value model is the baseline, not the group).
PPO_DEFAULTS = dict(group_size=1)
# The demo with PPO: as many samples a step as GRPO's demo, one per prompt (fewer prompts drifted to answering
# vague questions), and the critic's lr scaled up with the actor's as upstream scales it (at upstream's own
# value the value model does not move in 40 steps and the run is REINFORCE with whitened rewards).
DEMO_PPO_DEFAULTS = dict(prompts_per_step=128, critic_lr=1e-3)


def flag_list(defaults: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in defaults.items())


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    # Two passes: whether --model and --algo ppo are given decides which preset the flags default to.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--algo", default="grpo")
    known, _ = pre.parse_known_args(argv)
    demo, ppo = known.model is None, known.algo == "ppo"
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        demo = ppo = False  # --help lists the real-run defaults; the epilog lists the demo's and PPO's overrides
    preset = ((DEMO_DEFAULTS if demo else {}) | (PPO_DEFAULTS if ppo else {}) |
              (DEMO_PPO_DEFAULTS if demo and ppo else {}))
    return parse_config(
        argv, replace(TrainConfig(), **preset),
        description="GRPO training with the GTAlign welfare reward (no --model: the built-in demo).",
        epilog="demo defaults (no --model): " + flag_list(DEMO_DEFAULTS) + "; with --algo ppo: " +
               flag_list(PPO_DEFAULTS) + " (the demo also " + flag_list(DEMO_PPO_DEFAULTS) + "). With --resume "
               "only these may change: " + ", ".join("--" + f.replace("_", "-") for f in MAY_CHANGE_ON_RESUME))


def check_world(cfg: TrainConfig, d: Dist) -> None:
    if cfg.fsdp and not d.on:
        raise UsageError("--fsdp needs several processes: torchrun --nproc_per_node=N train.py --fsdp ...")
    mini = cfg.prompts_per_mini_batch
    if cfg.prompts_per_step % d.world or mini % d.world:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} and --mini-batch-size {mini} "
                         f"must be multiples of the number of ranks ({d.world})")


def load_model_and_data(cfg: TrainConfig, d: Dist):
    """(model, tokenizer, train records, eval records): the demo's, or --model's and --data's."""
    if cfg.model is None:
        from data.demo.prepare import prepare_demo
        return prepare_demo(seed=cfg.seed, train_size=cfg.demo_train_size, test_size=cfg.eval_size,
                            sft_steps=cfg.sft_steps, out_dir=Path(cfg.out_dir), warm=cfg.resume is None, d=d)
    tokenizer = load_tokenizer(cfg.model)
    # Straight onto this rank's device: eight ranks each holding an fp32 copy in CPU memory would not fit.
    model = load_pretrained(cfg.model, dtype=torch.float32, device=d.device)
    train, evals = read_splits(cfg.data, cfg.eval_data, cfg.holdout, cfg.seed)
    return model, tokenizer, train, evals


def build_policy(model: nn.Module, cfg: TrainConfig, dtype: torch.dtype, d: Dist):
    """(trained module, frozen KL reference or None, PPO's value model or None): DDP or FSDP2 under torchrun,
    the plain modules otherwise."""
    model = model.to(device=d.device, dtype=torch.float32)
    policy = Policy(model, dtype, cfg.logprob_backend)
    ref = critic = None
    if cfg.kl_coef > 0:  # the frozen initial policy
        ref = Policy(copy.deepcopy(model).requires_grad_(False).eval(), dtype, cfg.logprob_backend)
    if cfg.algo == "ppo":  # copied (or loaded) before the policy is sharded
        critic = make_critic(model, cfg.critic_model, d.device)
    return tuple(m if m is None else wrap_for_training(m, cfg.fsdp, d) for m in (policy, ref, critic))


@dataclass
class RunResult:
    policy: nn.Module                  # the trained module (DDP/FSDP-wrapped under torchrun)
    history: list[dict]                # per-step metrics of this run
    evals: list[dict]                  # evaluation lines (from metrics.jsonl, across resumes)
    table: str | None                  # before/after table when there were two evaluations
    out_dir: Path
    final_dir: Path | None             # the exported Hugging Face directory (None when stopped early)
    exit_code: int = 0                 # 3: the judge kept failing; 128 + N: stopped by signal N
    critic: nn.Module | None = None    # PPO's value model (wrapped like the policy)


def run(cfg: TrainConfig, d: Dist) -> RunResult:
    # ---- setup
    check_world(cfg, d)
    dtype = compute_dtype(cfg.dtype, d.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    log_line = functools.partial(print0, d)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # Every flag, and the training data's SHA-256, go into checkpoints and metrics.jsonl; the console shows
    # the flags that apply.
    flags = cfg.flags() | {"data_sha256": data_fingerprint(cfg.data)}
    print0(d, "config: " + " ".join(f"{k}={v}" for k, v in applicable_flags(cfg).items()))
    print0(d, f"ranks {d.world} | device {d.device} | compute {str(dtype).removeprefix('torch.')} | "
              f"{'FSDP2' if cfg.fsdp else 'DDP' if d.on else 'single process'}")
    if cfg.resume:  # before any work: a resume that would continue another run is refused at once
        state, path = load_checkpoint(cfg.resume, out_dir)
        check_resume(state["args"], flags, MAY_CHANGE_ON_RESUME, cfg.accept_changed_data, log_line)
    model, tokenizer, train, evals = load_model_and_data(cfg, d)
    judge = open_configured_judge(cfg.judge, sources=[r["data_source"] for r in train + evals])
    train, train_ids, evals, eval_ids = encode_for_run(
        train, evals, tokenizer, max_prompt_tokens=cfg.max_prompt_tokens, eval_size=cfg.eval_size, seed=cfg.seed,
        prompts_per_step=cfg.prompts_per_step, max_new_tokens=cfg.max_new_tokens,
        max_positions=model.config.max_position_embeddings, evaluate=cfg.eval_every >= 0,
        log=log_line)
    total_steps = cfg.steps or len(train) // cfg.prompts_per_step
    print0(d, f"data: {len(train)} train records, {len(evals)} eval records, {total_steps} steps")

    policy, ref, critic_module = build_policy(model, cfg, dtype, d)
    # `policy` is what the optimizer steps (DDP/FSDP-wrapped under torchrun); the bare Policy is what samples.
    sampling_policy = unwrap(policy)
    opt_per_step = cfg.mini_batches * cfg.epochs
    actor_steps = total_steps - (cfg.critic_warmup if cfg.algo == "ppo" else 0)  # --critic-warmup: no actor steps
    adamw = dict(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                 schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio)
    optimizer, scheduler = make_optimizer(policy, lr=cfg.lr, total_steps=max(actor_steps, 0) * opt_per_step, **adamw)
    critic = None if critic_module is None else CriticTrainer(critic_module, *make_optimizer(
        critic_module, lr=cfg.critic_lr, total_steps=total_steps * opt_per_step, **adamw))
    # Per-rank sampling stream; its state is checkpointed so a resumed run draws the same tokens.
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + d.rank)
    cursor, start = Cursor(), 0
    if cfg.resume:
        cursor, start = restore(state, policy, optimizer, scheduler, generator, cfg.fsdp, d, critic), state["step"]
        print0(d, f"resumed from {path} at step {start}")
        del state
    log = MetricsLog(out_dir / "metrics.jsonl", start if cfg.resume else None, d.main, cfg.wandb, flags)

    def do_eval(step: int) -> None:
        if not evals:
            return
        metrics = evaluate_policy(sampling_policy, tokenizer, evals, eval_ids, cfg, judge, d)
        log.write({"kind": "eval", "step": step, **metrics})
        for line in eval_lines(step, metrics):
            print0(d, line)

    # ---- the loop: prompts -> generate -> score -> advantages -> update -> log / evaluate / checkpoint
    if cfg.eval_every >= 0 and not cfg.resume:
        do_eval(0)
    history: list[dict] = []
    stopped, exit_code = None, 0   # why the run stopped before its last step, and the exit code that says so
    t_start = time.perf_counter()
    step = start
    with StopOnSignal(log_line) as signals:
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            idx = next_prompts(cursor, len(train), cfg.prompts_per_step, cfg.seed)
            share = cfg.prompts_per_step // d.world
            mine = idx[d.rank * share: (d.rank + 1) * share]
            batch = rollout(sampling_policy, tokenizer, [train[i] for i in mine], [train_ids[i] for i in mine], cfg,
                            judge, generator, d)
            if critic is None:
                # each completion's group advantage on every one of its tokens
                advantages = batch.advantages[:, None].expand(batch.loss_mask.shape)
                update_stats = update(policy, ref, optimizer, scheduler, batch, advantages, cfg,
                                      tokenizer.pad_token_id, d)
            else:
                update_stats = ppo_update(policy, ref, optimizer, scheduler, critic, batch, cfg, step,
                                          tokenizer.pad_token_id, d)
            now, done = time.perf_counter(), step - start
            metrics = step_metrics(step, total_steps, over_ranks(d, batch.stats), over_ranks(d, update_stats),
                                   lr=scheduler.get_last_lr()[0], elapsed=now - t_start, step_time=now - t0,
                                   eta=(now - t_start) / done * (total_steps - step), epochs=cfg.epochs,
                                   with_kl=cfg.kl_coef > 0, with_critic=critic is not None)
            history.append(metrics)
            log.write(metrics)
            print0(d, console_line(metrics))
            if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
                do_eval(step)
            # Stop early, with a checkpoint: a persistently failing judge, a signal, or --halt-after.
            failing = judge_failure_rate(history, cfg.judge_failure_window)
            if failing is not None and failing > cfg.max_judge_failures:
                example = next((s.judge_error for s in batch.scores if s.judge_failed), None)
                stopped = (f"stopped after step {step}: the judge failed on {failing:.0%} of the last "
                           f"{cfg.judge_failure_window} steps' samples (over --max-judge-failures "
                           f"{cfg.max_judge_failures:g}); {example or 'see judge_failed in metrics.jsonl'}. "
                           "Fix the judge, then continue with --resume")
                exit_code = 3
            elif update_stats.nonfinite:
                stopped = (f"stopped at step {step}: the loss or the gradient norm is not finite (NaN or inf), so "
                           "this update was not applied (is --lr too large?); the checkpoint holds the last "
                           "finite weights")
                exit_code = 4
            elif signals.requested(d):
                stopped = f"interrupted by {signals.name} after step {step}; continue with --resume"
                exit_code = signals.exit_code
            elif cfg.halt_after is not None and done == cfg.halt_after and step != total_steps:
                stopped = f"halted after {done} steps; continue with --resume"
            if stopped or (cfg.save_every > 0 and step % cfg.save_every == 0):
                saved = save_checkpoint(out_dir, step, policy, optimizer, scheduler, cursor, generator, flags,
                                        cfg.fsdp, d, critic)
                if saved:
                    print0(d, f"saved {saved}")
            if stopped:
                print0(d, stopped)
                break

    # ---- the final evaluation, the export and the before/after table (not after an early stop)
    final = table = None
    if not stopped:
        if cfg.eval_every >= 0 and step == total_steps and (step != start or not cfg.resume):
            do_eval(total_steps)
        try:
            final = export(cfg, policy, critic, tokenizer, out_dir, d)
        except CheckpointError as e:  # a full disk, say: keep the finished training resumable
            saved = save_checkpoint(out_dir, step, policy, optimizer, scheduler, cursor, generator, flags,
                                    cfg.fsdp, d, critic)
            raise CheckpointError(f"{e}; the finished training is saved in {saved or out_dir}: fix the cause, "
                                  "then run the same command with --resume to export it") from None
        table = before_after_table(cfg, log.evals(), len(evals), d)
    log.close()
    return RunResult(policy, history, log.evals(), table, out_dir, final, exit_code, critic_module)


def export(cfg: TrainConfig, trained: nn.Module, critic: CriticTrainer | None, tokenizer, out_dir: Path,
           d: Dist) -> Path:
    """OUT_DIR/final (and PPO's OUT_DIR/final_critic) in Hugging Face format."""
    final = out_dir / "final"
    keep = export_defaults(cfg.model) if cfg.model else None  # the input's dtype and sampling defaults
    dtype = (keep and keep.dtype) if cfg.export_dtype == "auto" else cfg.export_dtype
    export_final(trained, tokenizer, final, cfg.fsdp, d, dtype=dtype,
                 generation_config=keep.generation_config if keep else None)
    print0(d, f"saved the final model to {final} (Hugging Face format)")
    if critic is not None:
        export_final(critic.module, tokenizer, out_dir / "final_critic", cfg.fsdp, d, head_file=VALUE_HEAD_FILE)
        print0(d, f"saved the value model to {out_dir / 'final_critic'} (--critic-model loads it)")
    return final


def before_after_table(cfg: TrainConfig, evals_logged: list[dict], n_prompts: int, d: Dist) -> str | None:
    """The first and the last evaluation side by side (None with fewer than two), printed and returned."""
    if len(evals_logged) < 2:
        return None
    table = format_eval_table(evals_logged[0], evals_logged[-1])
    mode = "greedy" if cfg.eval_temperature == 0 else \
        f"sampled at temperature {cfg.eval_temperature:g}, {cfg.eval_samples} per prompt"
    print0(d, f"\nheld-out evaluation, {n_prompts} prompts, {mode} (step {evals_logged[0]['step']} vs "
              f"step {evals_logged[-1]['step']}):")
    print0(d, table)
    return table


def main(argv: list[str] | None = None) -> RunResult:
    cfg = parse_args(argv)
    d = setup_distributed(cfg.device)
    try:
        out_dir, say = Path(cfg.out_dir), functools.partial(print0, d)
        prepare_out_dir(out_dir)  # exists and is writable, before any work that would be lost
        with exclusive(out_dir, d, log=say):  # one run at a time in an out-dir
            if d.main:
                for stale in remove_stale_temporaries(out_dir):
                    say(f"removed {stale} (left by an interrupted save)")
            if not cfg.resume:
                check_fresh_start(out_dir, cfg.overwrite, log=say, remove=d.main)
            return run(cfg, d)
    finally:
        teardown(d)


if __name__ == "__main__":
    try:
        result = main()
    except (UsageError, CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    exit_after_torchrun(result.exit_code)
