"""Evaluation numbers: per-sample rows, per-data-source aggregates (docs/metrics.md), and the
comparison of two runs on matched prompts by their per-prompt (U, L) points.

A *row* is one scored completion as a flat JSON-able dict (see `sample_row`); eval.py writes
them to --per-sample and `metrics_by_source` turns a list of them into one dict of metrics per data
source plus "overall". `compare` takes two runs' rows and reports dominance counts,
epsilon-coverage of the joint frontier, hypervolume and normalised L-infinity regret; each is
defined exactly in its function's docstring.

The GTAlign paper's own definitions, as its published evaluation scripts computed them, are
their twins in nano_gtalign/paper_metrics.py (eval.py --paper-metrics prints both side by side);
only paper_response_chars is here, since every row carries it. mean_or_none and table_lines serve
both modules.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import asdict, is_dataclass
from typing import Callable

from nano_gtalign.game import KEYS, PayoffError, parse_payoff, split_blocks
from nano_gtalign.reward import welfare

Point = tuple[float, float]  # (U, L): user reward, LLM reward


# -----------------------------------------------------------------------------
# one completion -> one row

def prompt_key(record: dict) -> str:
    """A stable id for a record's prompt, used to match the same prompt across runs: a hash of
    its data_source and chat messages (records have no guaranteed unique id of their own)."""
    blob = json.dumps([record.get("data_source"), record.get("prompt")], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _known(x) -> float | None:
    """float, or None for NaN/None (a value nobody knows, e.g. after a failed judge)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _words(text: str) -> int:
    return len(text.split())


def _payoff_parses(payoff: str | None) -> bool:
    if payoff is None:
        return False
    try:
        parse_payoff(payoff)
    except PayoffError:
        return False
    return True


def _full_action(breakdown) -> str | None:
    """The action as a full key: the breakdown's own when it is one, else its question type and
    strategy (an <analyze> that named only "DA" still has a question type from the payoff)."""
    action = breakdown.action if breakdown.action in KEYS else None
    if action is None and breakdown.question_type and breakdown.strategy:
        action = f"{breakdown.question_type}_{breakdown.strategy}"
    return action if action in KEYS else None


def _lengths(completion: str, reasoning: str, response: str,
             count_tokens: Callable[[str], int] | None, generated_tokens: int | None) -> dict:
    def tokens(text: str) -> int | None:
        return None if count_tokens is None else count_tokens(text)

    generated = None if generated_tokens is None else int(generated_tokens)
    return {
        "reasoning_chars": len(reasoning),
        "response_words": _words(response),
        "total_chars": len(completion),
        "reasoning_tokens": tokens(reasoning),
        "response_tokens": tokens(response),
        "total_tokens": tokens(completion),
        "generated_tokens": generated,
    }


def paper_response_chars(completion: str) -> int | None:
    """Characters of the response as upstream's extract_tag_block takes it: the first <response>
    anywhere in the completion, up to the first </response> after it, stripped. None when there is
    no such block: the paper's per-run table drops that completion altogether."""
    start = completion.find("<response>")
    end = completion.find("</response>", start + len("<response>")) if start >= 0 else -1
    return None if end < 0 else len(completion[start + len("<response>"): end].strip())


