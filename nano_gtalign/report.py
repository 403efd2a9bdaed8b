"""What a training run measures, shows and keeps: the step's statistics (RolloutStats, UpdateStats), the
console lines, OUT_DIR/metrics.jsonl and the before/after table.

Each rank fills its own stats; `over_ranks` combines them (summed, the slowest rank's time, or a number
every rank shares, as each field says); rank 0 prints and writes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

from nano_gtalign.distributed import Dist, all_gather
from nano_gtalign.errors import UsageError

# (key, header, format, meaning) of the before/after table of held-out evaluations
EVAL_COLUMNS = (
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


def _slowest() -> float:
    """A time: over ranks, the slowest rank's."""
    return field(default=0.0, metadata={"over_ranks": "max"})


def _shared() -> float:
    """A number every rank computes alike (from the averaged gradients): over ranks, this rank's."""
    return field(default=0.0, metadata={"over_ranks": "same"})


@dataclass
class RolloutStats:
    """One rank's sums and counts from sampling and scoring; means are taken over the scored rows."""
    rows: int = 0                  # completions
    groups: int = 0                # prompts
    completion_tokens: int = 0
    scored: int = 0                # rows with a welfare (with --judge-failure zero a failure is scored)
    W: float = 0.0
    U: float = 0.0
    L: float = 0.0
    answer: float = 0.0
    format: int = 0
    DA: int = 0
    CQ: int = 0
    AQ: int = 0
    truncated: int = 0
    judge_failed: int = 0
    zero_spread_groups: int = 0
    train_rows: int = 0            # rows with at least one token in the loss
    gen_time: float = _slowest()
    score_time: float = _slowest()


@dataclass
class UpdateStats:
    """One rank's sums from the update (token-weighted, so that they add up over micro-batches and ranks);
    the critic_* and value numbers only with --algo ppo."""
    tokens: float = 0.0            # loss tokens the fractions below are weighted by
    clip: float = 0.0
    approx_kl: float = 0.0
    entropy: float = 0.0
    kl: float = 0.0
    loss: float = 0.0
    mismatch: float = 0.0          # |logp - sampler logp| over the first mini-batch's tokens
    mismatch_tokens: float = 0.0
    update_time: float = _slowest()
    grad_norm: float = _shared()
    opt_steps: float = _shared()
    value_loss: float = 0.0
    value_clip: float = 0.0
    value_trained_tokens: float = 0.0
    value_tokens: float = 0.0      # the step's values and returns over the valid tokens (explained variance)
    value_sum: float = 0.0
    return_sum: float = 0.0
    return_sq: float = 0.0
    error_sum: float = 0.0
    error_sq: float = 0.0
    critic_grad_norm: float = _shared()
    critic_opt_steps: float = _shared()
    nonfinite: bool = field(default=False, metadata={"over_ranks": "same"})  # a NaN/inf gradient stopped it


Stats = TypeVar("Stats", RolloutStats, UpdateStats)


