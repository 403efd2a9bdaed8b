r"""Evaluate: generate and score a checkpoint on a JSONL split, score a file of completions, or
compare two scored runs prompt by prompt (docs/metrics.md).

    python eval.py                                                # the demo model on the demo test split
    python eval.py --model out/demo/final --data out/demo/test.jsonl --out eval.json --per-sample eval.jsonl
    python eval.py --model DIR --data test.jsonl --judge http://localhost:8000/v1#Qwen/Qwen3-32B \
        --temperature 0.7 --top-p 0.95 --num-samples 4 --max-new-tokens 4096
    torchrun --nproc_per_node=8 eval.py --model DIR --data test.jsonl --judge http://localhost:8000/v1
    python eval.py --completions eval.jsonl --judge rule --tokenizer out/demo/final
    python eval.py --compare base.jsonl steered.jsonl --plot uv.png

--data is a JSONL file of records (data/gtalign/prepare.py or the demo writes them). Under torchrun
every rank generates its share of the prompts and rank 0 gathers, scores and prints.
--completions takes one JSON object a line with "record" and "completion" (a --per-sample file is
such a file, so a run can be re-scored with another judge). --per-sample writes one line per
completion: its metrics row (nano_gtalign/metrics.py), the completion, the record and the reward
breakdown. --compare reads two --per-sample files. The printed table has, per data source and
overall, every metric of docs/metrics.md; metrics.group_metrics documents each denominator.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data.demo import DEMO_MODEL, DEMO_TEST_DATA, missing_data_hint, missing_model_hint
from nano_gtalign.data import read_records
from nano_gtalign.distributed import Dist, exit_after_torchrun, gather_lists, setup_distributed, teardown
from nano_gtalign.errors import UsageError
from nano_gtalign.evaluate import Completion, generate_completions, score_completions
from nano_gtalign.judges import open_judge
from nano_gtalign.loader import CheckpointError, load_pretrained, load_tokenizer
from nano_gtalign.metrics import (
    breakdown_dict, compare, format_comparison, format_table, frontier, metrics_by_source, per_prompt_points,
)
from nano_gtalign.reward import BLEUS, LLM_REWARDS, WELFARES
from nano_gtalign.sampling import SamplingParams

SCORE_CHUNK = 256                      # completions per score_batch call (bounds memory, shows progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate (default: --model and --data)")
    src.add_argument("--model", default=DEMO_MODEL, help="checkpoint directory (default: %(default)s)")
    src.add_argument("--data", default=DEMO_TEST_DATA, help="JSONL records to generate for (default: %(default)s)")
    src.add_argument("--completions", default=None, help="score this JSONL of {record, completion} lines, no model")
    src.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"), default=None,
                     help="compare two --per-sample files on their matched prompts")
    src.add_argument("--limit", type=int, default=None, help="only the first N records / completions")
    sc = p.add_argument_group("scoring")
    sc.add_argument("--judge", default="rule", help="'rule' or an OpenAI-compatible URL[#model] (default: %(default)s)")
    sc.add_argument("--welfare", default="cobb_douglas", choices=WELFARES, help="W in the breakdown (default: %(default)s)")
    sc.add_argument("--llm-reward", default="main", choices=LLM_REWARDS, help="L variant (default: %(default)s)")
    sc.add_argument("--bleu", default="char", choices=BLEUS, help="BLEU for the writing task (default: %(default)s)")
    sc.add_argument("--tokenizer", default=None,
                    help="tokenizer directory for token counts with --completions (default: none, token columns '-')")
    sc.add_argument("--eps", type=float, default=0.01, help="epsilon of the --compare coverage (default: %(default)s)")
    g = p.add_argument_group("generation (with --model)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default: %(default)s)")
    g.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="(default: 512, or what the model's context leaves after the longest prompt)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--device", default=None, help="default: cuda (this rank's GPU under torchrun) if available, else cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = the checkpoint's dtype (default: %(default)s)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", default=None, help="write every number as JSON here")
    o.add_argument("--per-sample", default=None, help="write one JSON line per completion here")
    o.add_argument("--plot", default=None, help="PNG of the per-prompt (U, L) points and their frontier (needs matplotlib)")
    return p


def fail(msg: str):
    sys.exit(f"eval.py: {msg}")


def read_jsonl(path: str, what: str, limit: int | None = None) -> list[dict]:
    """Objects of a JSONL file; a bad line is an error naming file and line."""
    p = Path(path)
    if not p.is_file():
        fail(f"no {what} file at {path}")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path} line {n} is not JSON: {e}")
            if not isinstance(obj, dict):
                fail(f"{path} line {n} must be a JSON object, got {type(obj).__name__}")
            out.append(obj)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        fail(f"{path} has no {what}")
    return out


def json_safe(x):
    """NaN/inf (e.g. metrics of an empty comparison) become null so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