def sample_row(breakdown, completion: str, record: dict,
               count_tokens: Callable[[str], int] | None = None, generated_tokens: int | None = None) -> dict:
    """Flatten one scored completion into the numbers `metrics_by_source` needs.

    breakdown is scoring.RewardBreakdown (any object with its attributes). Lengths follow docs/reward.md:
    reasoning = everything before `<response>` (the whole completion when there is none),
    response = the `<response>` block's content. Token counts are None without count_tokens;
    all three come from re-encoding the text, so a run and a re-scored file of its completions give
    the same numbers. generated_tokens is what the sampler actually produced (EOS included), when
    known; it can differ from total_tokens (e.g. a half-finished UTF-8 character re-encodes longer).
    w_cd and w_linear are recomputed from U and L so both welfares are reported whichever one
    the run trained or scored with (`welfare` is the breakdown's own W). payoff_spread and
    paper_response_chars are there for the paper's definitions (paper_metrics.paper_run_metrics). A
    failed judge leaves the answer terms, U, L and W unknown: scoring.py gives NaN, the row holds None
    (valid JSON).
    """
    blocks = split_blocks(completion)
    response = blocks.response or ""
    reasoning = completion if blocks.response_start is None else completion[: blocks.response_start]
    parse_ok = _payoff_parses(blocks.payoff)
    u, l = _known(breakdown.user), _known(breakdown.llm)
    both = u is not None and l is not None
    return {
        "prompt_id": prompt_key(record),
        "data_source": breakdown.data_source,
        "format": float(breakdown.format),
        "parse_ok": parse_ok,
        "judge_failed": bool(breakdown.judge_failed),
        "answer_user": _known(breakdown.answer_user),
        "answer_llm": _known(breakdown.answer_llm),
        "user": u,
        "llm": l,
        "welfare": _known(breakdown.welfare),
        "w_cd": welfare(u, l, "cobb_douglas") if both else None,
        "w_linear": welfare(u, l, "linear") if both else None,
        "pareto_consistency": float(breakdown.pareto_consistency),
        "action": _full_action(breakdown),
        "question_type": breakdown.question_type,
        "strategy": breakdown.strategy,
        "payoff_spread": float(breakdown.payoff_spread),
        "paper_response_chars": paper_response_chars(completion),
        **_lengths(completion, reasoning, response, count_tokens, generated_tokens),
    }


def breakdown_dict(breakdown) -> dict:
    """The breakdown as JSON-able data: NaN (unknown after a failed judge) becomes None."""
    d = asdict(breakdown) if is_dataclass(breakdown) else dict(vars(breakdown))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


# -----------------------------------------------------------------------------
# rows -> metrics per data source

def mean_or_none(xs: list[float]) -> float | None:
    """The mean of xs; None when xs is empty (nothing to average is undefined, not 0)."""
    return sum(xs) / len(xs) if xs else None


def group_metrics(rows: list[dict]) -> dict:
    """docs/metrics.md numbers for one group of rows. Denominators, so nothing is a silent zero:

    - all rows: format_rate, parse_rate, judge_failure_rate, the length means and the action
      distribution (fractions over all rows, "none" when no payoff parsed / no action).
    - scored rows (a verdict, or a failed one scored as 0 with --judge-failure zero): answer_llm,
      answer_user, U, L, w_cd, w_linear, welfare. By default a failed judge means the answer term is
      unknown, so its U/L/W are not averaged in.
    - parsed rows (payoff parses): pareto_consistency, the rate at which <analyze> names a
      frontier cell of the completion's own matrix.
    - response_ratio = sum(response_tokens) / sum(total_tokens) over all rows (share of the
      generated tokens that the user reads); answer_per_1k_tokens = 1000 * sum(answer_llm) /
      sum(total_tokens) over scored rows. Both are None without token counts. generated_tokens is
      the mean the sampler produced, None unless every row has it (a --completions file may not).
    "answer" is A_llm: the task verdict on [0, 1] (math correctness, medium rubric/4, wildguard
    [r > 0], ...); A_user (BLEU for medium, the win-win view for wildguard) is answer_user.
    """
    n = len(rows)
    # Scored: the judge gave a verdict, or a failed one was scored as 0 (--judge-failure zero); a failed
    # judgement left out (the default) has no welfare and is not averaged in.
    scored = [r for r in rows if r["welfare"] is not None]
    parsed = [r for r in rows if r["parse_ok"]]
    has_tokens = n > 0 and all(r["total_tokens"] is not None for r in rows)
    m = {
        "n": n,
        "n_scored": len(scored),
        "format_rate": mean_or_none([r["format"] for r in rows]),
        "parse_rate": mean_or_none([float(r["parse_ok"]) for r in rows]),
        "judge_failure_rate": mean_or_none([float(r["judge_failed"]) for r in rows]),
        "answer_llm": mean_or_none([r["answer_llm"] for r in scored]),
        "answer_user": mean_or_none([r["answer_user"] for r in scored]),
        "user": mean_or_none([r["user"] for r in scored]),
        "llm": mean_or_none([r["llm"] for r in scored]),
        "w_cd": mean_or_none([r["w_cd"] for r in scored]),
        "w_linear": mean_or_none([r["w_linear"] for r in scored]),
        "welfare": mean_or_none([r["welfare"] for r in scored]),
        "pareto_consistency": mean_or_none([r["pareto_consistency"] for r in parsed]),
        "reasoning_chars": mean_or_none([r["reasoning_chars"] for r in rows]),
        "response_words": mean_or_none([r["response_words"] for r in rows]),
        "reasoning_tokens": mean_or_none([r["reasoning_tokens"] for r in rows]) if has_tokens else None,
        "response_tokens": mean_or_none([r["response_tokens"] for r in rows]) if has_tokens else None,
        "total_tokens": mean_or_none([r["total_tokens"] for r in rows]) if has_tokens else None,
        "generated_tokens": (mean_or_none([r["generated_tokens"] for r in rows])
                             if n and all(r.get("generated_tokens") is not None for r in rows) else None),
        "response_ratio": None,
        "answer_per_1k_tokens": None,
    }
    if has_tokens:
        total = sum(r["total_tokens"] for r in rows)
        m["response_ratio"] = sum(r["response_tokens"] for r in rows) / total if total else None
        scored_tokens = sum(r["total_tokens"] for r in scored)
        if scored_tokens:
            m["answer_per_1k_tokens"] = 1000.0 * sum(r["answer_llm"] for r in scored) / scored_tokens
    counts = dict.fromkeys(KEYS + ("none",), 0)
    for r in rows:
        counts[r["action"] if r["action"] in counts else "none"] += 1
    m["actions"] = {k: (c / n if n else None) for k, c in counts.items()}
    return m


