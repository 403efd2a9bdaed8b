r"""Evaluate: generate and score a checkpoint on a JSONL split, score a file of completions, or
compare two scored runs prompt by prompt (docs/metrics.md).

    python eval.py                                                # the demo model on the demo test split
    python eval.py --model out/demo/final --data out/demo/test.jsonl --out eval.json --per-sample eval.jsonl
    python eval.py --model DIR --data test.jsonl --judge http://localhost:8000/v1#Qwen/Qwen3-32B \
        --temperature 0.7 --top-p 0.95 --num-samples 4 --max-new-tokens 4096
    torchrun --nproc_per_node=8 eval.py --model DIR --data test.jsonl --judge http://localhost:8000/v1
    python eval.py --completions eval.jsonl --judge rule --tokenizer out/demo/final
    python eval.py --compare base.jsonl steered.jsonl --plot uv.png
    python eval.py --completions eval.jsonl --paper-metrics       # also the paper's own definitions
    python eval.py --compare base.jsonl steered.jsonl --paper-metrics
    python eval.py --model DIR --data out/gtalign/test.jsonl --limit 200 --skip-unscorable   # rule judge, math only

--data is a JSONL file of records (data/gtalign/prepare.py or the demo writes them). Under torchrun
every rank generates its share of the prompts and rank 0 gathers, scores and prints.
--completions takes one JSON object a line with "record" and "completion" (a --per-sample file is
such a file, so a run can be re-scored with another judge). --per-sample writes one line per
completion: its metrics row (nano_gtalign/metrics.py), the completion, the record and the reward
breakdown. --compare reads two --per-sample files and compares them overall and per data source. The
printed table has, per data source and overall, every metric of docs/metrics.md; metrics.group_metrics
documents each denominator.
--limit N draws N prompts seeded (--limit-seed) and in proportion per data source, every source
represented when N allows (data.stratified_subset): a mixed file's first N records are often one source.
The rule judge scores math and the demo only: eval.py refuses any other data source up front, or, with
--skip-unscorable, leaves those records out and labels the overall rows with the sources they cover.
--paper-metrics adds, under its own heading, the GTAlign paper's definitions as its scripts computed
them (docs/metrics.md#the-papers-definitions): per run, its format score, answer, character lengths with
completions lacking <response> dropped; with --compare, its eps-coverage, regret and hypervolume on the
joint frontier (the published hypervolume is a bug, flagged next to the number).

Faults: every flag's range, then every input record and output path, are checked before the first judge
call, each problem one line naming the flag or the file and line. Each --per-sample line says what generated
its completion ("generation": the model path, a fingerprint of its weights and tokenizer, and the sampling
settings), and --resume refuses a file another model, tokenizer or setting wrote. --per-sample holds
each generated completion before it is scored (a "pending" line) and each scored line as its chunk is
scored (one process generates and scores a few batches at a time), so Ctrl-C (exit 130, at once: the judge
requests in flight are cancelled, not waited for) or a scoring that fails loses no generation: --resume
scores only the rest, without generating the pending ones again, and --completions can score the file as
it is. When the judge failed on more than half of the completions it was asked about, eval.py says so on
stderr, writes its outputs and exits 3.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from data.demo import DEMO_MODEL, DEMO_TEST_DATA, missing_data_hint, missing_model_hint
from nano_gtalign.config import AT_LEAST_0, AT_LEAST_1, NON_NEGATIVE, Check
from nano_gtalign.data import json_type, parse_json_line, read_records_at, stratified_subset
from nano_gtalign.distributed import Dist, all_gather, exit_after_torchrun, gather_lists, setup_distributed, teardown
from nano_gtalign.errors import UsageError
from nano_gtalign.evaluate import (
    Key, SampleLog, check_sample_line, check_scorable, check_writable, checkpoint_identity, compare_by_source,
    format_comparison_by_source, generate_completions, judge_failures, json_safe, sample_keys, score_completions,
)
from nano_gtalign.http_judge import HTTPJudge, open_configured_judge
from nano_gtalign.judges import RULE_TASKS, add_judge_arguments, canonical_task, judge_options, redact_url
from nano_gtalign.loader import CheckpointError, load_config, load_pretrained, load_tokenizer
from nano_gtalign.metrics import (
    breakdown_dict, compare, format_comparison, format_table, frontier, metrics_by_source, per_prompt_points,
    prompt_key,
)
from nano_gtalign.paper_metrics import (
    format_paper_comparison, format_paper_table, paper_compare, paper_metrics_by_source,
)
from nano_gtalign.reward import BLEUS, LLM_REWARDS, WELFARES
from nano_gtalign.sampling import SamplingParams

SCORE_CHUNK = 256                      # completions per score_batch call (bounds memory, shows progress)
JUDGE_FAILED_EXIT = 3                  # the judge failed on more than half of the completions it was asked about
INTERRUPTED_EXIT = 130                 # Ctrl-C, as a shell reports it

# The range of every numeric flag, checked before anything is read, in the words train.py uses for its own
# (nano_gtalign/config.py): "--top-p must be in (0, 1], got 2.0". Seeds go to torch and numpy generators,
# which refuse negative ones (and, for numpy's legacy seeding, ones from 2^32): the range every one accepts.
SEED: Check = (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)")
FLAG_RANGES: dict[str, Check] = {
    "limit": AT_LEAST_1, "limit_seed": SEED, "eps": NON_NEGATIVE, "batch_size": AT_LEAST_1, "num_samples": AT_LEAST_1,
    "max_new_tokens": AT_LEAST_1, "temperature": NON_NEGATIVE, "top_k": AT_LEAST_0,
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "seed": SEED,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate (default: --model and --data)")
    src.add_argument("--model", default=DEMO_MODEL, help="checkpoint directory (default: %(default)s)")
    src.add_argument("--data", default=DEMO_TEST_DATA, help="JSONL records to generate for (default: %(default)s)")
    src.add_argument("--completions", default=None, help="score this JSONL of {record, completion} lines, no model")
    src.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"), default=None,
                     help="compare two --per-sample files on their matched prompts")
    src.add_argument("--limit", type=int, default=None,
                     help="only N prompts, drawn seeded and in proportion per data_source (default: all)")
    src.add_argument("--limit-seed", type=int, default=0, help="seed of the --limit draw (default: %(default)s)")
    sc = p.add_argument_group("scoring")
    add_judge_arguments(sc)
    sc.add_argument("--skip-unscorable", action="store_true",
                    help="with the rule judge: leave out the data sources it cannot score (it scores math and the "
                         "demo) instead of refusing them; the overall rows say which sources they cover")
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
    o.add_argument("--per-sample", default=None,
                   help="write one JSON line per completion here as each is scored (an existing file needs --resume)")
    o.add_argument("--resume", action="store_true",
                   help="continue the --per-sample file of an interrupted run: score only what it lacks")
    o.add_argument("--plot", default=None, help="PNG of the per-prompt (U, L) points and their frontier (needs matplotlib)")
    o.add_argument("--paper-metrics", action="store_true",
                   help="also print the paper's own metric definitions, in a separate table (docs/metrics.md)")
    return p


def fail(msg: str):
    sys.exit(f"eval.py: {msg}")


def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for each line of a JSONL file; a bad line (not UTF-8, not JSON, an integer or a
    nesting Python cannot hold: data.parse_json_line) is an error "FILE:LINE: problem"."""
    p = Path(path)
    if not p.is_file():
        fail(f"no {what} file at {path}")
    out = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            obj = parse_json_line(raw, path, n)
            if obj is None:
                continue
            if not isinstance(obj, dict):
                fail(f"{path}:{n}: must be a JSON object, got {json_type(obj)}")
            out.append((n, obj))
    if not out:
        fail(f"{path} has no {what}")
    return out