def over_ranks(d: Dist, stats: Stats) -> Stats:
    """The step's stats over every rank: sums, except the slowest rank's times and the shared numbers."""
    if not d.on:
        return stats
    parts = all_gather(d, stats)
    combined = {}
    for f in fields(stats):
        how = f.metadata.get("over_ranks", "sum")
        values = [getattr(p, f.name) for p in parts]
        combined[f.name] = getattr(stats, f.name) if how == "same" else max(values) if how == "max" else sum(values)
    return replace(stats, **combined)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_metrics(step: int, total: int, ro: RolloutStats, up: UpdateStats, *, lr: float, elapsed: float,
                 step_time: float, eta: float, epochs: int, with_kl: bool, with_critic: bool) -> dict:
    """One step's metrics.jsonl record from the rollout's (ro) and the update's (up) stats over ranks."""
    n, tok, opt = ro.rows, max(up.tokens, 1), max(up.opt_steps, 1)

    def per_scored(total: float) -> float | None:  # a step whose judgements all failed has no welfare, not 0
        return total / ro.scored if ro.scored else None
    return {
        "kind": "train", "step": step, "steps": total, "lr": lr, "time": elapsed, "step_time": step_time,
        "prompts_per_s": ro.groups / step_time, "tokens_per_s": ro.completion_tokens / step_time,
        "gen_tokens_per_s": ro.completion_tokens / max(ro.gen_time, 1e-9),
        "update_tokens_per_s": ro.completion_tokens * epochs / max(up.update_time, 1e-9),
        "W": per_scored(ro.W), "U": per_scored(ro.U), "L": per_scored(ro.L),
        "answer": per_scored(ro.answer), "format": ro.format / n,
        "DA": ro.DA / n, "CQ": ro.CQ / n, "AQ": ro.AQ / n,
        "completion_len": ro.completion_tokens / n, "truncated": ro.truncated / n,
        "samples": n, "judge_failed": int(ro.judge_failed), "judge_failure_rate": ro.judge_failed / n,
        "zero_spread_groups": int(ro.zero_spread_groups),
        "train_rows": int(ro.train_rows),
        "kl": up.kl / tok if with_kl else None,
        "approx_kl": up.approx_kl / tok, "clip_frac": up.clip / tok, "entropy": up.entropy / tok,
        "logp_mismatch": up.mismatch / max(up.mismatch_tokens, 1), "grad_norm": up.grad_norm / opt,
        "loss": up.loss / opt, "opt_steps": int(up.opt_steps),
        "gen_time": ro.gen_time, "score_time": ro.score_time, "update_time": up.update_time,
        "eta_s": eta, **(critic_metrics(up) if with_critic else {}),
    }


def critic_metrics(up: UpdateStats) -> dict:
    """PPO's value-model numbers: the loss and clip fraction of its update, and, for the values the step's
    advantages were computed with, their mean and the explained variance 1 - Var(G - V) / Var(G) over the
    valid tokens (G: the GAE returns; 1 = perfect values, 0 = no better than their mean)."""
    n, opt = max(up.value_tokens, 1), max(up.critic_opt_steps, 1)

    def var(total: float, sq: float) -> float:
        return sq / n - (total / n) ** 2
    var_g = var(up.return_sum, up.return_sq)
    return {
        "value_loss": up.value_loss / opt, "value_clip_frac": up.value_clip / max(up.value_trained_tokens, 1),
        "value_mean": up.value_sum / n, "return_mean": up.return_sum / n,
        "explained_var": 1 - var(up.error_sum, up.error_sq) / var_g if var_g > 1e-12 else None,
        "critic_grad_norm": up.critic_grad_norm / opt, "critic_opt_steps": int(up.critic_opt_steps),
    }


def console_line(m: dict) -> str:
    kl = "-" if m["kl"] is None else f"{m['kl']:.4f}"
    judge = f" | judge failed {m['judge_failure_rate']:.0%}" if m["judge_failed"] else ""
    return (f"step {m['step']:4d}/{m['steps']} | {m['prompts_per_s']:5.2f} p/s {m['tokens_per_s']:6.0f} tok/s | "
            f"W {_cell(m['W'])} U {_cell(m['U'])} L {_cell(m['L'])}{judge} | "
            f"fmt {m['format']:.2f} ans {_cell(m['answer'], '{:.2f}')} | "
            f"DA {m['DA']:.2f} CQ {m['CQ']:.2f} AQ {m['AQ']:.2f} | len {m['completion_len']:5.1f} | kl {kl} | "
            f"clip {m['clip_frac']:.3f} | gnorm {m['grad_norm']:.3f} | lr {m['lr']:.1e} | " + critic_cells(m) +
            f"{m['step_time']:.1f}s eta {fmt_time(m['eta_s'])}")