def metrics_by_source(rows: list[dict]) -> dict[str, dict]:
    """{data_source: metrics, ..., "overall": metrics}, sources sorted by name."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_source[r["data_source"]].append(r)
    out = {src: group_metrics(by_source[src]) for src in sorted(by_source)}
    out["overall"] = group_metrics(rows)
    return out


SCORE_COLUMNS = (  # (metric, header, format)
    ("n", "n", "{:d}"), ("format_rate", "format", "{:.3f}"), ("parse_rate", "parse", "{:.3f}"),
    ("answer_llm", "answer", "{:.3f}"), ("answer_user", "ans_user", "{:.3f}"), ("user", "U", "{:.3f}"),
    ("llm", "L", "{:.3f}"), ("w_cd", "W_cd", "{:.3f}"), ("w_linear", "W_linear", "{:.3f}"),
    ("pareto_consistency", "pareto", "{:.3f}"), ("judge_failure_rate", "judge_fail", "{:.3f}"),
)
LENGTH_COLUMNS = (
    ("reasoning_chars", "reason_ch", "{:.1f}"), ("reasoning_tokens", "reason_tok", "{:.1f}"),
    ("response_words", "resp_words", "{:.1f}"), ("response_tokens", "resp_tok", "{:.1f}"),
    ("total_tokens", "total_tok", "{:.1f}"), ("generated_tokens", "gen_tok", "{:.1f}"),
    ("response_ratio", "resp/total", "{:.3f}"), ("answer_per_1k_tokens", "answer/1k", "{:.3f}"),
)


def table_lines(title: str, columns, rows: dict[str, dict]) -> list[str]:
    """A plain-text table as lines: `title` over the row names, then one line per key of rows (a data
    source) with a cell per (metric, header, format) column, "-" where the value is None."""
    name_w = max(len(title), *(len(k) for k in rows))
    widths = [max(len(h), 6) for _, h, _ in columns]
    lines = [f"{title:{name_w}s}  " + " ".join(f"{h:>{w}s}" for (_, h, _), w in zip(columns, widths))]
    for src, m in rows.items():
        cells = ("-" if m[k] is None else f.format(m[k]) for k, _, f in columns)
        lines.append(f"{src:{name_w}s}  " + " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths)))
    return lines


def format_table(metrics: dict[str, dict]) -> str:
    """Three plain-text tables, one row per data source and "overall": scores, lengths, and the
    action distribution. "-" = undefined (no scored rows, or no token counts)."""
    actions = {src: m["actions"] for src, m in metrics.items()}
    action_cols = tuple((a, a, "{:.3f}") for a in KEYS + ("none",))
    return "\n".join(table_lines("scores", SCORE_COLUMNS, metrics) + [""] + table_lines("lengths", LENGTH_COLUMNS, metrics)
                     + [""] + table_lines("actions", action_cols, actions))


# -----------------------------------------------------------------------------
# comparing two runs on the same prompts

def per_prompt_points(rows: list[dict]) -> dict[str, Point]:
    """prompt_id -> (mean U, mean L) over that prompt's scored samples. A prompt whose samples all
    had a failed judge has no point (its U/L are unknown) and is left out."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        if r["judge_failed"]:
            continue
        a = acc[r["prompt_id"]]
        a[0] += r["user"]
        a[1] += r["llm"]
        a[2] += 1
    return {k: (su / c, sl / c) for k, (su, sl, c) in acc.items()}