# -----------------------------------------------------------------------------
# inputs and outputs, all checked before the first judge call

@dataclass
class Item:
    """One completion to score, with what is known of how it was generated."""
    key: Key                   # (prompt_id, sample, k): matches its --per-sample line on --resume
    record: dict
    completion: str
    sample: int
    finish_reason: str | None
    generated_tokens: int | None
    generation: dict | None    # what generated it (model, weights, sampling settings), where known


def open_outputs(args, d: Dist) -> tuple[SampleLog | None, set[Key]]:
    """Rank 0 checks that --out/--per-sample/--plot can be written and opens --per-sample (reading what an
    interrupted run left there, with --resume); every rank learns which completions the file already holds,
    scored or pending (generated, not yet scored)."""
    sink = None
    if d.main:
        for flag in ("out", "per_sample", "plot"):
            if getattr(args, flag):
                check_writable(getattr(args, flag), "--" + flag.replace("_", "-"))
        if args.per_sample:
            sink = SampleLog(args.per_sample, args.resume)
    return sink, all_gather(d, set(sink.done) | set(sink.pending) if sink else set())[0]


def completion_items(args, log) -> tuple[list[Item], dict[str, int]]:
    """The --completions file's lines, each record checked (file and line named) before anything is scored,
    less the unscorable sources left out by --skip-unscorable (counted in the dict) and those --limit does not
    draw. A pending line (a --per-sample file's completion that was never scored) counts unless the file also
    holds its scored line."""
    found, pending = [], []
    for n, obj in read_jsonl(args.completions, "completions"):
        where = f"{args.completions}:{n}"
        rec, text, sample = obj.get("record"), obj.get("completion"), obj.get("sample", 0)
        generation = obj.get("generation")
        if not isinstance(rec, dict) or not isinstance(text, str):
            fail(f"{where}: a --completions line needs a 'record' object and a 'completion' string")
        if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
            fail(f"{where}: 'sample' must be an integer >= 0, got "
                 f"{sample if isinstance(sample, int) and not isinstance(sample, bool) else json_type(sample)}")
        if not (generation is None or isinstance(generation, dict)):
            fail(f"{where}: 'generation' must be an object, got {json_type(generation)}")
        check_scorable(rec, where)
        found.append((rec, text, sample, obj.get("finish_reason"), obj.get("generated_tokens"), generation))
        pending.append(obj.get("pending") is True)
    keys = {}  # pending and scored lines are keyed apart: a completion may have one of each
    for flag in (False, True):
        at = [i for i, p in enumerate(pending) if p == flag]
        keys.update(zip(at, sample_keys([(prompt_key(found[i][0]), found[i][2]) for i in at])))
    scored = {keys[i] for i, p in enumerate(pending) if not p}
    items = [Item(keys[i], *f) for i, f in enumerate(found) if not (pending[i] and keys[i] in scored)]
    items, skipped = skip_unscorable(items, lambda it: it.record["data_source"], args, log, "completion")
    if args.limit is not None:
        first = {}  # each prompt's record, to draw whole prompts with all their samples
        for it in items:
            first.setdefault(it.key[0], it.record)
        drawn = limit_records(list(first.values()), args, log)
        chosen = {prompt_key(r) for r in drawn}
        items = [it for it in items if it.key[0] in chosen]
    return items, skipped