def critic_cells(m: dict) -> str:
    """PPO's critic on the console: value loss, explained variance, mean value, value clip fraction."""
    if "value_loss" not in m:
        return ""
    return (f"vf {m['value_loss']:.4f} ev {_cell(m['explained_var'], '{:+.2f}')} V {m['value_mean']:.3f} "
            f"vclip {m['value_clip_frac']:.3f} | ")


def _cell(v, f="{:.3f}") -> str:
    return "-" if v is None else f.format(v)


def eval_lines(step: int, m: dict) -> list[str]:
    """One evaluation's console lines: overall, then, for a mix, one indented line per data source."""
    by_source = m.get("by_source", {})
    return [eval_line(step, m)] + ["  " + eval_line(step, ms, label=source) for source, ms in by_source.items()]


def eval_line(step: int, m: dict, label: str | None = None) -> str:
    return (f"{label or f'eval step {step}'} | n {m['n']} | "
            f"W {_cell(m['welfare'])} U {_cell(m['user'])} L {_cell(m['llm'])} | "
            f"answer {_cell(m['answer_llm'])} | act_DQ {_cell(m['action_ok_DQ'])} act_VQ {_cell(m['action_ok_VQ'])} | "
            f"format {_cell(m['format_rate'])} | reas_ch {_cell(m['reasoning_chars'], '{:.0f}')} | "
            f"tokens {_cell(m['completion_tokens'], '{:.1f}')}"
            + (f" | judge failed {m['judge_failure_rate']:.0%}" if m.get("judge_failure_rate") else ""))


def format_eval_table(before: dict, after: dict) -> str:
    lines = [" " * 8 + "".join(f"{h:>9s}" for _, h, _, _ in EVAL_COLUMNS)]
    for name, m in (("before", before), ("after", after)):
        lines.append(f"{name:8s}" + "".join(f"{_cell(m.get(k), f):>9s}" for k, _, f, _ in EVAL_COLUMNS))
    diffs = [None if before.get(k) is None or after.get(k) is None else after[k] - before[k]
             for k, _, _, _ in EVAL_COLUMNS]
    lines.append(f"{'change':8s}" + "".join(f"{_cell(v, f.replace('{:', '{:+')):>9s}"
                                            for v, (_, _, f, _) in zip(diffs, EVAL_COLUMNS)))
    return "\n".join(lines)


def judge_failure_rate(history: list[dict], window: int) -> float | None:
    """The share of failed judgements over the last `window` steps, None until there are that many."""
    if len(history) < window:
        return None
    last = history[-window:]
    return sum(m["judge_failed"] for m in last) / max(sum(m["samples"] for m in last), 1)


class MetricsLog:
    """OUT_DIR/metrics.jsonl (rank 0): one JSON line per training step and per evaluation, also sent to
    Weights & Biases when a project is given."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool, wandb_project: str | None = None,
                 config: dict | None = None):
        self.path, self.enabled, self.wandb = path, enabled, None
        if not enabled:
            return
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package (pip install wandb)") from None
            wandb.init(project=wandb_project, config=config, dir=str(path.parent), resume="allow")
            self.wandb = wandb
        if resume_step is None:
            path.write_text("")
        elif path.exists():  # drop lines written after the checkpoint we resume from
            kept = [ln for ln in self._read() if ln["step"] <= resume_step]
            path.write_text("".join(json.dumps(ln) + "\n" for ln in kept))

    def _read(self) -> list[dict]:
        """The file's records; a torn last line (the process died mid-write) is dropped, any other bad
        line is an error naming it."""
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        out = []
        for n, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                if n == len(lines):
                    print(f"{self.path}: dropped a partial last line (the run stopped while writing it)")
                    continue
                raise UsageError(f"{self.path}:{n}: not valid JSON; fix or remove that line to resume") from None
        return out

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log({f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))},
                           step=record["step"])

    def close(self) -> None:
        if self.wandb:
            self.wandb.finish()

    def evals(self) -> list[dict]:
        if not self.enabled or not self.path.exists():
            return []
        return [ln for ln in self._read() if ln["kind"] == "eval"]