# -----------------------------------------------------------------------------
# generation (optionally sharded across torchrun ranks) and scoring

def default_max_new_tokens(model, prompt_ids: dict[int, list[int]]) -> int:
    """512, or what the model's context leaves after the longest prompt (the demo's model has 512 positions)."""
    longest = max((len(v) for v in prompt_ids.values()), default=0)
    return max(1, min(512, model.config.max_position_embeddings - longest))


def generate_mine(model, tokenizer, records: list[dict], args, d: Dist, log) -> list[Completion]:
    """This rank's share records[rank::world], batched by prompt length so a batch carries little padding."""
    mine = list(range(d.rank, len(records), d.world))
    ids = {i: tokenizer.encode_chat(records[i]["prompt"], add_generation_prompt=True) for i in mine}
    params = SamplingParams(max_new_tokens=args.max_new_tokens or default_max_new_tokens(model, ids),
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed + d.rank)
    mine.sort(key=lambda i: len(ids[i]))
    return generate_completions(model, tokenizer, ids, mine, params, batch_size=args.batch_size,
                                num_samples=args.num_samples, log=lambda m: log(f"rank {d.rank}: {m}"))


def score_all(pairs: list[tuple[dict, str]], generated: list[int | None], args, judge, count_tokens, log
              ) -> tuple[list[dict], list]:
    try:
        return score_completions(pairs, judge, welfare=args.welfare, llm_reward=args.llm_reward, bleu=args.bleu,
                                 generated_tokens=generated, count_tokens=count_tokens, chunk=SCORE_CHUNK, log=log)
    except ValueError as e:  # a record the reward cannot use; the message names it
        fail(f"cannot score: {e}")