def read_data(args, log) -> tuple[list[dict], list[list[Key]], dict[str, int]]:
    """--data's records (read_records names file and line), each also checked for what scoring needs, less
    those --skip-unscorable leaves out (counted in the dict) and those --limit does not draw; and the key of
    each record's num_samples completions."""
    if not Path(args.data).is_file():
        fail(f"no records file at {args.data}{missing_data_hint(args.data)}")
    located = read_records_at(args.data)
    for where, rec in located:
        check_scorable(rec, where)
    records = [rec for _, rec in located]
    records, skipped = skip_unscorable(records, lambda r: r["data_source"], args, log, "record")
    if args.limit is not None:
        records = limit_records(records, args, log)
    n = args.num_samples
    flat = sample_keys([(prompt_key(rec), s) for rec in records for s in range(n)])
    return records, [flat[i * n: (i + 1) * n] for i in range(len(records))], skipped


def skip_unscorable(items: list, source_of, args, log, what: str) -> tuple[list, dict[str, int]]:
    """With the rule judge and --skip-unscorable: the items of the sources it can score, and how many of each
    other source were left out (said in one line). Otherwise the items as they are (open_judge refuses an
    unscorable source later, still before any generation)."""
    if args.judge != "rule" or not args.skip_unscorable:
        return items, {}
    skipped = Counter(source_of(x) for x in items if canonical_task(source_of(x)) not in RULE_TASKS)
    if not skipped:
        return items, {}
    kept = [x for x in items if canonical_task(source_of(x)) in RULE_TASKS]
    if not kept:
        fail(f"--skip-unscorable left nothing: the rule judge cannot score {', '.join(sorted(skipped))}; "
             "pass --judge http://HOST:PORT/v1 (an OpenAI-compatible server)")
    left_out = ", ".join(f"{src} ({n} {what}{'s' * (n != 1)})" for src, n in sorted(skipped.items()))
    log(f"--skip-unscorable: left out {left_out}: the rule judge cannot score {'it' if len(skipped) == 1 else 'them'}")
    return kept, dict(sorted(skipped.items()))