def dominates(a: Point, b: Point) -> bool:
    """a dominates b: a >= b on both coordinates and > on at least one (exact comparison)."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def frontier(points: list[Point]) -> list[Point]:
    """The non-dominated points (duplicates kept once), sorted by U ascending."""
    uniq = sorted(set(points))
    return [p for p in uniq if not any(dominates(q, p) for q in uniq)]


def hypervolume(points: list[Point], ref: Point) -> float:
    """Area of the region dominated by the points and dominating ref (both objectives maximised):
    the union over points p of the boxes [ref_U, p_U] x [ref_L, p_L].

    Sweep the points by U from high to low keeping the highest L seen so far; a point that raises
    it adds the horizontal slab of height (p_L - best_L) and width (p_U - ref_U), since every
    point still to come has a smaller U. Points not above ref on both coordinates add nothing.
    For (1,0), (.5,.5), (0,1) against (0,0) this is 0.25: the outer two boxes have zero height or
    width, so only the middle one's 0.5 x 0.5 counts.
    """
    area, best_l = 0.0, ref[1]
    for u, l in sorted(points, key=lambda p: (-p[0], -p[1])):
        if u <= ref[0]:
            break
        if l > best_l:
            area += (u - ref[0]) * (l - best_l)
            best_l = l
    return area


def eps_coverage(run: list[Point], joint_frontier: list[Point], eps: float) -> float:
    """Fraction of the joint frontier's points p that the run eps-covers: some point q of the run
    has q_U >= p_U - eps and q_L >= p_L - eps (additive eps, in reward units). 1.0 means the run
    alone reaches (within eps) everything either run reached."""
    if not joint_frontier:
        return float("nan")
    hit = sum(any(q[0] >= p[0] - eps and q[1] >= p[1] - eps for q in run) for p in joint_frontier)
    return hit / len(joint_frontier)


def linf_regret(a: list[Point], b: list[Point]) -> tuple[float, float]:
    """Mean normalised L-infinity regret of each run on matched prompts.

    For prompt i with points a_i, b_i let best_i = (max(a_iU, b_iU), max(a_iL, b_iL)), the ideal
    of the two runs on that prompt; normalise each coordinate by its range over all 2n points,
    R_U = max - min of every a_iU and b_iU (likewise R_L; a zero range makes that coordinate's
    term 0). Regret of a on prompt i = max((best_iU - a_iU) / R_U, (best_iL - a_iL) / R_L), in
    [0, 1]; 0 when a is at least as good as b on both. Returns (mean over i for a, same for b).
    """
    if len(a) != len(b):
        raise ValueError(f"linf_regret needs matched points, got {len(a)} and {len(b)}")
    if not a:
        return float("nan"), float("nan")
    us = [p[0] for p in a + b]
    ls = [p[1] for p in a + b]
    ru, rl = max(us) - min(us), max(ls) - min(ls)

    def gap(best: float, x: float, r: float) -> float:
        return (best - x) / r if r > 0 else 0.0

    ra = rb = 0.0
    for pa, pb in zip(a, b):
        bu, bl = max(pa[0], pb[0]), max(pa[1], pb[1])
        ra += max(gap(bu, pa[0], ru), gap(bl, pa[1], rl))
        rb += max(gap(bu, pb[0], ru), gap(bl, pb[1], rl))
    return ra / len(a), rb / len(a)


def compare(rows_a: list[dict], rows_b: list[dict], eps: float = 0.01) -> dict:
    """Compare run a and run b on the prompts both scored (matched by prompt_id).

    - dominance: per prompt, "b_dominates_a" if b's (U, L) dominates a's, "a_dominates_b" the
      reverse, "equal" if identical, else "incomparable" (the four add up to n_matched).
    - coverage_a / coverage_b: eps_coverage of each run's point set on the Pareto frontier of both
      runs' points pooled.
    - hypervolume_a / _b / _joint: hypervolume of each point set (and of the pool) against the
      joint minimum (min U, min L over both runs' points).
    - regret_a / regret_b: linf_regret.
    """
    pa, pb = per_prompt_points(rows_a), per_prompt_points(rows_b)
    ids = sorted(set(pa) & set(pb))
    a = [pa[i] for i in ids]
    b = [pb[i] for i in ids]
    dom = {"a_dominates_b": 0, "b_dominates_a": 0, "equal": 0, "incomparable": 0}
    for x, y in zip(a, b):
        if x == y:
            dom["equal"] += 1
        elif dominates(x, y):
            dom["a_dominates_b"] += 1
        elif dominates(y, x):
            dom["b_dominates_a"] += 1
        else:
            dom["incomparable"] += 1
    out = {"n_matched": len(ids), "only_a": len(set(pa) - set(pb)), "only_b": len(set(pb) - set(pa)),
           "eps": eps, "dominance": dom, "mean_a": None, "mean_b": None,
           "coverage_a": math.nan, "coverage_b": math.nan, "frontier_size": 0,
           "ref": None, "hypervolume_a": math.nan, "hypervolume_b": math.nan, "hypervolume_joint": math.nan,
           "regret_a": math.nan, "regret_b": math.nan}
    if not ids:
        return out
    joint = frontier(a + b)
    ref = (min(p[0] for p in a + b), min(p[1] for p in a + b))
    ra, rb = linf_regret(a, b)
    out.update(
        mean_a=(sum(p[0] for p in a) / len(a), sum(p[1] for p in a) / len(a)),
        mean_b=(sum(p[0] for p in b) / len(b), sum(p[1] for p in b) / len(b)),
        coverage_a=eps_coverage(a, joint, eps), coverage_b=eps_coverage(b, joint, eps),
        frontier_size=len(joint), ref=ref,
        hypervolume_a=hypervolume(a, ref), hypervolume_b=hypervolume(b, ref),
        hypervolume_joint=hypervolume(a + b, ref), regret_a=ra, regret_b=rb,
    )
    return out


def format_comparison(c: dict, name_a: str = "a", name_b: str = "b") -> str:
    d = c["dominance"]
    lines = [
        f"matched prompts: {c['n_matched']} (only in {name_a}: {c['only_a']}, only in {name_b}: {c['only_b']})",
        f"per-prompt dominance: {name_b} dominates {name_a} on {d['b_dominates_a']}, "
        f"{name_a} dominates {name_b} on {d['a_dominates_b']}, equal {d['equal']}, incomparable {d['incomparable']}",
    ]
    if c["n_matched"]:
        lines += [
            f"mean (U, L): {name_a} ({c['mean_a'][0]:.4f}, {c['mean_a'][1]:.4f})  {name_b} ({c['mean_b'][0]:.4f}, {c['mean_b'][1]:.4f})",
            f"eps-coverage of the joint frontier ({c['frontier_size']} points, eps={c['eps']}): "
            f"{name_a} {c['coverage_a']:.3f}  {name_b} {c['coverage_b']:.3f}",
            f"hypervolume vs joint minimum ({c['ref'][0]:.4f}, {c['ref'][1]:.4f}): {name_a} {c['hypervolume_a']:.5f}  "
            f"{name_b} {c['hypervolume_b']:.5f}  joint {c['hypervolume_joint']:.5f}",
            f"mean normalised L-inf regret (lower is better): {name_a} {c['regret_a']:.4f}  {name_b} {c['regret_b']:.4f}",
        ]
    return "\n".join(lines)
