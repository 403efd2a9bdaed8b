"""Every option of a training run, defined once: TrainConfig's fields build train.py's flags, each field's
range is checked when the flags are parsed, and the library reads the TrainConfig, never the flags.

    cfg = parse_config(["--model", DIR, "--data", "train.jsonl"], TrainConfig())   # defaults: any TrainConfig
    demo = dataclasses.replace(TrainConfig(), lr=6e-4, steps=40)                  # a preset

The judge's flags are the judge's own (judges.add_judge_arguments, shared with eval.py); they arrive here as
one JudgeOptions.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Callable

from nano_gtalign.errors import UsageError
from nano_gtalign.grpo import AGGREGATIONS, KL_KINDS
from nano_gtalign.judges import JudgeOptions, add_judge_arguments, judge_options
from nano_gtalign.policy import LOGPROB_BACKENDS
from nano_gtalign.reward import BLEUS, LLM_REWARDS, WELFARES

Check = tuple[Callable[[object], bool], str]   # (test, what a good value is) for the one-line refusal
AT_LEAST_0: Check = (lambda v: v >= 0, ">= 0")
AT_LEAST_1: Check = (lambda v: v >= 1, ">= 1")
POSITIVE: Check = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Check = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
UNIT: Check = (lambda v: 0 <= v <= 1, "in [0, 1]")
BETA: Check = (lambda v: 0 <= v < 1, "in [0, 1)")


def option(default, help: str, group: str, check: Check | None = None, flag: str | None = None, **argparse_kw):
    """A TrainConfig field and the flag it is set by: --field-name (or `flag`), the help text, its group in
    --help, the range `check`, and anything else argparse takes (type is the default's, unless given)."""
    return field(default=default, metadata=dict(help=help, group=group, check=check, flag=flag, kw=argparse_kw))


DATA, REWARD, GRPO, PPO, OPT, SYSTEM, EVAL, DEMO = (
    "model and data", "reward", "GRPO", "PPO (--algo ppo: a value model and GAE instead of group advantages)",
    "optimizer", "system", "evaluation, logging, checkpoints", "demo (no --model)")


@dataclass
class TrainConfig:
    # model and data
    model: str | None = option(None, "Hugging Face Qwen2/Qwen3/Llama directory (omit for the demo)", DATA)
    data: list[str] | None = option(None, "training records: .jsonl or .parquet files (docs/data.md)", DATA, nargs="+")
    eval_data: list[str] | None = option(
        None, "held-out records (files); without it --holdout records of --data are held out", DATA, nargs="+")
    holdout: int = option(64, "records held out of --data when there is no --eval-data", DATA, AT_LEAST_0)
    max_prompt_tokens: int = option(2048, "longer prompts are dropped (and counted)", DATA, AT_LEAST_1)
    judge: JudgeOptions = field(default_factory=JudgeOptions)   # --judge and its flags (judges.py)
    max_judge_failures: float = option(
        0.5, "stop (with a checkpoint) when more than this share of judgements failed over the last "
             "--judge-failure-window steps (1: never)", DATA, UNIT)
    judge_failure_window: int = option(3, "steps the judge failure share is taken over", DATA, AT_LEAST_1)
    # reward
    welfare: str = option("cobb_douglas", "W = sqrt(U L) | (U+L)/2 | U | L", REWARD, choices=WELFARES)
    llm_reward: str = option("main", "L as in the paper, or its ablation", REWARD, choices=LLM_REWARDS)
    bleu: str = option("char", "BLEU for the writing task's A_user", REWARD, choices=BLEUS)
    normalize_by_source: bool = option(False, "z-score W per data source over the step", REWARD)
    # GRPO
    steps: int | None = option(None, "training steps (None: one pass over the data)", GRPO, AT_LEAST_1)
    prompts_per_step: int = option(64, "prompts per step, over all ranks", GRPO, AT_LEAST_1)
    group_size: int = option(8, "completions per prompt (G); 1 with --algo ppo", GRPO, AT_LEAST_1)
    mini_batch_size: int | None = option(
        None, "prompts per optimizer step (default: all of the step's prompts, i.e. on-policy)", GRPO, AT_LEAST_1)
    micro_batch_size: int = option(4, "rows per forward/backward on each rank", GRPO, AT_LEAST_1)
    epochs: int = option(1, "passes over the step's samples, each mini-batch one optimizer step", GRPO, AT_LEAST_1,
                         aliases=("--ppo-epochs",))
    max_new_tokens: int = option(4096, "completion length limit", GRPO, AT_LEAST_1)
    gen_batch_size: int = option(
        8, "prompts per generate call (x G rows); bounds the KV cache (0: all of a rank's prompts)", GRPO, AT_LEAST_0)
    temperature: float = option(1.0, "sampling temperature (also divides the logits in the loss)", GRPO, POSITIVE)
    top_p: float = option(1.0, "nucleus sampling (1 = off)", GRPO, (lambda v: 0 < v <= 1, "in (0, 1]"))
    top_k: int = option(0, "top-k sampling (0 = off)", GRPO, AT_LEAST_0)
    clip_low: float = option(0.2, "ratio clip below: 1 - clip_low", GRPO, BETA)
    clip_high: float = option(0.2, "ratio clip above: 1 + clip_high", GRPO, NON_NEGATIVE)
    dual_clip: float = option(3.0, "dual clip c for A < 0 (0 = off)", GRPO,
                              (lambda v: v == 0 or (math.isfinite(v) and v > 1), "0 (off) or a finite number > 1"))
    kl_coef: float = option(0.0, "beta of the KL to the frozen initial model", GRPO, NON_NEGATIVE)
    kl_estimator: str = option("k3", "k1, k2 or k3 (docs/grpo.md)", GRPO, choices=KL_KINDS)
    loss_agg: str = option("token-mean", "token-mean over the whole step (DAPO), per-sequence mean, or Dr.GRPO's "
                                         "sum / max length", GRPO, choices=AGGREGATIONS)
    adv_std: bool = option(True, "divide advantages by the group std (--no-adv-std: Dr.GRPO)", GRPO,
                           action=argparse.BooleanOptionalAction)
    adv_eps: float = option(1e-6, "eps in (W - mean) / (std + eps)", GRPO, POSITIVE)
    drop_zero_spread: bool = option(False, "leave groups whose G rewards are equal out of the loss", GRPO)
    mask_truncated: bool = option(False, "leave completions cut at --max-new-tokens out of the loss", GRPO)
    old_logp: str = option("recompute", "old log-probs when a rollout feeds several optimizer steps", GRPO,
                           choices=("recompute", "sampler"))
    # PPO
    algo: str = option("grpo", "GRPO, or PPO as in the paper's runs", PPO, choices=("grpo", "ppo"))
    critic_model: str | None = option(None, "the value model's start (default: a copy of the initial policy)", PPO,
                                      metavar="DIR")
    critic_lr: float = option(2e-6, "the value model's peak learning rate", PPO, POSITIVE)
    value_clip: float = option(0.5, "clip of the value change in the loss (0 = off)", PPO, NON_NEGATIVE)
    gamma: float = option(1.0, "GAE discount", PPO, UNIT)
    lam: float = option(1.0, "GAE lambda", PPO, UNIT)
    critic_warmup: int = option(0, "first steps that train only the value model", PPO, AT_LEAST_0)
    # optimizer
    lr: float = option(1e-6, "peak learning rate", OPT, POSITIVE)
    lr_schedule: str = option("constant", "", OPT, choices=("constant", "cosine"))
    min_lr_ratio: float = option(0.1, "cosine decays to lr * this", OPT, UNIT)
    warmup_steps: int = option(0, "optimizer steps of linear warm-up from 0", OPT, AT_LEAST_0)
    beta1: float = option(0.9, "AdamW beta1", OPT, BETA)
    beta2: float = option(0.999, "AdamW beta2", OPT, BETA)
    weight_decay: float = option(0.01, "AdamW weight decay (all parameters)", OPT, NON_NEGATIVE)
    grad_clip: float = option(1.0, "max global grad norm (0 = off)", OPT, NON_NEGATIVE)
    # system
    device: str = option("auto", "auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)", SYSTEM)
    dtype: str = option("auto", "compute dtype (autocast); weights and optimizer stay fp32. auto: bf16 on CUDA",
                        SYSTEM, choices=("auto", "float32", "bfloat16"))
    fsdp: bool = option(False, "FSDP2 instead of DDP under torchrun", SYSTEM)
    grad_checkpointing: bool = option(False, "recompute block activations in backward", SYSTEM)
    logprob_backend: str = option("auto", "fused kernel backend; naive = full log_softmax (for comparison)", SYSTEM,
                                  choices=LOGPROB_BACKENDS)
    threads: int = option(0, "CPU threads for torch (0: torch's default). On a busy or 2-core CPU, 1 avoids "
                             "threads waiting on each other", SYSTEM, AT_LEAST_0)
    seed: int = option(0, "data order, sampling and the demo's task/model", SYSTEM,
                       (lambda v: 0 <= v < 2**32, "in [0, 2^32)"))  # numpy's seeding takes no other
    # evaluation, logging, checkpoints
    export_dtype: str = option("auto", "dtype of OUT_DIR/final (auto: the --model checkpoint's; the demo's fp32)",
                               EVAL, choices=("auto", "float32", "bfloat16", "float16"))
    out_dir: str = option("out/run", "metrics.jsonl, checkpoints, final/ (and the demo's test.jsonl)", EVAL)
    eval_every: int = option(50, "evaluate every K steps, and before and after training (0: only before/after; "
                                 "-1: never)", EVAL, (lambda v: v >= -1, ">= -1"))
    eval_size: int = option(256, "held-out records evaluated (greedy)", EVAL, AT_LEAST_1)
    eval_batch_size: int = option(32, "prompts per generate call in evaluation", EVAL, AT_LEAST_1)
    eval_temperature: float = option(0.0, "0: greedy evaluation", EVAL, NON_NEGATIVE)
    eval_samples: int = option(1, "completions per held-out prompt (with sampling)", EVAL, AT_LEAST_1)
    save_every: int = option(50, "checkpoint every K steps (0: only when halting)", EVAL, AT_LEAST_0)
    resume: str | None = option(None, "continue from OUT_DIR's latest checkpoint, or from the given checkpoint file "
                                      "(the flags listed at the end may change; any other changed flag is refused)",
                                EVAL, nargs="?", const="latest")
    overwrite: bool = option(False, "start a new run in an --out-dir that holds an earlier run's checkpoints "
                                    "(they are removed)", EVAL)
    accept_changed_data: bool = option(False, "--resume even though a --data file changed since the checkpoint "
                                              "(a warning names it)", EVAL)
    halt_after: int | None = option(None, "stop after this many steps of this run, with a checkpoint (for "
                                          "time-limited jobs)", EVAL, AT_LEAST_1)
    wandb: str | None = option(None, "also log to Weights & Biases", EVAL, metavar="PROJECT")
    # demo
    demo_train_size: int = option(1000, "arith_demo training questions", DEMO, AT_LEAST_1)
    sft_steps: int = option(300, "supervised warm-start steps", DEMO, AT_LEAST_0)

    @property
    def prompts_per_mini_batch(self) -> int:
        """--mini-batch-size, or all of the step's prompts when it is not given (on-policy)."""
        return self.mini_batch_size or self.prompts_per_step

    @property
    def mini_batches(self) -> int:
        """Optimizer steps per epoch: the step's prompts split into mini-batches of --mini-batch-size."""
        return self.prompts_per_step // self.prompts_per_mini_batch

    def flags(self) -> dict:
        """Every option by its flag's name (the judge's too), as checkpoints and metrics.jsonl keep them."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "judge"}
        return values | self.judge.flags()


# What a resumed run may change: how long it runs, how it reports and saves, where and with what it runs.
# Each takes effect when changed (--steps also re-spans the learning-rate schedule); every other flag is the
# run itself, and a change is refused (outdir.check_resume).
MAY_CHANGE_ON_RESUME = ("resume", "steps", "halt_after", "eval_every", "save_every", "wandb", "device", "threads",
                        "grad_checkpointing", "export_dtype", "out_dir", "overwrite", "accept_changed_data", "judge",
                        "judge_concurrency", "judge_timeout", "max_judge_failures", "judge_failure_window")
DEMO_ONLY = ("demo_train_size", "sft_steps")
PPO_ONLY = ("critic_model", "critic_lr", "value_clip", "gamma", "lam", "critic_warmup")


def applicable_flags(cfg: TrainConfig) -> dict:
    """The flags this run reads: the demo's only without --model, the value model's only with --algo ppo."""
    skip = (DEMO_ONLY if cfg.model else ()) + (PPO_ONLY if cfg.algo != "ppo" else ())
    return {k: v for k, v in cfg.flags().items() if k not in skip}


def build_parser(defaults: TrainConfig, **parser_kw) -> argparse.ArgumentParser:
    """train.py's flags, one per TrainConfig field (the judge's from judges.py), with `defaults`' values."""
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **parser_kw)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        if f.name == "judge":
            add_judge_arguments(groups[DATA], defaults.judge)
            continue
        meta = f.metadata
        group = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        kw = dict(meta["kw"])
        names = [meta["flag"] or "--" + f.name.replace("_", "-"), *kw.pop("aliases", ())]
        default = getattr(defaults, f.name)
        if f.type in ("bool",) and "action" not in kw:
            kw["action"] = "store_true"
        elif "action" not in kw:
            kw.setdefault("type", {"int": int, "float": float}.get(_base_type(f.type), str))
        group.add_argument(*names, dest=f.name, default=default, help=meta["help"] or None, **kw)
    return p