def limit_records(records: list[dict], args, log) -> list[dict]:
    """--limit's seeded draw, in proportion per data source (data.stratified_subset), said in one line."""
    drawn = stratified_subset(records, args.limit, args.limit_seed)
    if len(drawn) < len(records):
        per_source = ", ".join(f"{s} {n}" for s, n in sorted(Counter(r["data_source"] for r in drawn).items()))
        log(f"--limit {args.limit}: {len(drawn)} of {len(records)} records, drawn per data_source "
            f"(--limit-seed {args.limit_seed}): {per_source}")
    return drawn


def token_counter(args, log):
    if not args.tokenizer:
        log("no --tokenizer: token counts, response/total ratio and answer per 1k tokens are '-'")
        return None
    try:
        tok = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:
        fail(f"cannot load tokenizer from {args.tokenizer}: {e}")
    return lambda s: len(tok.encode(s))


# -----------------------------------------------------------------------------
# generation (optionally sharded across torchrun ranks) and scoring, written out as it goes

def default_max_new_tokens(max_positions: int, prompt_ids: dict[int, list[int]]) -> int:
    """512, or what the model's context leaves after the longest prompt (the demo's model has 512 positions).
    Over every prompt of the run, not only those still to generate, so a resumed run uses the same limit."""
    longest = max((len(v) for v in prompt_ids.values()), default=0)
    return max(1, min(512, max_positions - longest))


def score_items(items: list[Item], args, judge, count_tokens, sink: SampleLog | None, log) -> dict[Key, dict]:
    """The --per-sample lines of items by key; each chunk is appended to the --per-sample file once scored."""
    new: dict[Key, dict] = {}

    def keep(start: int, rows: list[dict], breakdowns: list) -> None:
        part = items[start: start + len(rows)]
        lines = [{**row, "sample": it.sample, "finish_reason": it.finish_reason, "completion": it.completion,
                  "record": it.record, "breakdown": breakdown_dict(bd), **generation_field(it)}
                 for it, row, bd in zip(part, rows, breakdowns)]
        new.update(zip((it.key for it in part), lines))
        if sink:
            sink.append(lines)

    try:
        score_completions([(it.record, it.completion) for it in items], judge, welfare=args.welfare,
                          llm_reward=args.llm_reward, bleu=args.bleu, judge_failure=args.judge_failure,
                          count_tokens=count_tokens,
                          generated_tokens=[it.generated_tokens for it in items], chunk=SCORE_CHUNK, log=log,
                          on_chunk=keep)
    except ValueError as e:  # a record the reward cannot use (check_scorable should have caught it)
        fail(f"cannot score: {e}")
    return new


def generation_field(it: Item) -> dict:
    """The "generation" of an item's --per-sample lines, where known (a --completions input may not say)."""
    return {"generation": it.generation} if it.generation is not None else {}


def prepare_generation(args, records: list[dict]):
    """(tokenizer, every record's prompt ids, this run's generation): what generates the completions, as each
    --per-sample line records it and --resume compares it. The model's path and fingerprints of its weights and
    tokenizer (evaluate.checkpoint_identity), and the sampling settings, --max-new-tokens as it will be used
    (refused here when the longest prompt leaves it no room in the model's context). Reads the tokenizer and
    config.json only: the weights load later, and only if something is to generate."""
    if not Path(args.model).is_dir():
        fail(f"no model directory at {args.model}: {missing_model_hint(args.model)}")
    try:
        tok = load_tokenizer(args.model)
        max_positions = load_config(args.model).max_position_embeddings
        identity = checkpoint_identity(args.model)
    except (CheckpointError, OSError, ValueError) as e:
        fail(f"cannot load {args.model}: {e}")
    ids = {i: tok.encode_chat(r["prompt"], add_generation_prompt=True) for i, r in enumerate(records)}
    max_new = args.max_new_tokens or default_max_new_tokens(max_positions, ids)
    longest = max((len(x) for x in ids.values()), default=0)
    if longest + max_new > max_positions:  # refused here, not by the batch that holds the longest prompt
        given = args.max_new_tokens is not None  # else the default: the longest prompt fills the context alone
        fail(f"the longest prompt ({longest} tokens) + {'--max-new-tokens ' if given else ''}{max_new}"
             f"{'' if given else ' new token'} exceeds the model's max_position_embeddings ({max_positions}); "
             + ("lower --max-new-tokens" if given else "leave the longest prompts out"))
    generation = {"model": args.model, **identity, "max_new_tokens": max_new, "temperature": args.temperature,
                  "top_p": args.top_p, "top_k": args.top_k, "num_samples": args.num_samples, "seed": args.seed,
                  "dtype": args.dtype}
    return tok, ids, generation