def plot_runs(runs: list[tuple[str, dict]], path: str) -> None:
    """Scatter each run's per-prompt (U, L) points and draw its Pareto frontier as a staircase."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for (name, points), color in zip(runs, ("tab:blue", "tab:orange")):
        pts = list(points.values())
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.5, color=color, label=f"{name} ({len(pts)})")
        f = frontier(pts)  # U ascending, L descending
        if f:
            xs, ys = [f[0][0]], [f[0][1]]
            for (u0, l0), (u1, l1) in zip(f, f[1:]):
                xs += [u1, u1]
                ys += [l0, l1]
            ax.plot(xs, ys, color=color, lw=1.5)
    ax.set_xlabel("U (user reward)")
    ax.set_ylabel("L (LLM reward)")
    ax.set_title("per-prompt (U, L) and Pareto frontiers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(args, payload: dict, lines: list[dict] | None, runs_for_plot, log) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(json_safe(payload), indent=1, ensure_ascii=False))
        log(f"wrote {args.out}")
    if args.per_sample and lines is not None:
        Path(args.per_sample).parent.mkdir(parents=True, exist_ok=True)
        with open(args.per_sample, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(json_safe(line), ensure_ascii=False) + "\n")
        log(f"wrote {len(lines)} lines to {args.per_sample}")
    if args.plot:
        plot_runs(runs_for_plot, args.plot)
        log(f"wrote {args.plot}")


def run_compare(args, log) -> None:
    a = read_jsonl(args.compare[0], "per-sample rows")
    b = read_jsonl(args.compare[1], "per-sample rows")
    for path, rows in zip(args.compare, (a, b)):
        for n, r in enumerate(rows, 1):
            missing = [k for k in ("prompt_id", "user", "llm", "judge_failed") if k not in r]
            if missing:
                fail(f"{path} line {n} is not an eval.py --per-sample row (missing {', '.join(missing)})")
    result = compare(a, b, eps=args.eps)
    name_a, name_b = Path(args.compare[0]).stem, Path(args.compare[1]).stem
    print(format_comparison(result, name_a, name_b))
    write_outputs(args, {"compare": result, "a": args.compare[0], "b": args.compare[1]}, None,
                  [(name_a, per_prompt_points(a)), (name_b, per_prompt_points(b))], log)


@dataclass
class Scorable:
    """What is scored: (record, completion) pairs with what is known of how each was generated."""
    pairs: list[tuple[dict, str]]
    samples: list[int]
    finish: list[str | None]
    generated: list[int | None]
    count_tokens: Callable[[str], int] | None


def from_completions_file(args, log) -> Scorable:
    lines = read_jsonl(args.completions, "completions", args.limit)
    pairs = []
    for n, obj in enumerate(lines, 1):
        if not isinstance(obj.get("record"), dict) or not isinstance(obj.get("completion"), str):
            fail(f"{args.completions} line {n} needs a 'record' object and a 'completion' string")
        pairs.append((obj["record"], obj["completion"]))
    count_tokens = None
    if args.tokenizer:
        try:
            tok = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as e:
            fail(f"cannot load tokenizer from {args.tokenizer}: {e}")
        count_tokens = lambda s: len(tok.encode(s))  # noqa: E731
    else:
        log("no --tokenizer: token counts, response/total ratio and answer per 1k tokens are '-'")
    return Scorable(pairs, [obj.get("sample", 0) for obj in lines], [obj.get("finish_reason") for obj in lines],
                    [obj.get("generated_tokens") for obj in lines], count_tokens)


def from_model(args, d: Dist, log) -> Scorable | None:
    """Generate on every rank; rank 0 gets everything in (record, sample) order, the others None."""
    if not Path(args.data).is_file():
        fail(f"no records file at {args.data}{missing_data_hint(args.data)}")
    try:
        records = read_records(args.data)[:args.limit]
    except UsageError as e:
        fail(str(e))
    if not Path(args.model).is_dir():
        fail(f"no model directory at {args.model}: {missing_model_hint(args.model)}")
    try:
        model = load_pretrained(args.model, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
                                device=d.device).eval()
        tok = load_tokenizer(args.model)
    except (CheckpointError, OSError, ValueError) as e:
        fail(f"cannot load {args.model}: {e}")
    t0 = time.perf_counter()
    try:
        mine = generate_mine(model, tok, records, args, d, log)
    except ValueError as e:  # e.g. a prompt longer than the model's context
        fail(str(e))
    everything = sorted(gather_lists(d, mine))
    teardown(d)
    if not d.main:
        return None
    log(f"generated {len(everything)} completions in {time.perf_counter() - t0:.1f}s")
    return Scorable([(records[c.index], c.text) for c in everything], [c.sample for c in everything],
                    [c.finish_reason for c in everything], [c.generated_tokens for c in everything],
                    lambda s: len(tok.encode(s)))


def report(args, todo: Scorable, rows: list[dict], breakdowns: list, log) -> None:
    metrics = metrics_by_source(rows)
    print(format_table(metrics))
    reasons = Counter(f for f in todo.finish if f is not None)
    if reasons:
        print("finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    failed = sum(r["judge_failed"] for r in rows)
    if failed:
        print(f"judge failed on {failed}/{len(rows)} completions: left out of answer/U/L/W (see judge_error "
              "in --per-sample)")
    per_sample = [{**row, "sample": s, "finish_reason": f, "completion": c, "record": rec, "breakdown": breakdown_dict(bd)}
                  for row, s, f, (rec, c), bd in zip(rows, todo.samples, todo.finish, todo.pairs, breakdowns)]
    payload = {"config": vars(args), "metrics": metrics, "finish_reasons": dict(reasons), "n_samples": len(rows)}
    write_outputs(args, payload, per_sample, [(Path(args.completions or args.model).name, per_prompt_points(rows))], log)


def check_flags(args) -> None:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib, which is not installed (pip install matplotlib); "
                 "run again without --plot or install it")
    for name in ("batch_size", "num_samples", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    d = setup_distributed(args.device or "auto") if not (args.compare or args.completions) else Dist()
    log = (lambda *a: print(*a, flush=True)) if d.main else (lambda *a: None)
    check_flags(args)
    log("config: " + " ".join(f"{k}={v!r}" for k, v in vars(args).items()) + f" world_size={d.world}")
    if args.compare:
        return run_compare(args, log)
    try:  # before any generation: an unreachable judge would waste it
        judge = open_judge(args.judge)
    except UsageError as e:
        fail(str(e))
    todo = from_completions_file(args, log) if args.completions else from_model(args, d, log)
    if todo is None:  # a torchrun rank other than 0: rank 0 scores and reports
        return
    rows, breakdowns = score_all(todo.pairs, todo.generated, args, judge, todo.count_tokens, log)
    report(args, todo, rows, breakdowns, log)


if __name__ == "__main__":
    main()
    exit_after_torchrun()