def _base_type(annotation: str) -> str:
    return annotation.split("|")[0].strip().removeprefix("list[").removesuffix("]")


def parse_config(argv: list[str] | None, defaults: TrainConfig, **parser_kw) -> TrainConfig:
    """The TrainConfig of a command line: `defaults` where a flag is not given; every range checked here,
    once, each refusal one UsageError line naming the flag."""
    ns = build_parser(defaults, **parser_kw).parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in fields(TrainConfig) if f.name != "judge"}
    cfg = TrainConfig(**values, judge=judge_options(ns))
    for f in fields(TrainConfig):
        check, value = f.metadata.get("check"), getattr(cfg, f.name)
        if check is not None and value is not None and not check[0](value):
            raise UsageError(f"--{f.name.replace('_', '-')} must be {check[1]}, got {value}")
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """The checks that involve several options."""
    if cfg.model is None and (cfg.data or cfg.eval_data):
        raise UsageError("--data/--eval-data need --model (the demo writes its own task)")
    if cfg.model is not None and not cfg.data:
        raise UsageError("--model needs --data (training records, .jsonl or .parquet)")
    if cfg.eval_temperature == 0 and cfg.eval_samples > 1:
        raise UsageError("--eval-temperature must be > 0 when --eval-samples > 1 (greedy draws are identical)")
    mini = cfg.prompts_per_mini_batch
    if cfg.prompts_per_step % mini:
        raise UsageError(f"--mini-batch-size {mini} must divide --prompts-per-step {cfg.prompts_per_step}")
    if cfg.old_logp == "sampler" and (cfg.top_k or cfg.top_p < 1):
        raise UsageError("--old-logp sampler needs --top-k 0 --top-p 1: the sampler's log-probs are then "
                         "under a truncated distribution, not the policy's")
    if cfg.algo == "grpo" and cfg.critic_model:
        raise UsageError("--critic-model needs --algo ppo (GRPO has no value model)")
    if cfg.algo == "ppo" and cfg.drop_zero_spread:
        raise UsageError("--drop-zero-spread compares a prompt's G samples; with --algo ppo the value model is the "
                         "baseline (and with G = 1 every group would be dropped)")


def default_of(name: str):
    """A TrainConfig field's default value (for the presets' help text)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


__all__ = ["TrainConfig", "parse_config", "applicable_flags", "asdict"]