def load_model(args, d: Dist):
    try:
        return load_pretrained(args.model, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
                               device=d.device).eval()
    except (CheckpointError, OSError, ValueError) as e:
        fail(f"cannot load {args.model}: {e}")


def generate_and_score(args, d: Dist, records: list[dict], keys: list[list[Key]], have: set[Key], judge,
                       sink: SampleLog | None, log, tok, ids: dict[int, list[int]],
                       generation: dict) -> dict[Key, dict]:
    """Score the completions --per-sample holds unscored (`have` are the keys it holds, scored or not), then
    generate for every prompt with a completion it lacks, and score those on rank 0. Each round's completions
    are written to --per-sample as pending lines before they are scored, so a scoring that fails loses no
    generation. One process works a few batches at a time and writes each round's lines before generating
    more; under torchrun every rank generates its share of everything first (a gather per round would keep
    the other ranks waiting on rank 0's judge)."""
    new = score_pending(args, records, keys, judge, sink, log, tok) if d.main and sink and sink.pending else {}
    todo = [i for i in range(len(records)) if any(k not in have for k in keys[i])]
    if len(todo) < len(records):
        log(f"--resume: {len(records) - len(todo)} of {len(records)} prompts are already in {args.per_sample}")
    if not todo:
        return new
    model = load_model(args, d)
    params = SamplingParams(max_new_tokens=generation["max_new_tokens"], temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed + d.rank)
    todo.sort(key=lambda i: len(ids[i]))  # batches of similar lengths carry little padding
    per_round = len(todo) if d.on else max(1, SCORE_CHUNK // (args.num_samples * args.batch_size)) * args.batch_size
    t0 = time.perf_counter()
    for r in range(0, len(todo), per_round):
        try:
            mine = generate_completions(model, tok, ids, todo[r: r + per_round][d.rank::d.world], params,
                                        batch_size=args.batch_size, num_samples=args.num_samples,
                                        log=(lambda m: log(f"rank {d.rank}: {m}")) if d.on else None)
        except ValueError as e:  # e.g. a prompt longer than the model's context
            fail(str(e))
        everything = sorted(gather_lists(d, mine))
        log(f"generated {min(r + per_round, len(todo))}/{len(todo)} prompts ({time.perf_counter() - t0:.1f}s)")
        if d.main:
            items = [Item(keys[c.index][c.sample], records[c.index], c.text, c.sample, c.finish_reason,
                          c.generated_tokens, generation) for c in everything if keys[c.index][c.sample] not in have]
            if sink:
                sink.append_pending([pending_line(it) for it in items])
            new.update(score_items(items, args, judge, lambda s: len(tok.encode(s)), sink, log))
    return new


def pending_line(it: Item) -> dict:
    """A generated completion's --per-sample line before it is scored: enough to score it later."""
    return {"prompt_id": it.key[0], "sample": it.sample, "data_source": it.record["data_source"],
            "finish_reason": it.finish_reason, "generated_tokens": it.generated_tokens, "completion": it.completion,
            "record": it.record, **generation_field(it)}


def score_pending(args, records: list[dict], keys: list[list[Key]], judge, sink: SampleLog, log,
                  tok) -> dict[Key, dict]:
    """--resume: score the completions an earlier run generated but did not score, without generating them.
    Each keeps the generation its pending line recorded (check_keys found it equal to this run's)."""
    where = {k: i for i, ks in enumerate(keys) for k in ks}
    items = [Item(k, records[where[k]], line["completion"], line["sample"], line.get("finish_reason"),
                  line.get("generated_tokens"), line.get("generation")) for k, line in sink.pending.items()]
    log(f"--resume: scoring the {len(items)} completions {args.per_sample} holds unscored (not generated again)")
    return score_items(items, args, judge, lambda s: len(tok.encode(s)), sink, log)


# -----------------------------------------------------------------------------
# outputs

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


def write_outputs(args, payload: dict, runs_for_plot, log) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(json_safe(payload), indent=1, ensure_ascii=False))
        log(f"wrote {args.out}")
    if args.plot:
        plot_runs(runs_for_plot, args.plot)
        log(f"wrote {args.plot}")


