"""What a training run shows and keeps: the console lines, OUT_DIR/metrics.jsonl and the before/after table.

Every number is already summed over ranks (distributed.reduce_stats) when it gets here; rank 0 prints
and writes.
"""
from __future__ import annotations

import json
from pathlib import Path

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


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_metrics(step: int, total: int, ro: dict, up: dict, *, lr: float, elapsed: float, step_time: float,
                 eta: float, epochs: int, with_kl: bool) -> dict:
    """One step's metrics.jsonl record from the rollout's (ro) and the update's (up) sums over ranks."""
    n, scored, tok = ro["rows"], max(ro["scored"], 1), max(up["tokens"], 1)
    opt = max(up["opt_steps"], 1)
    return {
        "kind": "train", "step": step, "steps": total, "lr": lr, "time": elapsed, "step_time": step_time,
        "prompts_per_s": ro["groups"] / step_time, "tokens_per_s": ro["completion_tokens"] / step_time,
        "gen_tokens_per_s": ro["completion_tokens"] / max(ro["gen_time"], 1e-9),
        "update_tokens_per_s": ro["completion_tokens"] * epochs / max(up["update_time"], 1e-9),
        "W": ro["W"] / scored, "U": ro["U"] / scored, "L": ro["L"] / scored,
        "answer": ro["answer"] / scored, "format": ro["format"] / n,
        "DA": ro["DA"] / n, "CQ": ro["CQ"] / n, "AQ": ro["AQ"] / n,
        "completion_len": ro["completion_tokens"] / n, "truncated": ro["truncated"] / n,
        "judge_failed": int(ro["judge_failed"]), "zero_spread_groups": int(ro["zero_spread_groups"]),
        "train_rows": int(ro["train_rows"]),
        "kl": up["kl"] / tok if with_kl else None,
        "approx_kl": up["approx_kl"] / tok, "clip_frac": up["clip"] / tok, "entropy": up["entropy"] / tok,
        "logp_mismatch": up["mismatch"] / max(up["mismatch_tokens"], 1), "grad_norm": up["grad_norm"] / opt,
        "loss": up["loss"] / opt, "opt_steps": int(up["opt_steps"]),
        "gen_time": ro["gen_time"], "score_time": ro["score_time"], "update_time": up["update_time"],
        "eta_s": eta,
    }


def console_line(m: dict) -> str:
    kl = "-" if m["kl"] is None else f"{m['kl']:.4f}"
    return (f"step {m['step']:4d}/{m['steps']} | {m['prompts_per_s']:5.2f} p/s {m['tokens_per_s']:6.0f} tok/s | "
            f"W {m['W']:.3f} U {m['U']:.3f} L {m['L']:.3f} | fmt {m['format']:.2f} ans {m['answer']:.2f} | "
            f"DA {m['DA']:.2f} CQ {m['CQ']:.2f} AQ {m['AQ']:.2f} | len {m['completion_len']:5.1f} | kl {kl} | "
            f"clip {m['clip_frac']:.3f} | gnorm {m['grad_norm']:.3f} | lr {m['lr']:.1e} | "
            f"{m['step_time']:.1f}s eta {fmt_time(m['eta_s'])}")


def _cell(v, f="{:.3f}") -> str:
    return "-" if v is None else f.format(v)


def eval_line(step: int, m: dict) -> str:
    return (f"eval step {step} | n {m['n']} | W {_cell(m['welfare'])} U {_cell(m['user'])} L {_cell(m['llm'])} | "
            f"answer {_cell(m['answer_llm'])} | act_DQ {_cell(m['action_ok_DQ'])} act_VQ {_cell(m['action_ok_VQ'])} | "
            f"format {_cell(m['format_rate'])} | reas_ch {_cell(m['reasoning_chars'], '{:.0f}')} | "
            f"tokens {_cell(m['completion_tokens'], '{:.1f}')}")


def format_eval_table(before: dict, after: dict) -> str:
    lines = [" " * 8 + "".join(f"{h:>9s}" for _, h, _, _ in EVAL_COLUMNS)]
    for name, m in (("before", before), ("after", after)):
        lines.append(f"{name:8s}" + "".join(f"{_cell(m.get(k), f):>9s}" for k, _, f, _ in EVAL_COLUMNS))
    diffs = [None if before.get(k) is None or after.get(k) is None else after[k] - before[k]
             for k, _, _, _ in EVAL_COLUMNS]
    lines.append(f"{'change':8s}" + "".join(f"{_cell(v, f.replace('{:', '{:+')):>9s}"
                                            for v, (_, _, f, _) in zip(diffs, EVAL_COLUMNS)))
    return "\n".join(lines)


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