def run_compare(args, log) -> None:
    for flag in ("out", "plot"):
        if getattr(args, flag):
            check_writable(getattr(args, flag), f"--{flag}")
    a, b = (read_jsonl(path, "per-sample rows") for path in args.compare)
    for path, rows in zip(args.compare, (a, b)):
        for n, r in rows:
            if check_sample_line(r, f"{path}:{n}"):
                fail(f"{path}:{n}: a pending line (generated, not yet scored): score the file first "
                     f"(eval.py --completions {path} --per-sample NEW.jsonl)")
    a, b = [r for _, r in a], [r for _, r in b]
    result = compare(a, b, eps=args.eps)
    name_a, name_b = Path(args.compare[0]).stem, Path(args.compare[1]).stem
    by_source = compare_by_source(a, b, eps=args.eps)
    print(format_comparison(result, name_a, name_b))
    print("\n" + format_comparison_by_source(by_source, name_a, name_b))
    payload = {"compare": result, "compare_by_source": by_source, "a": args.compare[0], "b": args.compare[1]}
    if args.paper_metrics:
        payload["paper_compare"] = paper_compare(a, b)
        print("\n" + format_paper_comparison(payload["paper_compare"], name_a, name_b))
    write_outputs(args, payload, [(name_a, per_prompt_points(a)), (name_b, per_prompt_points(b))], log)


def report(args, lines: list[dict], sink: SampleLog | None, log, skipped: dict[str, int],
           generation: dict | None = None) -> None:
    """Print the tables and write every output; then exit 3 when the judge failed on most of what it was asked.
    skipped: the sources --skip-unscorable left out; the overall rows then name the sources they cover.
    generation: what generated the completions (model runs), kept in --out too."""
    metrics = metrics_by_source(lines)
    shown = metrics
    if skipped:
        sources = [s for s in metrics if s != "overall"]
        shown = {**{s: metrics[s] for s in sources}, f"overall ({', '.join(sources)})": metrics["overall"]}
    print(format_table(shown))
    paper = None
    if args.paper_metrics:
        try:
            paper = paper_metrics_by_source(lines, llm_reward=args.llm_reward)
        except ValueError as e:   # a --resume line from a run too old to carry what the paper needs
            fail(str(e))
        print("\n" + format_paper_table(paper, llm_reward=args.llm_reward))
    reasons = Counter(line["finish_reason"] for line in lines if line.get("finish_reason") is not None)
    if reasons:
        print("finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    failed, judged, errors = judge_failures(lines)
    if failed:
        print(f"judge failed on {failed}/{len(lines)} completions: left out of answer/U/L/W (see judge_error "
              "in --per-sample)")
    if sink:
        sink.finish(lines)
        log(f"wrote {len(lines)} lines to {args.per_sample}")
    payload = {"config": shown_flags(args), "metrics": metrics, "finish_reasons": dict(reasons),
               "n_samples": len(lines), "n_judged": judged, "n_judge_failed": failed, "skipped_sources": skipped}
    if generation is not None:
        payload["generation"] = generation
    if paper is not None:
        payload["paper_metrics"] = paper
    write_outputs(args, payload, [(Path(args.completions or args.model).name, per_prompt_points(lines))], log)
    if failed * 2 > judged:
        print(f"eval.py: JUDGE FAILED: judge failed on {failed} of {judged} judged completions ({len(lines)} in all), "
              f"so these metrics rest on few verdicts; first errors: {' | '.join(errors)}", file=sys.stderr, flush=True)
        sys.exit(JUDGE_FAILED_EXIT)


def interrupted(sink: SampleLog | None, d: Dist):
    if d.main and sink:
        unscored = " (and the generated ones not yet scored)" if sink.has_pending else ""
        print(f"eval.py: interrupted: {sink.written} completions are in {sink.path}{unscored}; "
              "run the same command with --resume to score the rest", file=sys.stderr, flush=True)
    elif d.main:
        print("eval.py: interrupted: nothing kept (no --per-sample); pass --per-sample FILE to keep what is "
              "scored, and --resume to continue", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_EXIT)


def check_flags(args) -> None:
    """Every flag on its own and the few that go together, before anything is read: one line each."""
    for name, (ok, need) in FLAG_RANGES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            fail(f"--{name.replace('_', '-')} must be {need}, got {value}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib, which is not installed (pip install matplotlib); "
                 "run again without --plot or install it")
    if args.resume and not args.per_sample:
        fail("--resume needs --per-sample: the file of the run to continue")


def evaluate(args, d: Dist, log) -> None:
    """Check outputs and inputs, open the judge (before any generation: an unreachable judge would waste it),
    then generate and score, appending to --per-sample as it goes."""
    sink, have = open_outputs(args, d)
    generation = judge = None
    try:
        if args.completions:
            items, skipped = completion_items(args, log)
            order, sources = [it.key for it in items], [it.record["data_source"] for it in items]
            wanted = {it.key: it.generation for it in items}
            count_tokens = token_counter(args, log)
        else:
            records, keys, skipped = read_data(args, log)
            order, sources = [k for ks in keys for k in ks], [r["data_source"] for r in records]
            tok, ids, generation = prepare_generation(args, records)
            wanted = dict.fromkeys(order, generation)
        if sink:
            unrecorded = sink.check_keys(wanted)
            if unrecorded:
                log(f"--resume: {unrecorded} lines of {args.per_sample} do not say what generated them (an older "
                    "eval.py wrote them): not checked")
        judge = open_run_judge(args, sources)
        if args.completions:
            scored = set(sink.done) if sink else set()
            new = score_items([it for it in items if it.key not in scored], args, judge, count_tokens, sink, log)
        else:
            new = generate_and_score(args, d, records, keys, have, judge, sink, log, tok, ids, generation)
            teardown(d)
    except KeyboardInterrupt:
        if isinstance(judge, HTTPJudge):   # else the exit would wait out every retry of the requests in flight
            judge.cancel()
        interrupted(sink, d)
    if d.main:  # a torchrun rank other than 0 is done: rank 0 scores and reports
        old = sink.done if sink else {}
        report(args, [new[k] if k in new else old[k] for k in order], sink, log, skipped, generation)


def open_run_judge(args, sources: list[str]):
    """The judge, refused up front (before any generation) when it cannot score one of `sources`."""
    try:
        return open_configured_judge(judge_options(args), sources)
    except UsageError as e:
        scorable = sorted({s for s in sources if canonical_task(s) in RULE_TASKS})
        if args.judge != "rule" or not scorable:
            raise
        fail(f"{e}, or --skip-unscorable to score only {', '.join(scorable)}")


COMPARE_FLAGS = ("compare", "eps", "paper_metrics", "out", "plot")   # all that --compare reads
GENERATION_FLAGS = ("model", "data", "batch_size", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p",
                    "seed", "device", "dtype")


def shown_flags(args) -> dict:
    """The flags as printed and kept in --out: the judge URL without a user:password@ (judges.redact_url), so a
    password in it is never written down."""
    return {**vars(args), "judge": redact_url(args.judge)}


def config_line(args, world: int) -> str:
    """The flags this run reads: --compare neither a model nor a judge, --completions no generation flags."""
    flags = shown_flags(args)
    if args.compare:
        return "config: " + " ".join(f"{k}={flags[k]!r}" for k in COMPARE_FLAGS)
    skip = {"compare", "eps", *(GENERATION_FLAGS if args.completions else ("completions", "tokenizer"))}
    return ("config: " + " ".join(f"{k}={v!r}" for k, v in flags.items() if k not in skip)
            + f" world_size={world}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_flags(args)  # before a process group is set up: a bad flag is one line, on every rank
    d = setup_distributed(args.device or "auto") if not (args.compare or args.completions) else Dist()
    log = (lambda *a: print(*a, flush=True)) if d.main else (lambda *a: None)
    log(config_line(args, d.world))
    try:
        return run_compare(args, log) if args.compare else evaluate(args, d, log)
    except (UsageError, CheckpointError) as e:  # a bad record, an unwritable output, a chat template that fails
        fail(str(e))


if __name__ == "__main__":
    main()
    exit_after_torchrun()
